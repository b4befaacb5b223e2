"""Decoded images on disk: every fine-tuning set and benchmark is decoded and preprocessed once per study
into a memory-mapped ``datasets`` Arrow file and read back in batches, so that the memory of the driver and
of the workers does not grow with the dataset.

An open_clip preprocessing (``Resize``, ``CenterCrop``, RGB, ``ToTensor``, ``Normalize``) is split at
``ToTensor``: the store holds the resized, cropped image as ``uint8`` ``[H, W, 3]`` (a quarter of the
float32 size) and ``ToTensor`` + ``Normalize`` run on each batch read, which gives exactly the tensors the
whole preprocessing gives. Any other preprocessing is stored as float32 ``[3, H, W]``.

Each row also keeps the source row it came from and two hashes of the decoded image, for the
contamination check (:mod:`study.library.contamination`): SHA-1 of its pixels, and the perceptual hash
(pHash, ``imagehash.phash``) of its grayscale content.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .images import open_image
from .sources import DataError, datasets_quiet

ARROW = "data.arrow"
# Bytes read through one memory map before it is reopened: the pages a mapping has touched count in the
# process's RSS until it is unmapped, so reopening keeps RSS bounded over an epoch of a large store.
REMAP_BYTES = 256 * 2**20
PROGRESS_FROM = 2000  # images; smaller sets decode in seconds


def is_store(path: Path) -> bool:
    """Whether ``path`` holds a finished store."""
    return (Path(path) / ARROW).exists() and (Path(path) / "meta.json").exists()


def split_preprocess(preprocess) -> tuple[Callable, Optional[Callable]]:
    """``(head, tail)``: ``head`` maps a PIL image to what the store keeps; ``tail`` maps a batch of stored
    ``uint8 [B, H, W, 3]`` to float ``[B, 3, H, W]`` (None: ``head`` is the whole preprocessing)."""
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    if cut is None or not all(isinstance(t, T.Normalize) for t in steps[cut + 1:]):
        return preprocess, None
    head, after = T.Compose(steps[:cut]), steps[cut + 1:]

    def tail(batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float().div_(255)
        for t in after:
            x = t(x)
        return x
    return head, tail


class ArrowRows:
    """A view of some rows of one memory-mapped Arrow file, read in batches in file order; the mapping is
    reopened every ``REMAP_BYTES`` read, so the process's RSS stays bounded over an epoch."""

    def __init__(self, path: Path, positions: Optional[np.ndarray] = None):
        self.path = Path(path)
        self._open()
        self.positions = np.arange(len(self._ds)) if positions is None else np.asarray(positions, dtype=np.int64)

    def _open(self) -> None:
        self._ds = datasets_quiet().Dataset.from_file(str(self.path / ARROW)).with_format("numpy")
        self._read, self._views = 0, {}

    def __len__(self) -> int:
        return len(self.positions)

    def read(self, idx, columns: list[str]) -> dict[str, torch.Tensor]:
        """The ``columns`` of rows ``idx`` (positions in this view: a slice or indices), in that order, as
        tensors ``[B, ...]``."""
        pos = self.positions[idx] if isinstance(idx, slice) else self.positions[np.asarray(idx, dtype=np.int64)]
        if len(pos) == 0:
            return {c: torch.empty(0) for c in columns}
        order = np.argsort(pos, kind="stable")  # Arrow reads faster in file order
        view = self._views.get(tuple(columns))
        if view is None:  # reading only the columns asked for skips the others' bytes
            view = self._views[tuple(columns)] = self._ds.select_columns(columns)
        got = view[pos[order].tolist()]
        self._read += sum(got[c].nbytes for c in columns)
        if self._read > REMAP_BYTES:
            self._open()
        back = torch.from_numpy(np.argsort(order, kind="stable"))
        return {c: torch.from_numpy(np.ascontiguousarray(got[c]))[back] for c in columns}

    def column(self, name: str) -> np.ndarray:
        """A stored column (e.g. ``row``, ``sha1``, ``phash``) for this view's rows, as stored."""
        return np.asarray(self._ds.with_format(None).select_columns([name])[self.positions.tolist()][name])


class ImageStore(ArrowRows):
    """Preprocessed images of one decoded split, read from disk in batches.

    ``len(store)``; ``store[i]``, ``store[a:b]`` and ``store[index tensor]`` give float ``[B, 3, H, W]``
    tensors (a single int gives ``[3, H, W]``); :meth:`subset` is a view of some rows; ``rows`` ``[N]`` are
    the source rows the images came from.
    """

    def __init__(self, path: Path, preprocess, positions: Optional[np.ndarray] = None):
        super().__init__(path, positions)
        self.preprocess = preprocess
        self._tail = split_preprocess(preprocess)[1]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]
        batch = self.read(idx, ["pixels"])["pixels"]
        if batch.numel() == 0:
            return batch
        return self._tail(batch) if self._tail else batch.float()

    def __getstate__(self):  # Ray pickles a store by its path; the reader opens the file again
        return {"path": self.path, "preprocess": self.preprocess, "positions": self.positions}

    def __setstate__(self, state):
        self.__init__(state["path"], state["preprocess"], state["positions"])

    @property
    def shape(self) -> tuple:
        return (len(self), *self[0].shape) if len(self) else (0,)

    @property
    def rows(self) -> np.ndarray:
        return self.column("row").astype(np.int64)

    def subset(self, idx) -> "ImageStore":
        """The images ``idx`` (positions in this view) as a new view of the same file."""
        return ImageStore(self.path, self.preprocess, self.positions[np.asarray(idx, dtype=np.int64)])

    def whole(self) -> "ImageStore":
        """Every image of the file this view reads."""
        return ImageStore(self.path, self.preprocess)

    def tensor(self) -> torch.Tensor:
        """Every image at once ``[N, 3, H, W]``: for small sets and tests only."""
        return self[np.arange(len(self))]


