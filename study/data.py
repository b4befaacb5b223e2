"""Domain data through Hugging Face ``datasets``: one loader for every source.

A *source* string names where the data lives:

* ``offline:<domain>`` - a generated domain (see :mod:`study.synthetic`), built
  once into the cache and reused;
* a directory saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* any other directory - an image folder (``imagefolder``; captions from a
  ``metadata.csv``/``metadata.jsonl`` beside the images, labels from sub-folders);
* a ``.csv``/``.tsv`` file in open_clip's format (a file-path column and a
  caption column, paths relative to the file);
* ``.parquet`` / ``.arrow`` files with image and caption (or label) columns;
* anything else is taken as a Hugging Face Hub dataset id (needs the network).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

OFFLINE_PREFIX = "offline:"


class DataError(ValueError):
    """A dataset that cannot be used as configured; the message names the field at fault."""


class EmptySplitError(DataError):
    """The split exists but holds no rows."""


def _datasets():
    """``datasets``, with its per-split progress bars off: the study prints its own progress."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def offline_dir(cache_dir: Path, domain: str, seed: int, scale: float) -> Path:
    return Path(cache_dir) / "data" / f"{domain}-seed{seed}-scale{scale:g}"


def load_source(source: str, split: str, *, cache_dir: Path, seed: int = 0, scale: float = 1.0,
                csv_separator: str = ",", config: str | None = None, revision: str | None = None,
                data_files=None, where: str = "source"):
    """Return split ``split`` of ``source`` as a ``datasets.Dataset``.

    ``config``/``revision`` select a Hugging Face dataset config and revision; with ``data_files``,
    ``source`` names the builder (``parquet``, ``csv``, ``imagefolder``...). ``where`` names the
    config field that holds ``source``, for error messages.
    """
    datasets = _datasets()
    if data_files is not None:
        try:
            return _pick_split(datasets.load_dataset(source, name=config, data_files=data_files, revision=revision),
                               split, where)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{where}: cannot load {source!r} data_files {data_files!r}: "
                            f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc

    if source.startswith(OFFLINE_PREFIX):
        from .synthetic import DOMAINS, build_domain

        domain = source[len(OFFLINE_PREFIX):]
        if domain not in DOMAINS:
            raise DataError(f"{where}: unknown offline domain {domain!r}; choose from {sorted(DOMAINS)}")
        path = offline_dir(cache_dir, domain, seed, scale)
        if (path / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(str(path))
        else:
            print(f"[data] generating offline domain {domain!r} (seed={seed}, scale={scale:g}) -> {path}", flush=True)
            dd = build_domain(domain, path, seed=seed, scale=scale)
        return _pick_split(dd, split, where)

    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or path.suffix in {".csv", ".tsv", ".parquet", ".arrow"}
    if looks_local and not path.exists():
        raise DataError(f"{where}: path {source!r} does not exist")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            return _pick_split(datasets.load_from_disk(str(path)), split, where)
        if path.is_dir():  # an image folder, or a local copy of a Hub dataset repo: the same call as the Hub
            return _pick_split(datasets.load_dataset(str(path), name=config), split, where)
        if path.suffix in {".csv", ".tsv"}:
            return _load_csv(path, "\t" if path.suffix == ".tsv" else csv_separator)
        if path.suffix in {".parquet", ".arrow"}:
            kind = path.suffix.lstrip(".")
            return _pick_split(datasets.load_dataset(kind, data_files=str(path)), split, where)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the file named
        if "corresponds to no data" in str(exc):  # datasets' words for a split with no rows
            raise EmptySplitError(f"{where}: split {split!r} is empty") from exc
        raise DataError(f"{where}: cannot read {source!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    # A Hub dataset id. Remote code is never trusted (datasets>=3 dropped it anyway).
    try:
        return datasets.load_dataset(source, name=config, split=split, revision=revision)
    except Exception as exc:
        raise DataError(f"{where}: cannot load Hugging Face dataset {source!r} split {split!r}: "
                        f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def _pick_split(dd, split: str, where: str):
    import datasets

    if isinstance(dd, datasets.Dataset):
        return dd
    if split not in dd:
        raise DataError(f"{where}: split {split!r} not found; available: {sorted(dd)}")
    return dd[split]


def _load_csv(path: Path, sep: str):
    """open_clip-style CSV: a file-path column and a caption column; paths relative to the CSV."""
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(path), sep=sep, split="train")
    base = path.parent
    for col in ("filepath", "file_name", "image_path", "path"):
        if col in ds.column_names:
            ds = ds.map(lambda r: {col: str((base / r[col]).resolve())})
            ds = ds.cast_column(col, datasets.Image())
            if col != "image" and "image" not in ds.column_names:
                ds = ds.rename_column(col, "image")
            break
    return ds


def require_columns(ds, columns: dict[str, str], where: str) -> None:
    """Raise DataError unless every ``{field: column}`` exists in ``ds``."""
    for field, col in columns.items():
        if col not in ds.column_names:
            raise DataError(f"{where}.{field}: column {col!r} not in dataset (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataError(f"{where}: the split is empty")


def nested_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` subset of ``range(n)``, nested across fractions.

    One fixed permutation per ``(n, seed)``; a subset is its prefix, so the 10%
    subset always lies inside the 20% subset.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: max(1, math.ceil(fraction * n))])


def images_to_tensor(ds, column: str, preprocess, where: str = "dataset",
                     max_bad_share: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Decode and preprocess every image of ``ds[column]``: returns ``([N', 3, H, W], kept row indices)``.

    Images are decoded one by one (not by ``datasets``), so that an image that cannot be decoded is
    skipped and counted; more than ``max_bad_share`` of them (or all) is an error naming the first.
    """
    import io

    from PIL import Image

    datasets = _datasets()
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


def fingerprint(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


MAX_CACHED_BYTES = 2 * 2**30  # decoded tensors larger than this are decoded again instead of cached


def source_stamp(source: str | None) -> float | str:
    """Modification time of a local file or folder (so a cache key changes when it is edited), else ``""``."""
    path = Path(source).expanduser() if source else None
    return path.stat().st_mtime if path and path.exists() else ""


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through a temporary file, so that concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
