"""Benchmark specs: one small YAML file per zero-shot benchmark, validated into :class:`BenchmarkSpec`.

A spec says where the images are (a Hugging Face dataset id, an image folder,
Parquet/Arrow files, an open_clip-style CSV, a WebDataset, or a generated ``offline:`` domain),
which split and columns to read, the class names, the prompts (templates with
``{c}``, or per-class prompts as in CuPL) and the task: ``classification`` or
image-text ``retrieval`` on held-out captions.

Shipped specs live in ``study/benchmark_specs/`` and are named by file stem
(``micrographs``, ``pcam``, ``cifar10``...); a study may also name a spec by
path, or write one inline. CLIP_benchmark's benchmarks are named as it names them, ``wds/vtab/pcam``
(:mod:`.webdataset`): a WebDataset's class names, templates, task and train split come from its own files,
unless the spec sets them. Every error names the spec file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..vocabulary import ROLES
from . import webdataset
from .cache import fingerprint, save_atomic, source_stamp, store_cache, touch
from .rows import Holdout, apply_holdout, class_index, sample_rows, stratified_split
from .sources import DataError, EmptySplitError, load_source, local_base
from .store import ImageStore, build_store, is_store
from .yamlfile import YamlFileError, read_yaml

SPECS_DIR = Path(__file__).resolve().parent.parent / "benchmark_specs"
Task = Literal["classification", "retrieval"]


NAME_CHARS = r"[\w.\-]+"  # valid in MLflow metric keys and in file names on every system


def usable_name(stem: str) -> str:
    """A file stem as a benchmark name: runs of other characters become ``_`` (``"my set (v2)"`` ->
    ``"my_set_v2"``)."""
    return re.sub(r"[^\w.\-]+", "_", stem).strip("_") or "benchmark"


class SpecError(DataError):
    """A benchmark spec that cannot be used; ``str()`` is one line naming the spec file and field."""


class BenchmarkSpec(BaseModel):
    """One zero-shot benchmark. Field comments are the documentation users read in the YAML files."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("", description="short name used in metric keys; default: the file stem")
    description: str = ""
    task: Task = "classification"
    source: str = Field(description="hub id, local folder/file, 'offline:<domain>', or a builder "
                                    "('parquet', 'csv', 'imagefolder') when data_files is set")
    config: Optional[str] = Field(None, description="Hugging Face dataset config name")
    revision: Optional[str] = Field(None, description="Hugging Face revision (branch, tag or commit)")
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = None
    split: str = Field("test", description="split name, or a slice as datasets writes it: 'train[80%:]'")
    holdout: Optional[Holdout] = Field(None, description="{share, take: held_out}: the held-out part of `split` "
                                       "(the fine-tuning set takes the rest with the same share)")
    validation_split: Optional[str] = Field(None, description="the dataset's own validation split; when unset, "
                                            "`split` is divided into validation and test parts (seeded, stratified)")
    image_column: str = "image"
    label_column: str = "label"  # classification
    caption_column: str = "caption"  # retrieval: a string or a list of strings per image
    classnames: Optional[Union[list[str], dict[int, str]]] = Field(
        None, description="list, or {label: name} (gaps and a start at 1 allowed); default: the label column's "
                          "ClassLabel names, or its distinct string labels")
    templates: Union[list[str], dict[str, list[str]]] = Field(
        ["a photo of a {c}."], description="templates with {c}, or {class name: [prompts]} (CuPL)")
    max_images: Optional[int] = Field(None, ge=1, description="evaluate on about N images, a seeded sample "
                                      "stratified by label")
    max_undecodable_share: float = Field(0.01, ge=0, le=1, description="skip and count images that cannot be "
                                         "decoded; stop when more than this share fail")
    train_split: Union[str, Literal[False], None] = Field(
        None, description="the split the linear probe is fit on (classification); default: a WebDataset's 'train' "
                          "when it has one; false, or none found: the probe is fit on the validation part")
    train_max_images: Optional[int] = Field(None, ge=1, description="fit the linear probe on about N images of "
                                            "train_split, a seeded sample stratified by label (default: all)")
    origin: str = Field("", description="set by the loader: the spec file (or study file and field)")

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v and not re.fullmatch(NAME_CHARS, v):
            raise ValueError(f"{v!r} names metric keys and cache folders: use letters, digits, '_', '-' and '.'")
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("no templates")
            for t in v:
                if "{c}" not in t:
                    raise ValueError(f"template {t!r} has no '{{c}}' slot for the class name")
        else:
            for name, prompts in v.items():
                if not prompts:
                    raise ValueError(f"class {name!r} has no prompts")
        return v

    @model_validator(mode="after")
    def _cupl_covers_classes(self):
        if isinstance(self.templates, dict) and self.classnames is not None:
            missing = [c for c in self.class_list() if c not in self.templates]
            if missing:
                raise ValueError(f"templates: per-class prompts missing for {missing[:3]}")
        return self

    def class_list(self) -> list[str]:
        """Class names in label order (a mapping's labels sorted)."""
        if isinstance(self.classnames, dict):
            return [self.classnames[k] for k in sorted(self.classnames)]
        return list(self.classnames or [])

    def where(self, field_name: str) -> str:
        """``<spec file>: <field>``, or ``<study file>: data.<role>.<i>.<field>`` for an inline spec."""
        origin = self.origin or self.name
        return f"{origin}.{field_name}" if ": " in origin else f"{origin}: {field_name}"


