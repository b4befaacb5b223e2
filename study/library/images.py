"""Decoding images as the field decodes them: EXIF orientation applied, 16-bit and float modes scaled to
8-bit RGB (as ``datasets`` and torchvision do), and images given as PIL images, bytes, file paths or
``{bytes, path}`` mappings."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .sources import DataError, datasets_quiet


def to_rgb8(img):
    """``img`` as 8-bit RGB. 16-bit integer modes (``I;16*``, and ``I`` within 0..65535) are scaled by
    255/65535, float ``F`` images in [0, 1] by 255; palette and alpha images are converted by PIL."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255 / 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255 if arr.max(initial=0) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(item, base_dir: Optional[Path] = None):
    """A PIL image, ``bytes``, a path (relative to ``base_dir``) or ``{bytes, path}``, decoded upright
    (EXIF orientation, as ``datasets`` does) into 8-bit RGB. Raises what PIL raises for a broken file."""
    from PIL import Image, ImageOps

    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray)):
        item = Image.open(io.BytesIO(item))
    elif isinstance(item, (str, Path)):
        p = Path(item).expanduser()
        item = Image.open(p if p.is_absolute() or base_dir is None else Path(base_dir) / p)
    elif item is None:
        raise ValueError("no image (empty cell)")
    item.load()
    return to_rgb8(ImageOps.exif_transpose(item))


def images_to_tensor(ds, column: str, preprocess, where: str = "dataset",
                     max_bad_share: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Decode and preprocess every image of ``ds[column]`` in memory: ``([N', 3, H, W], kept row indices)``.

    For small sets (the offline pretraining data); studies use :func:`study.library.store.build_store`.
    An image that cannot be decoded is skipped and counted; more than ``max_bad_share`` of them (or all)
    raises :class:`DataError` naming the first.
    """
    datasets = datasets_quiet()
    if isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    out, kept, bad = [], [], []
    for i, item in enumerate(ds[column]):
        try:
            out.append(preprocess(open_image(item)))
            kept.append(i)
        except Exception as exc:
            bad.append(f"image {i}: {type(exc).__name__}: {exc}")
    if bad and (len(bad) > max_bad_share * len(ds) or not out):
        raise DataError(f"{where}: {len(bad)} of {len(ds)} images cannot be decoded "
                        f"(max_undecodable_share {max_bad_share:g}); first: {bad[0]}")
    return torch.stack(out), kept
