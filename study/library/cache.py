"""The study's caches on disk: decoded tensors and frozen-tower embeddings, keyed so they never go stale.

A key names everything its value depends on: the spec or settings, the
preprocessing, and for local data the size and modification time of every file
(:func:`source_stamp`); model weights are named by :func:`model_id`. Files are
written atomically, so concurrent trials never read half a file, and
:func:`prune` keeps the folders under a size bound, least recently used first.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch



def fingerprint(*parts) -> str:
    """A short stable hash of ``parts`` (their ``str``), for file names."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12]


TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".txt", ".yaml", ".yml"}
HASHED_TABLE_BYTES = 64 * 2**20


def source_stamp(*sources) -> str:
    """A stamp of local files and folders: a hash of every file's relative path, size and modification
    time (ns), plus the content of label and caption tables (``.csv``, ``.jsonl``... up to 64 MiB), so that
    editing any file in place (a ``metadata.csv``, one image) changes it, and a metadata edit does even
    when it keeps the size and the time; non-local sources (Hub ids, ``offline:`` domains) add nothing."""
    h = hashlib.sha256()
    for source in sources:
        if isinstance(source, dict):
            source = list(source.values())
        for one in source if isinstance(source, (list, tuple)) else [source]:
            for item in one if isinstance(one, (list, tuple)) else [one]:
                path = Path(str(item)).expanduser() if item else None
                if path is None or not path.exists():
                    continue
                files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
                for f in files:
                    st = f.stat()
                    h.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|{st.st_mtime_ns};".encode())
                    if f.suffix.lower() in TABLE_SUFFIXES and st.st_size <= HASHED_TABLE_BYTES:
                        h.update(hashlib.sha256(f.read_bytes()).digest())  # labels and captions: by content
    return h.hexdigest()[:16]


def prune(folder: Path, max_bytes: int, keep: tuple = ()) -> list[Path]:
    """Delete the least recently used entries (files or folders) of ``folder`` until it holds at most
    ``max_bytes``; entries in ``keep`` stay. Returns what was deleted."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []

    def size(p: Path) -> int:
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    entries = sorted((p for p in folder.iterdir() if not p.name.endswith(".tmp")), key=lambda p: p.stat().st_mtime)
    sizes = {p: size(p) for p in entries}
    total, deleted = sum(sizes.values()), []
    for p in entries:
        if total <= max_bytes:
            break
        if p in keep:
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        total -= sizes[p]
        deleted.append(p)
    return deleted


def touch(path: Path) -> Path:
    """Mark a cache entry as just used (pruning deletes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass
    return path


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


def store_cache(cache_dir: Path) -> Path:
    """The folder of decoded image stores (:mod:`study.library.store`), one sub-folder per split."""
    return Path(cache_dir) / "stores"
