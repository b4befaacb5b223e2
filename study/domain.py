"""Turn the configured data sections into tensors a model can use.

Shared by the driver (baseline evaluation, input checks) and every Ray Train
worker, so that both see exactly the same images, captions and labels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import BenchmarkData, DataSection, FinetuneData
from .data import Benchmark, DataError, images_to_tensor, load_source, nested_subset, require_columns


def load_finetune_split(spec: FinetuneData, data: DataSection, cache_dir: Path, where="data.finetune"):
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     csv_separator=spec.csv_separator, where=f"{where}.source")
    require_columns(ds, {"image_column": spec.image_column, "caption_column": spec.caption_column}, where)
    return ds


def finetune_tensors(spec: FinetuneData, data: DataSection, cache_dir: Path, fraction: float,
                     preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested ``fraction`` subset as ``(images [N,3,H,W], tokens [N,L])``."""
    ds = load_finetune_split(spec, data, cache_dir)
    ds = ds.select(nested_subset(len(ds), fraction, data.seed).tolist())
    images = images_to_tensor(ds, spec.image_column, preprocess, where="data.finetune")
    return images, tokenizer([str(c) for c in ds[spec.caption_column]])


def load_benchmark_split(spec: BenchmarkData, data: DataSection, cache_dir: Path, where: str):
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     where=f"{where}.source")
    require_columns(ds, {"image_column": spec.image_column, "label_column": spec.label_column}, where)
    classnames = spec.classnames
    if classnames is None:
        names = getattr(ds.features[spec.label_column], "names", None)
        if not names:
            raise DataError(f"{where}.classnames: label column {spec.label_column!r} has no class names; "
                            f"list them in {where}.classnames")
        classnames = list(names)
    labels = ds[spec.label_column]
    bad = sorted({int(y) for y in labels if not 0 <= int(y) < len(classnames)})
    if bad:
        raise DataError(f"{where}.classnames: {len(classnames)} names do not cover labels {bad[:5]}")
    if spec.max_images and len(ds) > spec.max_images:
        ds = ds.select(range(spec.max_images))
    return ds, classnames


def benchmark(spec: BenchmarkData, data: DataSection, cache_dir: Path, preprocess, name: str) -> Benchmark:
    """Decode benchmark ``name`` (``specialized`` or ``general``) for a model's ``preprocess``."""
    where = f"data.{name}"
    ds, classnames = load_benchmark_split(spec, data, cache_dir, where)
    return Benchmark(name, images_to_tensor(ds, spec.image_column, preprocess, where=where),
                     torch.tensor([int(y) for y in ds[spec.label_column]]), classnames, list(spec.templates))