def _fmt(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
    msg = e["msg"].removeprefix("Value error, ")
    got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r})"
    return f"{loc or '<top>'}: {msg}{got}"


def shipped_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPECS_DIR.glob("*.yaml"))}


def spec_from_dict(raw: dict, origin: str, default_name: str) -> BenchmarkSpec:
    """Validate a spec mapping, a WebDataset's completed from its own files (:func:`source_metadata`); errors read
    ``<origin>: <field>: <problem>``."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping, got {type(raw).__name__}")
    origin = raw.get("origin") or origin  # a spec resolved earlier keeps the file it came from
    try:
        spec = BenchmarkSpec.model_validate({**raw, "origin": origin})
        if update := source_metadata(spec):  # what the spec sets itself wins: it is in raw
            spec = BenchmarkSpec.model_validate({**update, **raw, "origin": origin})
    except ValidationError as err:
        raise SpecError(f"{origin}{'.' if ': ' in origin else ': '}{_fmt(err)}") from None
    return spec if spec.name else spec.model_copy(update={"name": default_name})


def source_metadata(spec: BenchmarkSpec) -> dict:
    """For a WebDataset source, the fields its own files give and the spec leaves unset: ``task`` (``dataset_type.txt``),
    ``classnames`` (``classnames.txt``), ``templates`` (``zeroshot_classification_templates.txt``), ``train_split``
    (``train`` when it has ``train/nshards.txt``) and, for a ``wds/`` name, ``revision`` pinned to the Hub commit
    read (so every trial and node decodes the same data). ``{}`` for other sources. Raises :class:`SpecError` when a
    classification WebDataset has no class names and the spec lists none."""
    if not webdataset.is_webdataset(spec.source, spec.data_files):
        return {}
    try:
        meta = webdataset.meta_of(spec.source, spec.data_files, spec.revision, spec.where("source"))
    except DataError as exc:
        raise SpecError(str(exc)) from None
    given, out = spec.model_fields_set, {}
    if meta.task not in (None, "classification", "retrieval"):
        raise SpecError(f"{spec.where('source')}: {spec.source!r} is a {meta.task!r} dataset (dataset_type.txt); "
                        f"the study evaluates classification and retrieval")
    if "task" not in given and meta.task:
        out["task"] = meta.task
    if out.get("task", spec.task) == "classification":
        if "classnames" not in given and not meta.classnames:
            raise SpecError(f"{spec.where('classnames')}: WebDataset {spec.source!r} has no classnames.txt; list the "
                            f"class names in label order in the spec (classnames: [...])")
        if "classnames" not in given:
            out["classnames"] = meta.classnames
        if "templates" not in given and meta.templates:
            out["templates"] = meta.templates
        if "train_split" not in given and "train" in meta.splits and spec.split.split("[")[0] != "train":
            out["train_split"] = "train"
    if meta.revision and spec.revision is None:
        out["revision"] = meta.revision
    return out


def load_spec(ref: str) -> BenchmarkSpec:
    """A spec by shipped name (``pcam``), by CLIP_benchmark's name (``wds/vtab/pcam``: its Hub WebDataset, named
    ``vtab-pcam`` in metric keys) or by path to a YAML file."""
    if ref.startswith(webdataset.PREFIX):
        return spec_from_dict({"source": ref}, ref, usable_name(webdataset.short_name(ref)))
    specs = shipped_specs()
    path = specs.get(ref) or Path(ref).expanduser()
    if not path.is_file():
        raise SpecError(f"{ref}: no such benchmark spec; shipped specs: {', '.join(specs)} (or a CLIP_benchmark "
                        f"WebDataset, wds/<name>, or the path of a YAML file)")
    try:
        raw = read_yaml(path)
    except (YamlFileError, UnicodeDecodeError) as exc:
        raise SpecError(str(exc) if isinstance(exc, YamlFileError) else f"{path}: not a text file") from None
    return spec_from_dict(raw, str(path), usable_name(path.stem))


def resolve(ref: Union[str, dict], origin: str, default_name: str) -> BenchmarkSpec:
    """A study's benchmark reference (a spec name or path, or an inline mapping) as a spec."""
    if isinstance(ref, str):
        return load_spec(ref)
    return spec_from_dict(ref, origin, default_name)


