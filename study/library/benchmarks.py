"""Benchmark specs: one small YAML file per zero-shot benchmark, validated into :class:`BenchmarkSpec`.

A spec says where the images are (a Hugging Face dataset id, an image folder,
Parquet/Arrow files, an open_clip-style CSV, or a generated ``offline:`` domain),
which split and columns to read, the class names, the prompts (templates with
``{c}``, or per-class prompts as in CuPL) and the task: ``classification`` or
image-text ``retrieval`` on held-out captions.

Shipped specs live in ``study/benchmark_specs/`` and are named by file stem
(``micrographs``, ``pcam``, ``cifar10``...); a study may also name a spec by
path, or write one inline. Every error names the spec file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..vocabulary import ROLES
from .cache import MAX_CACHED_BYTES, fingerprint, save_atomic, source_stamp, tensor_cache
from .images import images_to_tensor
from .sources import DataError, EmptySplitError, load_source

SPECS_DIR = Path(__file__).resolve().parent.parent / "benchmark_specs"
Task = Literal["classification", "retrieval"]


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
    split: str = "test"
    validation_split: Optional[str] = Field(None, description="the dataset's own validation split; when unset, "
                                            "`split` is divided into validation and test parts (seeded, stratified)")
    image_column: str = "image"
    label_column: str = "label"  # classification
    caption_column: str = "caption"  # retrieval: a string or a list of strings per image
    classnames: Optional[Union[list[str], dict[int, str]]] = Field(
        None, description="list, or {label: name}; default: the label column's ClassLabel names")
    templates: Union[list[str], dict[str, list[str]]] = Field(
        ["a photo of a {c}."], description="templates with {c}, or {class name: [prompts]} (CuPL)")
    max_images: Optional[int] = Field(None, ge=1, description="evaluate on the first N images only")
    max_undecodable_share: float = Field(0.01, ge=0, le=1, description="skip and count images that cannot be "
                                         "decoded; stop when more than this share fail")
    origin: str = Field("", description="set by the loader: the spec file (or study file and field)")

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
        """Class names in label order (a mapping's missing labels are empty)."""
        if isinstance(self.classnames, dict):
            return [self.classnames.get(i, "") for i in range(max(self.classnames) + 1)]
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
    """Validate a spec mapping; errors read ``<origin>: <field>: <problem>``."""
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping, got {type(raw).__name__}")
    origin = raw.get("origin") or origin  # a spec resolved earlier keeps the file it came from
    try:
        spec = BenchmarkSpec.model_validate({**raw, "origin": origin})
    except ValidationError as err:
        raise SpecError(f"{origin}{'.' if ': ' in origin else ': '}{_fmt(err)}") from None
    return spec if spec.name else spec.model_copy(update={"name": default_name})


def load_spec(ref: str) -> BenchmarkSpec:
    """A spec by shipped name (``pcam``) or by path to a YAML file."""
    specs = shipped_specs()
    path = specs.get(ref) or Path(ref).expanduser()
    if not path.is_file():
        raise SpecError(f"{ref}: no such benchmark spec; shipped specs: {', '.join(specs)} "
                        f"(or give the path of a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    return spec_from_dict(raw, str(path), path.stem)


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
            raise SpecError(f"{spec.where(fld)}: column {col!r} not in split {spec.split!r} "
                            f"(columns: {ds.column_names})")
    if spec.max_images and len(ds) > spec.max_images:
        ds = ds.select(range(spec.max_images))
    return ds


def classnames_for(spec: BenchmarkSpec, ds) -> list[str]:
    """Class names in label order; every label in ``ds`` must have one."""
    if spec.classnames is None:
        names = getattr(ds.features[spec.label_column], "names", None)
        if not names:
            raise SpecError(f"{spec.where('classnames')}: label column {spec.label_column!r} has no class "
                            f"names; list them in the spec")
        names = list(names)
    else:
        names = spec.class_list()
    labels = {int(y) for y in ds[spec.label_column]}
    bad = sorted(y for y in labels if not 0 <= y < len(names) or not names[y])
    if bad:
        raise SpecError(f"{spec.where('classnames')}: {len(names)} class names do not cover labels {bad[:5]}")
    if isinstance(spec.templates, dict):
        missing = [c for c in names if c not in spec.templates]
        if missing:
            raise SpecError(f"{spec.where('templates')}: per-class prompts missing for {missing[:3]}")
    return names


def check(spec: BenchmarkSpec, cache_dir: Path, seed: int = 0, scale: float = 1.0) -> int:
    """Validate everything but the pixels (cheap); returns the number of images."""
    ds = load_split(spec, cache_dir, seed, scale)
    if spec.task == "classification":
        classnames_for(spec, ds)
    return len(ds)


@dataclass
class EvalSet:
    """A benchmark decoded for one model's preprocessing."""

    spec: BenchmarkSpec
    role: str  # "specialized" | "general"
    primary: bool  # the role's headline benchmark: its metrics are "<split>/<role>_<metric>"
    images: torch.Tensor  # [N, 3, H, W]
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


def stratified_split(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(validation, test)`` of a seeded split of ``labels`` ``[N]``, stratified: each class puts
    ``round(share * n_class)`` of its items (at least 1 when it has 2 or more) into validation. Disjoint,
    covering, and the same for the same labels and seed."""
    gen = torch.Generator().manual_seed(seed)
    val, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(len(idx) - 1, max(1, round(share * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:k])
        test.append(idx[k:])
    return torch.sort(torch.cat(val)).values, torch.sort(torch.cat(test)).values


def part(s: EvalSet, idx: torch.Tensor, split: str) -> EvalSet:
    """The images ``idx`` of ``s`` as its ``split`` part (retrieval: with their captions)."""
    out = EvalSet(s.spec, s.role, s.primary, s.images[idx], None if s.labels is None else s.labels[idx],
                  s.classnames, s.prompts, skipped=s.skipped, fingerprint=f"{s.fingerprint}-{split}", split=split)
    if s.caption_image is not None:
        new_id = {int(old): new for new, old in enumerate(idx.tolist())}
        keep = [i for i, img in enumerate(s.caption_image.tolist()) if img in new_id]
        out.captions = [s.captions[i] for i in keep]
        out.caption_image = torch.tensor([new_id[int(s.caption_image[i])] for i in keep])
    return out


def validation_and_test(spec: BenchmarkSpec, role: str, primary: bool, cache_dir: Path, preprocess, seed: int = 0,
                        scale: float = 1.0, share: float = 0.5, tensor_cache: Optional[Path] = None) -> list[EvalSet]:
    """``[validation part, test part]`` of one benchmark: the spec's own ``validation_split`` when it names
    one, else its ``split`` divided by :func:`stratified_split` (retrieval: by image) with ``share``."""
    if spec.validation_split:
        val = decode(spec.model_copy(update={"split": spec.validation_split}), role, primary, cache_dir, preprocess,
                     seed, scale, tensor_cache)
        test = decode(spec, role, primary, cache_dir, preprocess, seed, scale, tensor_cache)
        val.split, test.split = "val", "test"  # their fingerprints differ already: the split is in the spec
        return [val, test]
    whole = decode(spec, role, primary, cache_dir, preprocess, seed, scale, tensor_cache)
    labels = whole.labels if whole.labels is not None else torch.zeros(len(whole.images), dtype=torch.long)
    val_idx, test_idx = stratified_split(labels, share, seed)
    return [part(whole, val_idx, "val"), part(whole, test_idx, "test")]


def class_prompts(spec: BenchmarkSpec, classnames: list[str]) -> list[list[str]]:
    if isinstance(spec.templates, dict):
        return [list(spec.templates[c]) for c in classnames]
    return [[t.format(c=c) for t in spec.templates] for c in classnames]


def decode(spec: BenchmarkSpec, role: str, primary: bool, cache_dir: Path, preprocess, seed: int = 0,
           scale: float = 1.0, tensor_cache: Optional[Path] = None) -> EvalSet:
    """Load, check and decode ``spec`` for ``preprocess``.

    With ``tensor_cache`` (a folder), the decoded tensors are saved there once, keyed by the spec and the
    preprocessing, and later calls (other trials, other epochs' workers) load them instead of decoding.
    """
    key = fingerprint(spec.model_dump_json(exclude={"origin", "description"}), repr(preprocess), seed, scale,
                      source_stamp(spec.source))  # a local dataset edited in place is read again
    cached = tensor_cache / f"{spec.name}-{key}.pt" if tensor_cache else None
    if cached and cached.exists():
        state = torch.load(cached, weights_only=True)
        return EvalSet(spec, role, primary, state["images"], state.get("labels"), state["classnames"],
                       state["prompts"], state["captions"], state.get("caption_image"), state["skipped"], key)
    out = _decode_fresh(spec, role, primary, cache_dir, preprocess, seed, scale)
    out.fingerprint = key
    if cached and out.images.numel() * out.images.element_size() <= MAX_CACHED_BYTES:
        save_atomic({"images": out.images, "labels": out.labels, "classnames": out.classnames,
                     "prompts": out.prompts, "captions": out.captions, "caption_image": out.caption_image,
                     "skipped": out.skipped}, cached)
    return out


def _decode_fresh(spec: BenchmarkSpec, role: str, primary: bool, cache_dir: Path, preprocess, seed: int,
                  scale: float) -> EvalSet:
    ds = load_split(spec, cache_dir, seed, scale)
    try:
        images, kept = images_to_tensor(ds, spec.image_column, preprocess, where=spec.origin or spec.name,
                                        max_bad_share=spec.max_undecodable_share)
    except DataError as exc:
        raise SpecError(str(exc)) from None
    skipped = len(ds) - len(kept)
    if skipped:
        print(f"[data] {spec.name}: skipped {skipped} of {len(ds)} images that cannot be decoded "
              f"(max_undecodable_share {spec.max_undecodable_share})", flush=True)
    ds = ds.select(kept)
    out = EvalSet(spec, role, primary, images, skipped=skipped)
    if spec.task == "classification":
        out.classnames = classnames_for(spec, ds)
        out.labels = torch.tensor([int(y) for y in ds[spec.label_column]])
        out.prompts = class_prompts(spec, out.classnames)
    else:
        owner = []
        for i, caps in enumerate(ds[spec.caption_column]):
            caps = [caps] if isinstance(caps, str) else list(caps)
            out.captions += [str(c) for c in caps]
            owner += [i] * len(caps)
        out.caption_image = torch.tensor(owner)
    return out


def eval_sets(data, cache_dir: Path, preprocess, roles=ROLES, validation_share: float = 0.5) -> list[EvalSet]:
    """Every benchmark of ``roles`` in a study's data section (:class:`~study.config.DataSection`, specs
    resolved), decoded for ``preprocess`` and split into validation and test parts (seeded by the data
    seed); tensors cached under ``<cache>/eval``. Order: per benchmark, validation then test."""
    return [s for role in roles for i, spec in enumerate(data.specs(role))
            for s in validation_and_test(spec, role, i == 0, cache_dir, preprocess, data.seed, data.offline_scale,
                                         validation_share, tensor_cache(cache_dir))]


def check_benchmarks(data, cache_dir: Path) -> dict[str, int]:
    """Load every benchmark's split of a data section and check columns and class names (no decoding):
    ``{name: images}``."""
    return {spec.name: check(spec, cache_dir, data.seed, data.offline_scale)
            for role in ROLES for spec in data.specs(role)}
