"""Turn the configured data sections into tensors a model can use.

Shared by the driver (baseline evaluation, input checks) and every Ray Train
worker, so that both see exactly the same images, captions and labels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .benchmarks import EvalSet, check, decode
from .config import ROLES, DataSection, FinetuneData
from .data import images_to_tensor, load_source, nested_subset, require_columns


def load_finetune_split(spec: FinetuneData, data: DataSection, cache_dir: Path, where="data.finetune"):
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     csv_separator=spec.csv_separator, where=f"{where}.source")
    require_columns(ds, {"image_column": spec.image_column, "caption_column": spec.caption_column}, where)
    return ds


def finetune_tensors(spec: FinetuneData, data: DataSection, cache_dir: Path, fraction: float,
                     preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested ``fraction`` subset as ``(images [N,3,H,W], tokens [N,L])``; undecodable images skipped."""
    ds = load_finetune_split(spec, data, cache_dir)
    ds = ds.select(nested_subset(len(ds), fraction, data.seed).tolist())
    images, kept = images_to_tensor(ds, spec.image_column, preprocess, where="data.finetune",
                                    max_bad_share=spec.max_undecodable_share)
    captions = ds[spec.caption_column]
    return images, tokenizer([str(captions[i]) for i in kept])


def check_benchmarks(data: DataSection, cache_dir: Path) -> dict[str, int]:
    """Load every benchmark's split and check columns and class names (no decoding): ``{name: images}``."""
    return {spec.name: check(spec, cache_dir, data.seed, data.offline_scale)
            for role in ROLES for spec in data.specs(role)}


def eval_sets(data: DataSection, cache_dir: Path, preprocess, roles=ROLES) -> list[EvalSet]:
    """Every benchmark of ``roles``, decoded for ``preprocess`` (tensors cached under ``<cache>/eval``)."""
    return [decode(spec, role, i == 0, cache_dir, preprocess, data.seed, data.offline_scale,
                   tensor_cache=Path(cache_dir) / "eval")
            for role in roles for i, spec in enumerate(data.specs(role))]