# ----------------------------------------------------------------- loading
def load_split(spec: BenchmarkSpec, cache_dir: Path, seed: int = 0, scale: float = 1.0):
    """The spec's split as a ``datasets.Dataset``, columns and class names checked."""
    try:
        ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=seed, scale=scale,
                         config=spec.config, revision=spec.revision, data_files=spec.data_files,
                         where=spec.where("source"))
    except EmptySplitError:
        ds = []
    except DataError as exc:
        raise SpecError(str(exc)) from None
    if len(ds) == 0:
        raise SpecError(f"{spec.where('split')}: split {spec.split!r} is empty")
    needed = {"image_column": spec.image_column}
    needed["label_column" if spec.task == "classification" else "caption_column"] = (
        spec.label_column if spec.task == "classification" else spec.caption_column)
    for fld, col in needed.items():
        if col not in ds.column_names:
            hint = ("; an image folder with a single class sub-folder has no label column, and zero-shot "
                    "classification needs at least 2 classes" if fld == "label_column" and
                    ds.column_names == [spec.image_column] else "")
            raise SpecError(f"{spec.where(fld)}: column {col!r} not in split {spec.split!r} of {spec.source} "
                            f"(columns: {ds.column_names}){hint}")
    ds = apply_holdout(ds, spec.holdout, seed)
    return sample_rows(ds, spec.max_images, seed, spec.label_column if spec.task == "classification" else None)


def classes_of(spec: BenchmarkSpec, ds) -> tuple[list[str], torch.Tensor]:
    """``(class names, labels [N])`` of a classification split: labels as ``0..C-1``, string labels and
    class maps with gaps handled (:func:`~study.library.rows.class_index`). Raises :class:`SpecError` when a
    label has no name, or fewer than 2 classes are present."""
    feature = ds.features[spec.label_column]
    try:
        names, labels = class_index(ds[spec.label_column], spec.classnames, getattr(feature, "names", None),
                                    spec.where("label_column"), spec.where("classnames"))
    except DataError as exc:
        raise SpecError(str(exc)) from None
    present = len(set(labels.tolist()))
    if present < 2:
        at = "max_images" if spec.max_images else "split"
        raise SpecError(f"{spec.where(at)}: only {present} class present in {len(labels)} images; zero-shot "
                        f"classification needs at least 2")
    if isinstance(spec.templates, dict):
        missing = [c for c in names if c not in spec.templates]
        if missing:
            raise SpecError(f"{spec.where('templates')}: per-class prompts missing for {missing[:3]}")
    return names, torch.from_numpy(labels)


def check(spec: BenchmarkSpec, cache_dir: Path, seed: int = 0, scale: float = 1.0) -> int:
    """Validate everything but the pixels (cheap); returns the number of images."""
    ds = load_split(spec, cache_dir, seed, scale)
    if spec.task == "classification":
        classes_of(spec, ds)
    return len(ds)


@dataclass
class EvalSet:
    """A benchmark decoded for one model's preprocessing."""

    spec: BenchmarkSpec
    role: str  # "specialized" | "general"
    primary: bool  # the role's headline benchmark: its metrics are "<split>/<role>_<metric>"
    images: ImageStore  # [N, 3, H, W] on disk, read in batches
    labels: Optional[torch.Tensor] = None  # [N] (classification)
    classnames: list[str] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)  # per class (classification)
    captions: list[str] = field(default_factory=list)  # retrieval: every caption
    caption_image: Optional[torch.Tensor] = None  # [T]: the image each caption belongs to
    skipped: int = 0  # images that could not be decoded
    fingerprint: str = ""  # identifies spec + preprocessing + part: the key of cached embeddings
    # "val" (chooses: objectives, ASHA, the WiSE-FT alpha, the best trial), "test" (reports), or "" for a
    # whole benchmark evaluated alone (python -m study.evaluate)
    split: str = ""

    @property
    def key(self) -> str:
        """Metric prefix: ``test/specialized_`` for the headline benchmark, else ``test/specialized/<name>/``
        (no ``test/`` for a whole benchmark)."""
        part = f"{self.split}/" if self.split else ""
        return f"{part}{self.role}_" if self.primary else f"{part}{self.role}/{self.spec.name}/"

    @property
    def label(self) -> str:
        """Name for artifacts and predictions: ``test_specialized`` for the headline benchmark, else
        ``test_<spec name>`` (no ``test_`` for a whole benchmark)."""
        name = self.role if self.primary else self.spec.name
        return f"{self.split}_{name}" if self.split else name


