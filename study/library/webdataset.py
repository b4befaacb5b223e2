"""WebDataset sources in CLIP_benchmark's layout: its benchmarks by name (``wds/vtab/pcam``), local folders in the
same layout, and bare lists of ``.tar`` shards.

CLIP_benchmark keeps its recommended benchmarks as WebDataset repos on the Hugging Face Hub,
``clip-benchmark/wds_<name with / as ->`` (``wds/vtab/pcam`` is ``clip-benchmark/wds_vtab-pcam``), each laid out as
its ``clip_benchmark.webdataset_builder.convert_dataset`` writes it::

    <root>/<split>/nshards.txt        the number of shards of the split
    <root>/<split>/0.tar, 1.tar ...   samples: <key>.webp|.png|.jpg|.jpeg + <key>.cls (class index) or .txt (captions)
    <root>/classnames.txt             one class name per line, in label order
    <root>/zeroshot_classification_templates.txt   one template per line, with {c}
    <root>/dataset_type.txt           "retrieval" for image-text retrieval (default: classification)

A ``wds/`` name is read through ``huggingface_hub`` (:func:`hub_root`), so the Hub's cache, ``HF_HUB_OFFLINE`` and
the user's token work as everywhere else: the small ``*.txt`` files at once, each shard when a split is read.
A split becomes a memory-mapped ``datasets.Dataset`` with columns ``image`` (``{bytes, path}``), ``label`` (int) and/or
``caption`` (list of lines), written shard by shard to ``<cache>/hf/wds-*`` (memory stays flat in the number of
shards), and from there goes through the same holdout, ``max_images`` sampling and image store as every source.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

from .errors import DataError

PREFIX = "wds/"
HUB_ORG = "clip-benchmark"
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference
META_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")
WRITER_BATCH = 64  # rows per Arrow record batch: a few MB of encoded images in memory at a time

# CLIP_benchmark's benchmarks kept as WebDatasets on the Hub (its benchmark/webdatasets.txt), without "wds/".
NAMES = (
    "mscoco_captions", "flickr8k", "flickr30k",  # retrieval
    "imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o", "objectnet",
    "fer2013", "voc2007", "sun397", "cars", "fgvc_aircraft", "mnist", "stl10", "gtsrb", "country211", "renderedsst2",
    "vtab/caltech101", "vtab/cifar10", "vtab/cifar100", "vtab/clevr_count_all", "vtab/clevr_closest_object_distance",
    "vtab/diabetic_retinopathy", "vtab/dmlab", "vtab/dsprites_label_orientation", "vtab/dsprites_label_x_position",
    "vtab/dsprites_label_y_position", "vtab/dtd", "vtab/eurosat", "vtab/kitti_closest_vehicle_distance",
    "vtab/flowers", "vtab/pets", "vtab/pcam", "vtab/resisc45", "vtab/smallnorb_label_azimuth",
    "vtab/smallnorb_label_elevation", "vtab/svhn",
)
_VTAB = [n for n in NAMES if n.startswith("vtab/") and n != "vtab/dsprites_label_y_position"]
# CLIP_benchmark's dataset collections (clip_benchmark.datasets.builder.dataset_collection), as WebDataset names
COLLECTIONS = {
    "vtab": [n for n in _VTAB if n != "vtab/cifar10"] + ["sun397"],
    "vtab+": ["imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet", "fer2013",
              "voc2007", "sun397", "cars", "fgvc_aircraft", "mnist", "stl10", "gtsrb", "country211", "renderedsst2",
              *_VTAB],
    "retrieval": ["mscoco_captions", "flickr8k", "flickr30k"],
    "imagenet_robustness": ["imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "objectnet"],
    "webdatasets": list(NAMES),
}


def repo_id(name: str) -> str:
    """``wds/vtab/pcam`` (or ``vtab/pcam``) -> ``clip-benchmark/wds_vtab-pcam``, as CLIP_benchmark names its repos."""
    return f"{HUB_ORG}/wds_{name.removeprefix(PREFIX).replace('/', '-')}"


def short_name(name: str) -> str:
    """``wds/vtab/pcam`` -> ``vtab-pcam``: a benchmark name usable in metric keys."""
    return name.removeprefix(PREFIX).replace("/", "-")


@dataclass(frozen=True)
class Meta:
    """What a WebDataset says about itself: its folder of metadata files, class names, templates, task, splits."""

    root: Optional[Path]  # None for a bare list of shards with no metadata beside them
    classnames: Optional[list] = None
    templates: Optional[list] = None
    task: Optional[str] = None  # "classification" or "retrieval" (dataset_type.txt); None when not said
    splits: tuple = ()  # splits with a nshards.txt
    revision: Optional[str] = None  # the Hub commit a wds/ name resolved to
    shards: tuple = field(default=())  # a bare list of shards (every split reads them)


def is_webdataset(source: Optional[str], data_files=None) -> bool:
    """Whether ``source`` (with ``data_files``) names a WebDataset: a ``wds/`` name, ``.tar`` shards (a path, a glob
    or a ``{0..9}`` range), ``source: webdataset`` with ``data_files``, or a folder in CLIP_benchmark's layout."""
    if not isinstance(source, str):
        return False
    if data_files is not None:
        return source == "webdataset"
    if source.startswith(PREFIX):
        return True
    if source.endswith(".tar"):
        return True
    return is_webdataset_folder(Path(source).expanduser())


