"""Decoding images for a model: one image at a time, so that a broken one is skipped and counted."""

from __future__ import annotations

import torch

from .sources import DataError, datasets_quiet


def images_to_tensor(ds, column: str, preprocess, where: str = "dataset",
                     max_bad_share: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Decode and preprocess every image of ``ds[column]``: returns ``([N', 3, H, W], kept row indices)``.

    Images are decoded one by one (not by ``datasets``), so that an image that cannot be decoded is
    skipped and counted; more than ``max_bad_share`` of them (or all) raises :class:`DataError` naming
    the first.
    """
    import io

    from PIL import Image

    datasets = datasets_quiet()
    if isinstance(ds.features.get(column), datasets.Image):
        items = ds.cast_column(column, datasets.Image(decode=False))[column]
    else:
        items = ds[column]
    out, kept, bad = [], [], []
    for i, item in enumerate(items):
        try:
            if isinstance(item, dict):
                item = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
            out.append(preprocess(item.convert("RGB")))
            kept.append(i)
        except Exception as exc:
            bad.append(f"image {i}: {type(exc).__name__}: {exc}")
    if bad and (len(bad) > max_bad_share * len(items) or not out):
        raise DataError(f"{where}: {len(bad)} of {len(items)} images cannot be decoded "
                        f"(max_undecodable_share {max_bad_share:g}); first: {bad[0]}")
    return torch.stack(out), kept
