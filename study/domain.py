"""Turn the configured data sections into tensors a model can use.

Shared by the driver (baseline evaluation, input checks) and every Ray Train
worker, so that both see exactly the same images, captions and labels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .benchmarks import EvalSet, check, decode
from .config import ROLES, DataSection, FinetuneData
from .data import (MAX_CACHED_BYTES, fingerprint, images_to_tensor, load_source, nested_subset, require_columns,
                   save_atomic, source_stamp)


def load_finetune_split(spec: FinetuneData, data: DataSection, cache_dir: Path, where="data.finetune"):
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     csv_separator=spec.csv_separator, where=f"{where}.source")
    require_columns(ds, {"image_column": spec.image_column, "caption_column": spec.caption_column}, where)
    return ds


def decoded_finetune(spec: FinetuneData, data: DataSection, cache_dir: Path, preprocess) -> dict:
    """Every fine-tuning image decoded once per study: ``{"images" [K,3,H,W], "kept" [K] row indices,
    "captions" [n], "rows" n}``.

    The driver calls this before Ray starts (so broken images stop the study there, with the count);
    the result is cached under ``<cache>/eval/`` (up to 2 GiB), so trials load instead of decoding.
    """
    key = fingerprint(spec.model_dump_json(), repr(preprocess), data.seed, data.offline_scale,
                      source_stamp(spec.source))
    path = Path(cache_dir) / "eval" / f"finetune-{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ds = load_finetune_split(spec, data, cache_dir)
    images, kept = images_to_tensor(ds, spec.image_column, preprocess, where="data.finetune",
                                    max_bad_share=spec.max_undecodable_share)
    if len(kept) < len(ds):
        print(f"[data] data.finetune: skipped {len(ds) - len(kept)} of {len(ds)} images that cannot be decoded "
              f"(max_undecodable_share {spec.max_undecodable_share})", flush=True)
    out = {"images": images, "kept": kept, "captions": [str(c) for c in ds[spec.caption_column]], "rows": len(ds)}
    if images.numel() * images.element_size() <= MAX_CACHED_BYTES:
        save_atomic(out, path)
    return out


def finetune_tensors(spec: FinetuneData, data: DataSection, cache_dir: Path, fraction: float,
                     preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested ``fraction`` subset as ``(images [N,3,H,W], tokens [N,L])``; undecodable images skipped.

    The subset is drawn over the split's rows (not the decodable ones), so it stays nested and the
    same whatever fails to decode.
    """
    d = decoded_finetune(spec, data, cache_dir, preprocess)
    position = {row: i for i, row in enumerate(d["kept"])}
    rows = [int(r) for r in nested_subset(d["rows"], fraction, data.seed) if int(r) in position]
    return d["images"][[position[r] for r in rows]], tokenizer([d["captions"][r] for r in rows])


def check_benchmarks(data: DataSection, cache_dir: Path) -> dict[str, int]:
    """Load every benchmark's split and check columns and class names (no decoding): ``{name: images}``."""
    return {spec.name: check(spec, cache_dir, data.seed, data.offline_scale)
            for role in ROLES for spec in data.specs(role)}


def eval_sets(data: DataSection, cache_dir: Path, preprocess, roles=ROLES) -> list[EvalSet]:
    """Every benchmark of ``roles``, decoded for ``preprocess`` (tensors cached under ``<cache>/eval``)."""
    return [decode(spec, role, i == 0, cache_dir, preprocess, data.seed, data.offline_scale,
                   tensor_cache=Path(cache_dir) / "eval")
            for role in roles for i, spec in enumerate(data.specs(role))]