def is_webdataset_folder(path: Path) -> bool:
    """A folder with CLIP_benchmark's metadata files or with ``<split>/nshards.txt`` / ``<split>/*.tar``."""
    if not path.is_dir():
        return False
    if any((path / f).is_file() for f in META_FILES):
        return True
    return any(path.glob("*/nshards.txt")) or any(path.glob("*/*.tar"))


def shard_paths(pattern: str, where: str) -> list[Path]:
    """The local shards a ``.tar`` source names: a path, a glob (``shards/*.tar``) or a range as webdataset writes
    it (``shards/{0..7}.tar``), sorted by number where the names are numbers."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        names = [pattern[:m.start()] + str(i).zfill(len(m.group(1))) + pattern[m.end():]
                 for i in range(int(m.group(1)), int(m.group(2)) + 1)]
    else:
        names = sorted(glob.glob(os.path.expanduser(pattern)), key=_natural) if glob.has_magic(pattern) else [pattern]
    paths = [Path(n).expanduser() for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise DataError(f"{where}: no such shard {(missing[0] if missing else pattern)!r}")
    return paths


def pattern_files(source: Optional[str]) -> list[str]:
    """The shards a ``.tar`` pattern source names (for cache keys: a shard rewritten in place changes the key); ``[]``
    for any other source, or a pattern that names nothing."""
    if not isinstance(source, str) or not source.endswith(".tar"):
        return []
    try:
        return [str(p) for p in shard_paths(source, "source")]
    except DataError:
        return []


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def meta_of(source: str, data_files=None, revision: Optional[str] = None, where: str = "source") -> Meta:
    """The :class:`Meta` of a WebDataset source (see :func:`is_webdataset`). Raises :class:`DataError` naming
    ``where``: a ``wds/`` name the Hub (or, offline, its cache) cannot give, a shard that does not exist."""
    if data_files is not None or source.endswith(".tar"):
        listed = data_files if data_files is not None else source
        listed = [listed] if isinstance(listed, str) else list(listed.values()) if isinstance(listed, dict) else listed
        shards = [p for item in listed for one in ([item] if isinstance(item, str) else item)
                  for p in shard_paths(str(one), where)]
        root = next((d for d in (shards[0].parent, shards[0].parent.parent)
                     if any((d / f).is_file() for f in META_FILES)), None)
        return _read_meta(root, tuple(shards))
    if source.startswith(PREFIX):
        root, commit = hub_root(source, revision, where)
        return _read_meta(root, (), commit)
    return _read_meta(Path(source).expanduser(), ())


def _read_meta(root: Optional[Path], shards: tuple, revision: Optional[str] = None) -> Meta:
    def lines(name: str) -> Optional[list[str]]:
        f = root / name if root is not None else None
        if f is None or not f.is_file():
            return None
        return [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]

    kind = lines("dataset_type.txt")
    splits = tuple(sorted(p.parent.name for p in root.glob("*/nshards.txt"))) if root is not None else ()
    return Meta(root, lines("classnames.txt"), lines("zeroshot_classification_templates.txt"),
                kind[0].lower() if kind else None, splits, revision, shards)


@lru_cache(maxsize=64)
def hub_root(name: str, revision: Optional[str], where: str) -> tuple[Path, str]:
    """``(folder, commit)``: the ``*.txt`` files of CLIP_benchmark's Hub repo for ``name`` (``wds/vtab/pcam``), through
    ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE`` and token), at ``revision`` (default: main).
    Remembered per process: every benchmark part then reads the same commit."""
    from huggingface_hub import snapshot_download

    repo = repo_id(name)
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=["*.txt"])
    except Exception as exc:  # offline without a cached copy, no such repo, no access: the user needs the repo named
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise DataError(f"{where}: cannot read CLIP_benchmark's WebDataset {name!r} (Hugging Face dataset {repo!r}): "
                        f"{text}") from None
    return Path(folder), Path(folder).name


def split_shards(meta: Meta, source: str, split: str, where: str) -> list[Path]:
    """The local shard files of ``split``: a bare list's shards, a folder's ``<split>/0.tar`` ... (``nshards.txt`` of
    them), or a ``wds/`` name's, each fetched through ``huggingface_hub.hf_hub_download`` (cached)."""
    if meta.shards:
        return list(meta.shards)
    count = meta.root / split / "nshards.txt"
    if not count.is_file():
        raise DataError(f"{where}: WebDataset {source!r} has no {split}/nshards.txt (the shard count of split "
                        f"{split!r}; splits with one: {list(meta.splits)})")
    try:
        n = int(count.read_text().strip())
    except ValueError:
        raise DataError(f"{where}: {count}: not a number of shards ({count.read_text()[:40]!r})") from None
    if not source.startswith(PREFIX):
        return [p for i in range(n) for p in shard_paths(str(meta.root / split / f"{i}.tar"), where)]
    from huggingface_hub import hf_hub_download

    out = []
    for i in range(n):
        try:
            out.append(Path(hf_hub_download(repo_id(source), f"{split}/{i}.tar", repo_type="dataset",
                                            revision=meta.revision)))
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise DataError(f"{where}: cannot fetch shard {split}/{i}.tar of {repo_id(source)!r}: {text}") from None
    return out


