"""The study's caches on disk: decoded tensors and frozen-tower embeddings, keyed so they never go stale.

A key names everything its value depends on: the spec or settings, the
preprocessing, and for local files their modification time; model weights are
named by :func:`model_id`. Files are written atomically, so concurrent trials
never read half a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

MAX_CACHED_BYTES = 2 * 2**30  # decoded tensors larger than this are decoded again instead of cached


def fingerprint(*parts) -> str:
    """A short stable hash of ``parts`` (their ``str``), for file names."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


def source_stamp(source: str | None) -> float | str:
    """Modification time of a local file or folder (so a cache key changes when it is edited), else ``""``."""
    path = Path(source).expanduser() if source else None
    return path.stat().st_mtime if path and path.exists() else ""


def model_id(name: str, pretrained: str | None) -> str:
    """Names the exact weights (a local checkpoint by path and modification time), for cache keys."""
    return f"{name}|{pretrained}|{source_stamp(pretrained)}"


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through a temporary file, so that concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class FeatureCache:
    """Embeddings of a frozen tower, computed once per study and shared by every trial through files.

    Keys name the model weights (``model_id``) and the inputs (a benchmark's fingerprint, or its
    prompts), so a file is only ever reused for the same frozen weights and the same data.
    """

    def __init__(self, folder: Path | None, model_id: str):
        self.folder = Path(folder) if folder else None
        self.model_id = model_id
        self.hits = 0

    def get(self, kind: str, key: str, compute):
        if self.folder is None:
            return compute()
        path = self.folder / f"{kind}-{fingerprint(self.model_id, key)}.pt"
        if path.exists():
            self.hits += 1
            return torch.load(path, weights_only=True)
        value = compute().cpu()
        save_atomic(value, path)
        return value


def feature_cache(cache_dir: Path, model_name: str, pretrained: str | None) -> FeatureCache:
    """Where every trial finds the base model's embeddings of a tower it leaves frozen."""
    return FeatureCache(Path(cache_dir) / "eval" / "features", model_id(model_name, pretrained))


def tensor_cache(cache_dir: Path) -> Path:
    """The folder of decoded benchmark and fine-tuning tensors."""
    return Path(cache_dir) / "eval"