def part(s: EvalSet, idx: torch.Tensor, split: str) -> EvalSet:
    """The images ``idx`` of ``s`` as its ``split`` part (retrieval: with their captions)."""
    out = EvalSet(s.spec, s.role, s.primary, s.images.subset(idx), None if s.labels is None else s.labels[idx],
                  s.classnames, s.prompts, skipped=s.skipped, fingerprint=f"{s.fingerprint}-{split}", split=split)
    if s.caption_image is not None:
        new_id = {int(old): new for new, old in enumerate(idx.tolist())}
        keep = [i for i, img in enumerate(s.caption_image.tolist()) if img in new_id]
        out.captions = [s.captions[i] for i in keep]
        out.caption_image = torch.tensor([new_id[int(s.caption_image[i])] for i in keep])
    return out


def validation_and_test(spec: BenchmarkSpec, role: str, primary: bool, cache_dir: Path, preprocess, seed: int = 0,
                        scale: float = 1.0, share: float = 0.5) -> list[EvalSet]:
    """``[validation part, test part]`` of one benchmark: the spec's own ``validation_split`` when it names
    one, else its ``split`` divided by :func:`~study.library.rows.stratified_split` (retrieval: by image)
    with ``share``."""
    if spec.validation_split:
        val = decode(spec.model_copy(update={"split": spec.validation_split}), role, primary, cache_dir, preprocess,
                     seed, scale)
        test = decode(spec, role, primary, cache_dir, preprocess, seed, scale)
        val.split, test.split = "val", "test"  # their fingerprints differ already: the split is in the spec
        return [val, test]
    whole = decode(spec, role, primary, cache_dir, preprocess, seed, scale)
    labels = whole.labels if whole.labels is not None else torch.zeros(len(whole.images), dtype=torch.long)
    val_idx, test_idx = stratified_split(labels, share, seed)
    return [part(whole, val_idx, "val"), part(whole, test_idx, "test")]


def class_prompts(spec: BenchmarkSpec, classnames: list[str]) -> list[list[str]]:
    if isinstance(spec.templates, dict):
        return [list(spec.templates[c]) for c in classnames]
    return [[t.format(c=c) for t in spec.templates] for c in classnames]


def store_key(spec: BenchmarkSpec, preprocess, seed: int, scale: float) -> str:
    """Names a benchmark's decoded store: the spec, the preprocessing, the data seed and the content stamp of
    every local file it reads (a dataset edited in place is decoded again)."""
    return fingerprint(spec.model_dump_json(exclude={"origin", "description"}), repr(preprocess), seed, scale,
                       source_stamp(spec.source, spec.data_files, webdataset.pattern_files(spec.source)))


def decode(spec: BenchmarkSpec, role: str, primary: bool, cache_dir: Path, preprocess, seed: int = 0,
           scale: float = 1.0) -> EvalSet:
    """Load, check and decode ``spec`` for ``preprocess`` into an on-disk store under ``<cache>/stores``,
    built once (keyed by :func:`store_key`) and reused by later calls: other trials, other workers."""
    key = store_key(spec, preprocess, seed, scale)
    path = store_cache(cache_dir) / f"{spec.name}-{key}"
    meta = path.with_name(path.name + ".eval.pt")
    if not (meta.exists() and is_store(path)):  # pruning may have taken one of the two
        save_atomic(_decode_fresh(spec, cache_dir, preprocess, seed, scale, path), meta)
    state = torch.load(touch(meta), weights_only=True)
    images = ImageStore(touch(path), preprocess)
    if state.get("positions") is not None:  # retrieval: the images left with at least one caption
        images = images.subset(state["positions"])
    return EvalSet(spec, role, primary, images, state["labels"], state["classnames"],
                   state["prompts"], state["captions"], state["caption_image"], state["skipped"], key)