def labelled(meta: Meta, source: str, split: str, where: str) -> bool:
    """Whether a WebDataset's samples are class-labelled images without captions: its ``dataset_type.txt`` says
    classification or, when it says nothing, the first sample of ``split`` has a ``.cls`` member and no ``.txt``."""
    if meta.task:
        return meta.task == "classification"
    gen = samples(split_shards(meta, source, split, where)[0], where)
    first = next(gen, None)
    gen.close()
    return first is not None and first["cls"] is not None and first["txt"] is None


def samples(shard: Path, where: str) -> Iterator[dict]:
    """The samples of one ``.tar`` shard in order, as webdataset groups members: by key (the member's path up to the
    first ``.`` of its file name). Yields ``{"__key__", "image", "image_path", "cls", "txt"}`` (absent members None);
    the image is the first member with an image extension (webp, png, jpg, jpeg). Raises :class:`DataError` for a
    shard that is not a tar file or holds no image member."""
    current, seen, images = None, 0, 0
    try:
        with tarfile.open(shard, "r|*") as tar:  # streamed: one member in memory at a time
            for member in tar:
                if not member.isfile():
                    continue
                seen += 1
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if current is not None and current["__key__"] != key:
                    images += current["image"] is not None
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "image": None, "image_path": None, "cls": None, "txt": None}
                data = tar.extractfile(member).read()
                _take(current, ext.lower() if dot else "", data, member.name)
    except tarfile.TarError as exc:
        raise DataError(f"{where}: {shard}: not a readable tar shard ({exc})") from None
    if current is not None:
        images += current["image"] is not None
        yield current
    if not images:
        raise DataError(f"{where}: {shard}: no image member (.{', .'.join(IMAGE_EXTENSIONS)}) among its {seen} members")


def _take(sample: dict, ext: str, data: bytes, name: str) -> None:
    last = ext.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS and sample["image"] is None:
        sample["image"], sample["image_path"] = data, name
    elif ext == "cls":
        sample["cls"] = int(data.decode("utf-8").strip())
    elif ext == "txt":
        sample["txt"] = [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]


def load_split(source: str, split: str, *, cache_dir: Path, data_files=None, revision: Optional[str] = None,
               where: str = "source"):
    """Split ``split`` (a name; :func:`~study.library.sources.load_source` slices) of a WebDataset source as a
    memory-mapped ``datasets.Dataset`` (columns ``image`` as ``{bytes, path}``, ``label`` and/or ``caption``,
    ``__key__``), written once to ``<cache>/hf/wds-<key>`` (keyed by the shards' paths, sizes and times) and reused.
    Samples without an image are skipped. Raises :class:`DataError` naming ``where``."""
    from .cache import fingerprint, source_stamp

    meta = meta_of(source, data_files, revision, where)
    shards = split_shards(meta, source, split, where)
    key = fingerprint("wds-v1", [str(s) for s in shards], source_stamp([str(s) for s in shards]))
    path = Path(cache_dir) / "hf" / f"wds-{key}"
    if not (path / "data.arrow").is_file():
        _write_split(shards, path, where)
    import datasets

    return datasets.Dataset.from_file(str(path / "data.arrow"))


def _write_split(shards: list[Path], path: Path, where: str) -> None:
    """Write every sample of ``shards`` into ``path/data.arrow`` through a temporary folder renamed into place."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    first = next(samples(shards[0], where))
    columns = {"image": datasets.Image(), "__key__": datasets.Value("string")}
    if first["cls"] is not None:
        columns["label"] = datasets.Value("int64")
    if first["txt"] is not None:
        columns["caption"] = datasets.Sequence(datasets.Value("string"))
    features = datasets.Features(columns)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    tmp.mkdir(parents=True)
    try:
        with ArrowWriter(features=features, path=str(tmp / "data.arrow")) as writer:
            batch = {c: [] for c in columns}
            for s in (s for shard in shards for s in samples(shard, where) if s["image"] is not None):
                batch["image"].append({"bytes": s["image"], "path": s["image_path"]})
                batch["__key__"].append(s["__key__"])
                if "label" in batch:
                    batch["label"].append(s["cls"])
                if "caption" in batch:
                    batch["caption"].append(s["txt"] or [])
                if len(batch["image"]) == WRITER_BATCH:  # a record batch of columns: no per-row encoding
                    writer.write_batch(batch)
                    batch = {c: [] for c in columns}
            if batch["image"]:
                writer.write_batch(batch)
            writer.finalize()
        tmp.rename(path)
    except OSError:
        if not (path / "data.arrow").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same split first: theirs is identical
