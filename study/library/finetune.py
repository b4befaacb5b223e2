"""The fine-tuning pairs: one split of image-caption pairs, decoded once per study, and its nested subsets.

Shared by the driver (input checks, decoding before Ray starts) and every Ray
Train worker, so that both see exactly the same images and captions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .cache import MAX_CACHED_BYTES, fingerprint, save_atomic, source_stamp, tensor_cache
from .images import images_to_tensor
from .sources import load_source, require_columns


def load_finetune_split(spec, data, cache_dir: Path, where="data.finetune"):
    """The split named by ``spec`` (:class:`~study.config.FinetuneData`) as a ``datasets.Dataset``, its image
    and caption columns checked. ``data`` (:class:`~study.config.DataSection`) gives the seed and scale of
    generated domains."""
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     csv_separator=spec.csv_separator, where=f"{where}.source")
    require_columns(ds, {"image_column": spec.image_column, "caption_column": spec.caption_column}, where)
    return ds


def decoded_finetune(spec, data, cache_dir: Path, preprocess) -> dict:
    """Every fine-tuning image decoded once per study: ``{"images" [K,3,H,W], "kept" [K] row indices,
    "captions" [n], "rows" n}``.

    The driver calls this before Ray starts (so broken images stop the study there, with the count);
    the result is cached under ``<cache>/eval/`` (up to 2 GiB), so trials load instead of decoding.
    """
    key = fingerprint(spec.model_dump_json(), repr(preprocess), data.seed, data.offline_scale,
                      source_stamp(spec.source))
    path = tensor_cache(cache_dir) / f"finetune-{key}.pt"
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


def nested_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` subset of ``range(n)``, nested across fractions.

    One fixed permutation per ``(n, seed)``; a subset is its prefix, so the 10%
    subset always lies inside the 20% subset. Raises ``ValueError`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: max(1, math.ceil(fraction * n))])


def finetune_tensors(spec, data, cache_dir: Path, fraction: float, preprocess,
                     tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The nested ``fraction`` subset as ``(images [N,3,H,W], tokens [N,L])``; undecodable images skipped.

    The subset is drawn over the split's rows (not the decodable ones), so it stays nested and the
    same whatever fails to decode.
    """
    d = decoded_finetune(spec, data, cache_dir, preprocess)
    position = {row: i for i, row in enumerate(d["kept"])}
    rows = [int(r) for r in nested_subset(d["rows"], fraction, data.seed) if int(r) in position]
    return d["images"][[position[r] for r in rows]], tokenizer([d["captions"][r] for r in rows])