def _features(head, tail):
    from PIL import Image

    datasets = datasets_quiet()
    sample = np.asarray(head(Image.new("RGB", (32, 32))))
    pixels = datasets.Array3D(shape=tuple(sample.shape), dtype="uint8" if tail else "float32")
    return datasets.Features({"pixels": pixels, "row": datasets.Value("int64"), "sha1": datasets.Value("string"),
                              "phash": datasets.Value("string")})


def _encode(item, head, tail, base_dir):
    import hashlib

    import imagehash

    img = open_image(item, base_dir)
    out = np.asarray(head(img))
    return out if tail else out.astype(np.float32), hashlib.sha1(img.tobytes()).hexdigest(), str(imagehash.phash(img))


def _decode_into(ds, column: str, preprocess, file: Path, base_dir, title: str, progress: bool) -> list[str]:
    """``ds.map`` decoding ``ds[column]`` into the Arrow ``file``; returns one line per undecodable image."""
    datasets = datasets_quiet()
    head, tail = split_preprocess(preprocess)
    if isinstance(ds.features.get(column), datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    bad: list[str] = []

    def decode_batch(batch, rows):
        out = {"pixels": [], "row": [], "sha1": [], "phash": []}
        for item, row in zip(batch[column], rows):
            try:
                pixels, sha1, phash = _encode(item, head, tail, base_dir)
            except Exception as exc:  # PIL raises many types for a broken file
                bad.append(f"row {row}: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            for k, v in zip(out, (pixels, row, sha1, phash)):
                out[k].append(v)
        return out

    features = _features(head, tail)
    if progress:
        datasets.enable_progress_bars()
    try:
        ds.select_columns([column]).map(
            decode_batch, batched=True, batch_size=64, writer_batch_size=64, with_indices=True,
            remove_columns=[column], features=features, cache_file_name=str(file),
            load_from_cache_file=False, desc=f"[data] decoding {title}")
    finally:
        datasets.disable_progress_bars()
    return bad


def build_store(ds, column: str, preprocess, path: Path, *, where: str, title: str = "", max_bad_share: float = 0.0,
                base_dir: Optional[Path] = None, progress: Optional[bool] = None) -> tuple[ImageStore, int]:
    """Decode and preprocess every image of ``ds[column]`` into a store at ``path``: ``(store, skipped)``.

    Images are read as bytes, paths (relative to ``base_dir``) or ``{bytes, path}`` and decoded one at a
    time as the field decodes them (:func:`~study.library.images.open_image`), so a broken one is skipped and
    counted; more than ``max_bad_share`` of them (or all) raises :class:`DataError` naming ``where`` and
    the first. Written through a temporary folder renamed into place, so concurrent builders (trials,
    nodes) never read a half-written store. Shows a progress bar with an ETA, titled ``title``, when
    ``progress`` (default: on a terminal, or for 2,000 images or more).
    """
    path = Path(path)
    if is_store(path):
        return ImageStore(path, preprocess), json.loads((path / "meta.json").read_text())["skipped"]
    shutil.rmtree(path, ignore_errors=True)  # a store pruning left half
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    tmp.mkdir(parents=True)
    show = progress if progress is not None else (sys.stderr.isatty() or len(ds) >= PROGRESS_FROM)
    bad = _decode_into(ds, column, preprocess, tmp / ARROW, base_dir, title or where, show)
    if bad and (len(bad) > max_bad_share * len(ds) or len(bad) == len(ds)):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{where}: {len(bad)} of {len(ds)} images cannot be decoded "
                        f"(max_undecodable_share {max_bad_share:g}); first: {bad[0]}")
    (tmp / "meta.json").write_text(json.dumps({"rows": len(ds), "skipped": len(bad), "where": where}))
    for stray in tmp.glob("*"):  # datasets' own cache files beside the one we asked for
        if stray.name not in (ARROW, "meta.json"):
            stray.unlink()
    try:
        tmp.rename(path)
    except OSError:  # another process built the same store first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    if bad:
        print(f"[data] {where}: skipped {len(bad)} of {len(ds)} images that cannot be decoded "
              f"(max_undecodable_share {max_bad_share:g}); first: {bad[0]}", flush=True)
    return ImageStore(path, preprocess), len(bad)