def _decode_fresh(spec: BenchmarkSpec, cache_dir: Path, preprocess, seed: int, scale: float, path: Path) -> dict:
    """Build the store at ``path``; returns what the store does not hold (labels, prompts, captions)."""
    ds = load_split(spec, cache_dir, seed, scale)
    try:
        store, skipped = build_store(ds, spec.image_column, preprocess, path, where=spec.where("image_column"),
                                     title=f"benchmark {spec.name!r} split {spec.split!r}",
                                     max_bad_share=spec.max_undecodable_share, base_dir=local_base(spec.source))
    except DataError as exc:
        raise SpecError(str(exc)) from None
    ds = ds.select(store.rows.tolist())
    out = {"labels": None, "classnames": [], "prompts": [], "captions": [], "caption_image": None, "skipped": skipped}
    if spec.task == "classification":
        out["classnames"], out["labels"] = classes_of(spec, ds)
        out["prompts"] = class_prompts(spec, out["classnames"])
        return out
    owner, empty, positions = [], 0, []
    for i, caps in enumerate(ds[spec.caption_column]):
        caps = [caps] if isinstance(caps, str) or caps is None else list(caps)
        good = [str(c) for c in caps if c is not None and str(c).strip()]
        empty += len(caps) - len(good)
        if good:  # an image with no caption left can never be a hit: it leaves the benchmark
            out["captions"] += good
            owner += [len(positions)] * len(good)
            positions.append(i)
    if empty:
        print(f"[data] {spec.name}: skipped {empty} empty or missing captions "
              f"({len(ds) - len(positions)} images left with none)", flush=True)
    if not owner:
        raise SpecError(f"{spec.where('caption_column')}: no captions in column {spec.caption_column!r}")
    out["caption_image"], out["positions"] = torch.tensor(owner), positions
    return out


def eval_sets(data, cache_dir: Path, preprocess, roles=ROLES, validation_share: float = 0.5) -> list[EvalSet]:
    """Every benchmark of ``roles`` in a study's data section (:class:`~study.config.DataSection`, specs
    resolved), decoded for ``preprocess`` and split into validation and test parts (seeded by the data
    seed); stores under ``<cache>/stores``. Order: per benchmark, validation then test."""
    return [s for role in roles for i, spec in enumerate(data.specs(role))
            for s in validation_and_test(spec, role, i == 0, cache_dir, preprocess, data.seed, data.offline_scale,
                                         validation_share)]


def probe_pairs(sets: list[EvalSet], cache_dir: Path, preprocess, seed: int = 0, scale: float = 1.0,
                verbose: bool = False) -> list[tuple[EvalSet, EvalSet]]:
    """``(fit, test)`` for the linear probe (:mod:`.probe`) of every classification benchmark in ``sets`` (validation
    and test parts, as :func:`eval_sets` gives them): the probe is fit on the spec's ``train_split`` (decoded like the
    benchmark into a store of its own, sampled to ``train_max_images``, part ``train``) or, when it has none, on the
    benchmark's validation part, and scored on its test part, the images of the zero-shot test numbers. ``verbose``:
    say what each train split gave."""
    out = []
    for test in [s for s in sets if s.split == "test" and s.spec.task == "classification"]:
        if test.spec.train_split:
            spec = test.spec.model_copy(update={"split": test.spec.train_split, "max_images": test.spec.train_max_images,
                                                "holdout": None, "validation_split": None})
            fit = decode(spec, test.role, test.primary, cache_dir, preprocess, seed, scale)
            fit.split = "train"
            fit = in_class_order(fit, test.classnames)
            if verbose:
                print(f"[data] {test.spec.name}: the linear probe is fit on {len(fit.images)} images of split "
                      f"{spec.split!r} (train_max_images samples it; train_split: false fits on the validation part)",
                      flush=True)
        else:
            fit = next(s for s in sets if s.split == "val" and s.role == test.role and s.spec.name == test.spec.name)
        out.append((fit, test))
    return out


def in_class_order(s: EvalSet, classnames: list[str]) -> EvalSet:
    """``s`` with its labels in the order of ``classnames`` (another split's), its images of other classes left out
    (a split whose class names come from its own string labels may order or hold them differently)."""
    if s.classnames == classnames:
        return s
    from dataclasses import replace

    index = {c: i for i, c in enumerate(classnames)}
    mapped = [index.get(s.classnames[int(y)], -1) for y in s.labels]
    keep = [i for i, y in enumerate(mapped) if y >= 0]
    return replace(s, images=s.images.subset(keep), labels=torch.tensor([mapped[i] for i in keep]),
                   classnames=list(classnames), prompts=class_prompts(s.spec, list(classnames)),
                   fingerprint=f"{s.fingerprint}-as-{fingerprint(classnames)}")


def check_benchmarks(data, cache_dir: Path) -> dict[str, int]:
    """Load every benchmark's split of a data section and check columns and class names (no decoding):
    ``{name: images}``."""
    return {spec.name: check(spec, cache_dir, data.seed, data.offline_scale)
            for role in ROLES for spec in data.specs(role)}
