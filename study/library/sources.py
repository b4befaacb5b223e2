"""Domain data through Hugging Face ``datasets``: one loader for every source.

A *source* string names where the data lives:

* ``offline:<domain>`` - a generated domain (see :mod:`study.library.synthetic`), built
  once into the cache and reused;
* a directory saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* any other directory - an image folder (``imagefolder``; captions from a
  ``metadata.csv``/``metadata.jsonl`` beside the images, labels from sub-folders);
* a ``.csv``/``.tsv`` file in open_clip's format (a file-path column and a
  caption column, paths relative to the file);
* ``.parquet`` / ``.arrow`` files with image and caption (or label) columns;
* a WebDataset in CLIP_benchmark's layout (:mod:`study.library.webdataset`): one of its benchmarks by name
  (``wds/vtab/pcam``, read from the Hub through ``huggingface_hub``), a folder with ``<split>/nshards.txt`` and
  ``<split>/0.tar``..., or ``.tar`` shards (a path, a glob, ``shards/{0..7}.tar``, or ``source: webdataset`` with
  ``data_files``);
* anything else is taken as a Hugging Face Hub dataset id (needs the network).
"""

from __future__ import annotations

from pathlib import Path

from . import webdataset
from .errors import DataError, EmptySplitError

OFFLINE_PREFIX = "offline:"


def datasets_quiet():
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
    config field that holds ``source``, for error messages. Raises :class:`DataError`.
    """
    if webdataset.is_webdataset(source, data_files):
        base = split.split("[", 1)[0].split("+", 1)[0]
        ds = webdataset.load_split(source, base, cache_dir=cache_dir, data_files=data_files, revision=revision,
                                   where=where)
        return pick_split({base: ds}, split, where)
    if data_files is not None:
        return _load_builder(source, split, config, revision, data_files, where)
    if source.startswith(OFFLINE_PREFIX):
        return _load_offline(source[len(OFFLINE_PREFIX):], split, cache_dir, seed, scale, where)
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or path.suffix in {".csv", ".tsv", ".parquet", ".arrow"}
    if looks_local and not path.exists():
        raise DataError(f"{where}: path {source!r} does not exist")
    if path.exists():
        return _load_local(path, split, config, csv_separator, where, hf_cache(cache_dir, path))
    # A Hub dataset id. Remote code is never trusted (datasets>=3 dropped it anyway).
    try:
        return datasets_quiet().load_dataset(source, name=config, split=split, revision=revision)
    except Exception as exc:
        raise DataError(f"{where}: cannot load Hugging Face dataset {source!r} split {split!r}: "
                        f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def _load_builder(builder: str, split: str, config, revision, data_files, where: str):
    try:
        dd = datasets_quiet().load_dataset(builder, name=config, data_files=data_files, revision=revision)
        return pick_split(dd, split, where)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{where}: cannot load {builder!r} data_files {data_files!r}: "
                        f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def _load_offline(domain: str, split: str, cache_dir: Path, seed: int, scale: float, where: str):
    from .synthetic import DOMAINS, build_domain

    if domain not in DOMAINS:
        raise DataError(f"{where}: unknown offline domain {domain!r}; choose from {sorted(DOMAINS)}")
    path = offline_dir(cache_dir, domain, seed, scale)
    if (path / "dataset_dict.json").exists():
        dd = datasets_quiet().load_from_disk(str(path))
    else:
        print(f"[data] generating offline domain {domain!r} (seed={seed}, scale={scale:g}) -> {path}", flush=True)
        dd = build_domain(domain, path, seed=seed, scale=scale)
    return pick_split(dd, split, where)


def hf_cache(cache_dir: Path, path: Path) -> str:
    """Where ``datasets`` caches what it builds from a local source: a folder named by the source's stamp
    (:func:`~study.library.cache.source_stamp`), since ``datasets`` itself keys local files by their
    modification time only, and an edit that keeps it would be served stale."""
    from .cache import source_stamp

    return str(Path(cache_dir) / "hf" / source_stamp(path))


def _load_local(path: Path, split: str, config, csv_separator: str, where: str, cache: str):
    datasets = datasets_quiet()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            return pick_split(datasets.load_from_disk(str(path)), split, where)
        if path.is_dir():  # an image folder, or a local copy of a Hub dataset repo: the same call as the Hub
            return pick_split(datasets.load_dataset(str(path), name=config, cache_dir=cache), split, where)
        if path.suffix in {".csv", ".tsv"}:
            return _load_csv(path, "\t" if path.suffix == ".tsv" else csv_separator, cache)
        if path.suffix in {".parquet", ".arrow"}:
            return pick_split(datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), cache_dir=cache),
                               split, where)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the file named
        if "corresponds to no data" in str(exc):  # datasets' words for a split with no rows
            raise EmptySplitError(f"{where}: split {split!r} is empty") from exc
        raise DataError(f"{where}: cannot read {str(path)!r}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    raise DataError(f"{where}: {str(path)!r} is neither a folder nor a .csv/.tsv/.parquet/.arrow file")


def pick_split(dd, split: str, where: str):
    """Split ``split`` of ``dd``, with ``datasets``' slicing syntax (``train[:80%]``, ``train[10:20]``,
    ``train[:50%]+test``); a single ``Dataset`` (a CSV file) is its own split of any name."""
    import datasets
    from datasets.arrow_reader import ReadInstruction

    try:
        instructions = ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as exc:
        raise DataError(f"{where}: split {split!r} is not a split name or slice ({exc})") from None
    single = isinstance(dd, datasets.Dataset)
    names = {i.splitname for i in instructions._relative_instructions}
    missing = [] if single else sorted(n for n in names if n not in dd)
    if missing:
        raise DataError(f"{where}: split {missing[0]!r} not found; available: {sorted(dd)}")
    if single and "[" not in split:
        return dd
    parts = {n: dd if single else dd[n] for n in names}
    try:
        absolute = instructions.to_absolute({n: len(p) for n, p in parts.items()})
    except (ValueError, AssertionError) as exc:
        raise DataError(f"{where}: split {split!r}: {exc}") from None
    pieces = [parts[a.splitname].select(range(a.from_, a.to)) for a in absolute]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def _load_csv(path: Path, sep: str, cache: str):
    """open_clip-style CSV: a file-path column and a caption column; paths relative to the CSV."""
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(path), sep=sep, split="train", cache_dir=cache)
    base = path.parent
    for col in ("filepath", "file_name", "image_path", "path"):
        if col in ds.column_names:
            ds = ds.map(lambda r: {col: str((base / r[col]).resolve())})
            ds = ds.cast_column(col, datasets.Image())
            if col != "image" and "image" not in ds.column_names:
                ds = ds.rename_column(col, "image")
            break
    return ds


def local_base(source: str | None) -> Path | None:
    """The folder that relative image paths inside a local source are relative to (None for Hub ids and
    generated domains)."""
    if not source or source.startswith(OFFLINE_PREFIX):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return None
    return path if path.is_dir() else path.parent


def require_columns(ds, columns: dict[str, str], where: str, source: str = "dataset") -> None:
    """Raise DataError unless every ``{field: column}`` exists in ``ds``; the message names the field and
    ``source`` (the data file, folder or Hub id)."""
    for field, col in columns.items():
        if col not in ds.column_names:
            raise DataError(f"{where}.{field}: column {col!r} not in {source} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataError(f"{where}: the split is empty")
