"""A local Hugging Face cache laid out as the Hub's own downloads lay it out, for offline tests of the Hub paths.

``huggingface_hub`` keeps a downloaded repo under ``<HF_HOME>/hub/<kind>s--<org>--<name>/``: the files by content
under ``blobs/``, each revision's tree under ``snapshots/<commit>/`` as links to the blobs, and ``refs/main`` holding
the commit. ``hf_hub_download`` with ``HF_HUB_OFFLINE=1`` resolves ``refs/main`` and reads the snapshot, so open_clip's
tag and ``hf-hub:`` loading runs unchanged against it.

``datasets`` (5.2) never reads that tree offline: ``load_dataset("org/name")`` with ``HF_HUB_OFFLINE=1`` goes straight
to what its first, online load prepared, the Arrow files under ``<HF_HOME>/datasets/<org>___<name>/<config>/<version>/
<commit>/`` (``datasets/load.py``: the Hub module factory raises in offline mode and ``CachedDatasetModuleFactory``
serves the cache). :func:`put_dataset` therefore lays out both: the Parquet shards as the download leaves them, and
the Arrow cache that ``datasets``' own Parquet builder prepares from those shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path


def commit_of(repo_id: str) -> str:
    """A 40-hex commit id for ``repo_id`` (the Hub names revisions by git commit)."""
    return hashlib.sha1(f"commit of {repo_id}".encode()).hexdigest()


def put_repo(home: Path, kind: str, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """Lay out ``files`` (repo path -> bytes, or a file to move in) as one snapshot of ``repo_id`` (``kind``: model
    or dataset) under ``home/hub``; returns the snapshot folder."""
    root = Path(home) / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = root / "blobs" / "incoming"
        if isinstance(data, Path):
            shutil.move(data, tmp)
        else:
            tmp.write_bytes(data)
        digest = hashlib.sha256()
        with tmp.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        blob = root / "blobs" / digest.hexdigest()
        tmp.replace(blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def put_dataset(home: Path, repo_id: str, splits: dict) -> Path:
    """``splits`` (name -> ``datasets.Dataset``) as a Hub dataset repo of Parquet shards (``data/<split>-00000-of-
    00001.parquet``, as ``push_to_hub`` writes them) in the hub cache, and the Arrow cache ``load_dataset`` prepares
    from them on its first load, as ``datasets`` names it. Returns the snapshot folder."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {"README.md": b"---\nlicense: cc0-1.0\n---\nA tiny test repo.\n"}
    for split, ds in splits.items():
        buf = io.BytesIO()
        ds.to_parquet(buf)
        files[f"data/{split}-00000-of-00001.parquet"] = buf.getvalue()
    snapshot = put_repo(home, "dataset", repo_id, files)
    org, name = repo_id.split("/")
    data_files = DataFilesDict.from_patterns({s: [f"data/{s}-*"] for s in splits}, base_path=str(snapshot))
    with tempfile.TemporaryDirectory() as tmp:
        # The builder and config a Hub repo of Parquet files without a card config gets: config "default",
        # version 0.0.0, hashed by the commit; prepared where datasets files it, <org>___<name>.
        builder = Parquet(cache_dir=tmp, dataset_name=name, hash=commit_of(repo_id), data_files=data_files,
                          config_name="default", config_id="default", base_path=str(snapshot))
        builder.download_and_prepare()
        shutil.copytree(Path(tmp) / name, Path(home) / "datasets" / f"{org}___{name}")
    return snapshot


def offline(monkeypatch, home: Path) -> None:
    """Point this process's ``huggingface_hub`` and ``datasets`` at ``home`` with ``HF_HUB_OFFLINE=1`` (they read
    the environment once, at import, so their constants are set too), and the environment for child processes."""
    import datasets.config
    import huggingface_hub.constants as hub

    for var, value in {"HF_HOME": str(home), "HF_HUB_CACHE": str(Path(home) / "hub"), "HF_HUB_OFFLINE": "1",
                       "HF_DATASETS_CACHE": str(Path(home) / "datasets")}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(Path(home) / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(home) / "datasets")


def env(home: Path) -> dict:
    """The environment a user sets to run offline from ``home``."""
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
