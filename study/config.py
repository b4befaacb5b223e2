"""Typed study configuration: a search-space YAML validated completely, once, at the boundary.

``load_study_config`` reads ``search_spaces/*.yaml``, applies CLI overrides and
returns a :class:`StudyConfig` whose search space is typed and split once
(:attr:`StudyConfig.space`: fixed knob values and searched distributions), or
raises :class:`ConfigError` with one line naming the file and the field at
fault. Below it only the plain dict of sampled values that Ray Tune hands a
trial is untyped, and the trial turns it into :class:`TrialSettings` on its
first line.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .library.benchmarks import BenchmarkSpec, SpecError, resolve
from .library.errors import DataError
from .library.finetune import webdataset_defaults
from .library.pretrain import GENERAL_BENCHMARK, PretrainSettings, resolve_weights
from .library.rows import Holdout
from .library.yamlfile import YamlFileError, parse_value, read_yaml
from .settings import TrialSettings
from .vocabulary import HEADLINES, KNOBS, OBJECTIVE_METRICS, ROLES, TRAIN_METRICS, headline

#: what may choose the WiSE-FT alpha (evaluation.wiseft_select): a headline metric of one role, or of both on average
WISEFT_SELECT = tuple(f"{role}_{h}" for h in HEADLINES[::-1] for role in (*ROLES, "mean"))

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
DEFAULT_SPACE = SPACES_DIR / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line naming the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TRIAL_FIELDS = set(KNOBS)


# ------------------------------------------------------------ search space
class _Range(_Strict):
    # Ray Tune refuses an infinite bound (tune.uniform: "Uniform requires a upper bound") and NaN compares false
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Uniform(_Range):
    distribution: Literal["uniform"]
    low: float
    high: float


class LogUniform(_Range):
    distribution: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class QUniform(_Range):
    distribution: Literal["quniform"]
    low: float
    high: float
    q: float = Field(gt=0)


class IntRange(_Strict):
    distribution: Literal["int", "logint"]
    low: int
    high: int

    @model_validator(mode="after")
    def _log_bounds(self):
        if self.distribution == "logint" and self.low < 1:
            raise ValueError(f"logint needs low >= 1 (a log scale has no 0 or negatives), got low {self.low}")
        return self


class Categorical(_Strict):
    distribution: Literal["categorical"]
    choices: list[Union[str, int, float, bool]] = Field(min_length=1)

    @field_validator("choices", mode="before")
    @classmethod
    def _scalars(cls, v):
        for c in v if isinstance(v, list) else []:
            if not isinstance(c, (str, int, float, bool)):  # what one Optuna categorical parameter holds here
                raise ValueError(f"each choice is one number, word or true/false, not {c!r} (a list knob's choice is "
                                 f"written 'attn+mlp')")
        return v


Distribution = Annotated[Union[Uniform, LogUniform, QUniform, IntRange, Categorical],
                         Field(discriminator="distribution")]
DISTRIBUTION_TYPES = {"uniform": Uniform, "loguniform": LogUniform, "quniform": QUniform, "int": IntRange,
                      "logint": IntRange, "categorical": Categorical}
DISTRIBUTIONS = tuple(DISTRIBUTION_TYPES)


class SearchSpace(BaseModel):
    """A validated search space (``params``), split once: the knobs every trial shares and the distributions
    the search samples. Each distribution's every value is a valid :class:`TrialSettings` field."""

    model_config = ConfigDict(frozen=True)
    fixed: dict[str, Any] = {}
    searched: dict[str, Distribution] = {}

    def values(self, name: str) -> list:
        """Every value knob ``name`` can take: its fixed value (a list knob's items), a categorical's choices
        (split at ``+``), a range's ends, or the default."""
        dist = self.searched.get(name)
        if isinstance(dist, Categorical):
            return [x for c in dist.choices for x in (str(c).split("+") if isinstance(c, str) else [c])]
        if dist is not None:
            return [dist.low, dist.high]
        value = self.fixed.get(name, getattr(TrialSettings(), name))
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def settings(self, sampled: dict) -> TrialSettings:
        """The typed settings of one trial: ``sampled`` (what the search drew, by knob) over the fixed values.
        Raises pydantic's ``ValidationError``."""
        return TrialSettings.model_validate({**self.fixed, **sampled})


class Objective(_Strict):
    metric: Literal[OBJECTIVE_METRICS]  # type: ignore[valid-type]
    mode: Literal["max", "min"] = "max"


class PretrainSection(_Strict):
    """Offline default base model only: how to pretrain it (cached per settings)."""

    steps: int = Field(800, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0)
    seed: int = Field(0, ge=0)
    data_scale: float = Field(1.0, gt=0, le=1)

    def settings(self) -> PretrainSettings:
        return PretrainSettings(**self.model_dump())


class ModelSection(_Strict):
    name: str = "clip-study-tiny"  # open_clip model name, or hf-hub:org/repo
    pretrained: Optional[str] = None  # open_clip tag or checkpoint path; None = offline default
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype on GPU; CPU runs fp32 or bf16
    pretrain: PretrainSection = PretrainSection()

    def weights(self, cache_dir: Path) -> Optional[str]:
        """The weights to load (:func:`~study.library.pretrain.resolve_weights`): the tag or checkpoint path, or
        for the offline default the cached pretrained checkpoint, pretrained first if missing."""
        return resolve_weights(self.name, self.pretrained, cache_dir, self.pretrain.settings())


class FinetuneData(_Strict):
    """The fine-tuning pairs: image-caption pairs, or labelled images captioned from their class names."""

    source: str = "offline:micrographs"
    split: str = "train"  # a split name, or a slice as datasets writes it: "train[:80%]"
    image_column: str = "image"
    caption_column: str = "caption"  # empty or missing captions are skipped and counted
    # Label-only data (an image folder of classes, PCam, MedMNIST): captions built from the labels, each a
    # template filled with the class name (FLYP-style). Class names as in a benchmark spec: a list, a
    # {label: name} map, or (when null) the column's ClassLabel names or its string labels.
    label_column: Optional[str] = None
    classnames: Optional[Union[list[str], dict[int, str]]] = None
    templates: list[str] = Field(["a photo of a {c}."], min_length=1)
    # {share, take: rest}: the part of `split` a benchmark with {share, take: held_out} does not use
    holdout: Optional[Holdout] = None
    csv_separator: str = ","
    max_undecodable_share: float = Field(0.01, ge=0, le=1)  # skip and count broken images up to this share

    @field_validator("templates")
    @classmethod
    def _slot(cls, v):
        for t in v:
            if "{c}" not in t:
                raise ValueError(f"template {t!r} has no '{{c}}' slot for the class name")
        return v


# A shipped spec name, a spec file path, or an inline spec; load_study_config resolves each to a BenchmarkSpec.
BenchmarkRef = Union[str, dict, BenchmarkSpec]


class DataSection(_Strict):
    """Fine-tuning pairs and the benchmarks, named by spec (``study/benchmark_specs/<name>.yaml``).

    In each role the first classification benchmark is the headline one: its metrics are
    ``specialized_top1``, ``general_top1``...; the others are logged as ``<role>/<name>/<metric>``.
    """

    finetune: FinetuneData = FinetuneData()
    specialized: list[BenchmarkRef] = Field(["micrographs"], min_length=1)
    general: list[BenchmarkRef] = Field([GENERAL_BENCHMARK], min_length=1)
    seed: int = Field(0, ge=0)  # seeds the offline domains, the fraction subsets, holdouts and max_images samples
    offline_scale: float = Field(1.0, gt=0, le=1)  # shrink generated domains (smoke runs)
    # Benchmark images also in the fine-tuning set (same pixels, or the same perceptual hash) that a study
    # tolerates; above it the study stops before Ray starts.
    max_overlap: int = Field(0, ge=0)
    # Decoded image stores under <cache>/stores are pruned to this size, least recently used first.
    cache_max_gb: float = Field(50, gt=0)

    @field_validator("specialized", "general", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (str, dict)) else v

    def specs(self, role: str, file: str = "study config") -> list[BenchmarkSpec]:
        """The role's benchmarks as validated :class:`~study.library.benchmarks.BenchmarkSpec`, headline first."""
        specs = [ref if isinstance(ref, BenchmarkSpec) else
                 resolve(ref, f"{file}: data.{role}.{i}", f"{role}{i}" if i else role)
                 for i, ref in enumerate(getattr(self, role))]
        primary = next((s for s in specs if s.task == "classification"), None)
        if primary is None:
            raise ConfigError(f"{file}: data.{role}: needs a classification benchmark (its top-1 is the "
                              f"headline {role} metric)")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigError(f"{file}: data.{role}: benchmark names repeat: {names}")
        return [primary] + [s for s in specs if s is not primary]

    def resolved(self, file: str = "study config") -> "DataSection":
        """A copy whose benchmark references are all resolved specs (names and files read once, here, so
        workers never need the files), and a WebDataset fine-tuning set's labels and class names filled in from its
        own files (:func:`~study.library.finetune.webdataset_defaults`)."""
        try:
            update = {role: self.specs(role, file) for role in ROLES}
            if defaults := webdataset_defaults(self.finetune):
                update["finetune"] = FinetuneData.model_validate({**defaults,
                                                                  **self.finetune.model_dump(exclude_unset=True)})
            return self.model_copy(update=update)
        except (SpecError, DataError) as exc:
            raise ConfigError(str(exc)) from None


class EarlyStopping(_Strict):
    """ASHA: stop the trials that trail at each rung (epochs grace_period, x reduction_factor, ...)."""

    type: Literal["asha"] = "asha"
    metric: Optional[Literal[OBJECTIVE_METRICS + TRAIN_METRICS[:1]]] = None  # type: ignore[valid-type]  # default: first objective
    mode: Optional[Literal["max", "min"]] = None
    grace_period: int = Field(1, ge=1)  # epochs every trial gets
    reduction_factor: float = Field(3, gt=1)


class SearchSection(_Strict):
    trials: int = Field(8, ge=1)
    # Trials at once; "auto" fits as many as the cluster's free CPUs/GPUs hold when the sweep starts.
    max_concurrent: Union[Annotated[int, Field(ge=1)], Literal["auto"]] = 2
    seed: int = Field(0, ge=0)
    early_stopping: Optional[EarlyStopping] = None  # e.g. {type: asha, grace_period: 1} for large sweeps
    # Optuna storage URL (e.g. sqlite:///optuna.db) to watch the search with optuna-dashboard; in-memory
    # when null. Give a database password through the OPTUNA_STORAGE environment variable, not here.
    optuna_storage: Optional[str] = None
    # Read on the validation part of the benchmarks. Default: the specialized headline metric, maximised.
    objective: Optional[list[Objective]] = Field(None, min_length=1, max_length=4)
    # Seed replicates after the sweep: the best `replicate_top` trials (by the first objective; null = all)
    # are rerun until each configuration has `replicate_seeds` seeds; the summary shows mean +/- sd.
    replicate_seeds: int = Field(1, ge=1, le=100)
    replicate_top: Optional[int] = Field(3, ge=1)
    # Optuna's sampler: "auto" is TPE (its first min(4, trials) trials random), NSGA-II for a Pareto search.
    # "cmaes" needs the `cmaes` package and one objective; "gp" (Gaussian process) needs few trials to pay off.
    # "stratified": every combination of the categorical knobs in turn, equally often, the rest at random (to
    # compare methods side by side; study.orchestration.stratified).
    sampler: Literal["auto", "tpe", "random", "qmc", "gp", "cmaes", "nsgaii", "nsgaiii", "stratified"] = "auto"

    @field_validator("sampler")
    @classmethod
    def _installed(cls, v):
        if v == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise ValueError("cmaes needs the cmaes package (pip install cmaes)")
        return v


class EvaluationSection(_Strict):
    """What every trial evaluates after its last epoch, besides the fine-tuned model itself."""

    # WiSE-FT: the model with its trained change scaled by alpha (0 = base model, 1 = fine-tuned).
    wiseft_alphas: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    # the alpha a trial reports as wiseft_best_*: the one that maximises this on the validation part. null: the
    # headline metric's mean over both roles (mean_balanced_accuracy, or mean_top1 when top-1 is the headline)
    wiseft_select: Optional[Literal[WISEFT_SELECT]] = None  # type: ignore[valid-type]
    # The metric the summary and the finding lead with (top-1 is always reported beside it). Balanced
    # accuracy by default: on an imbalanced benchmark, top-1 rewards predicting the majority class.
    headline: Literal[HEADLINES] = "balanced_accuracy"  # type: ignore[valid-type]
    # Share of each benchmark (without its own validation split) held out as the validation part that
    # chooses; the rest is the test part that reports. Seeded and stratified by label.
    validation_share: float = Field(0.5, gt=0, lt=1)
    # A trial whose test predictions put one class on at least this share of a benchmark's images (while
    # that class's true share is lower) is flagged as collapsed; its difference is never called a gain.
    collapse_share: float = Field(0.9, gt=0.5, le=1)
    # The linear-probe ceiling (CLIP_benchmark's protocol, study.library.probe): logistic regression on frozen image
    # features of each classification benchmark, fit on its train_split (or its validation part), scored on its test
    # part. The baseline's is always fitted (seconds); true fits one on every trial's final model too.
    linear_probe: bool = False

    @property
    def wiseft_metric(self) -> str:
        """What chooses the WiSE-FT alpha on validation: ``wiseft_select``, else the headline's mean over both roles."""
        return self.wiseft_select or f"mean_{self.headline}"


class ResourcesSection(_Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)  # a fraction (e.g. 0.25) packs several small trials on one GPU
    # Lost workers or nodes a trial recovers from, each time from its last epoch checkpoint (-1: no limit).
    max_failures: int = Field(2, ge=-1)
    # Each tower's frozen blocks (before the first block any trial trains) run once per study, and trials run
    # only the trainable suffix (study.library.prefix). Turn off for preprocessing that varies per step.
    frozen_prefix_cache: bool = True
    # Where a trial's training runs. "auto": a one-worker trial runs in its Ray Tune trial (Tune's function
    # trainable, with actors reused between trials and Tune retrying a lost trial from its last checkpoint), a
    # multi-worker trial in a Ray Train run of DDP workers. "ray_train": always a Ray Train run.
    trial_runner: Literal["auto", "ray_train"] = "auto"


class StudyConfig(_Strict):
    # The MLflow experiment, and a folder under --output-dir: letters, digits, and _ - . and spaces.
    name: str = Field("clip-alignment-study", min_length=1, max_length=200)
    description: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    search: SearchSection = SearchSection()
    evaluation: EvaluationSection = EvaluationSection()
    resources: ResourcesSection = ResourcesSection()
    params: dict[str, Any] = Field(default_factory=dict)  # as written; validated into `space` by load_study_config
    _space: SearchSpace = PrivateAttr(default_factory=SearchSpace)

    @property
    def space(self) -> SearchSpace:
        """``params``, validated and split into fixed and searched knobs (set by :func:`load_study_config`)."""
        return self._space

    @field_validator("name")
    @classmethod
    def _usable_name(cls, v):
        if not re.fullmatch(r"\w[\w.\- ]*", v):
            raise ValueError("the study name is the MLflow experiment and a folder under --output-dir: use letters, "
                             "digits, '_', '-', '.' and spaces, starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _default_objective(self):
        if self.search.objective is None:
            self.search.objective = [Objective(metric=headline("specialized", self.evaluation.headline))]
        if self.search.sampler == "cmaes" and len(self.search.objective) > 1:
            raise ValueError("search.sampler: cmaes searches one objective; use nsgaii, tpe or random for a "
                             "Pareto search")
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.search.objective) > 1


# ------------------------------------------------------------- loading
Override = tuple  # (dotted key, value) or (dotted key, value, the flag that set it, e.g. "--trials")


class Blame:
    """Who is at fault for a field: the flag that overrode it, else the space file."""

    def __init__(self, file: str, overrides):
        self.file = file
        self.flags = [(_dotted(o[0]), o[2] if len(o) > 2 else f"--set {o[0]}") for o in overrides]

    def __call__(self, loc: str) -> str:
        """The flag that set ``loc`` (or a section above it; else the last that set a field below it)."""
        above = [(len(k), i, flag) for i, (k, flag) in enumerate(self.flags) if loc == k or loc.startswith(k + ".")]
        if above:
            return max(above)[2]
        below = [flag for k, flag in self.flags if k.startswith(loc + ".")]
        return below[-1] if below else self.file


def _dotted(key: str) -> str:
    return f"params.{key}" if key in TRIAL_FIELDS else key


def _loc(err: ValidationError, prefix: tuple = ()) -> tuple[str, str]:
    """``(field path, message)`` of a validation error's first problem, without pydantic's internal tags."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in prefix + tuple(e["loc"]) if not str(p).startswith(("function-", "tagged-union")))
    msg = e["msg"].removeprefix("Value error, ")
    plain = e["type"] in ("missing", "extra_forbidden") or isinstance(e.get("input"), dict)
    return loc or "<top>", msg + ("" if plain else f" (got {e.get('input')!r})")


def _fmt(err: ValidationError, blame, prefix: tuple = ()) -> str:
    loc, msg = _loc(err, prefix)
    return f"{blame(loc)}: {loc}: {msg}"


def knob_type(name: str) -> type:
    """The Python type a knob takes: ``int``, ``float``, ``bool`` or ``list`` (of words)."""
    ann = TrialSettings.model_fields[name].annotation
    for t in (bool, int, float):
        if ann is t or ann == Optional[t]:
            return t
    return list


def _distribution(name: str, spec: dict, blame, defaults: dict) -> BaseModel:
    """One ``params`` entry with a ``distribution``, checked against its knob's type and bounds: every value
    it can draw must be a valid :class:`TrialSettings` field (integers for an integer knob, one type of
    choice), so that no trial fails inside Ray on a value the space let through."""
    where = f"params.{name}"
    kind = spec["distribution"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{blame(where)}: {where}.distribution: unknown distribution {kind!r}; choose from "
                          f"{', '.join(DISTRIBUTIONS)}")
    try:
        dist = DISTRIBUTION_TYPES[kind].model_validate(spec)
    except ValidationError as err:
        raise ConfigError(_fmt(err, blame, ("params", name))) from None
    want = knob_type(name)
    draws = {"uniform": float, "loguniform": float, "quniform": float, "int": int, "logint": int}.get(kind)
    if draws and (want in (bool, list) or (want is int and draws is float)):
        fit = "int or logint" if want is int else "categorical"
        raise ConfigError(f"{blame(where)}: {where}.distribution: {kind!r} draws {draws.__name__}s, but {name} "
                          f"takes {want.__name__} values; use {fit}")
    if isinstance(dist, Categorical):
        types = {type(c) for c in dist.choices} - ({int} if want is float else set())
        if len(types) > 1:
            raise ConfigError(f"{blame(where)}: {where}.choices: choices mix types "
                              f"({', '.join(sorted(t.__name__ for t in {type(c) for c in dist.choices}))}); "
                              f"give every choice as {want.__name__ if want is not list else 'a string'}")
    elif dist.low > dist.high:
        raise ConfigError(f"{blame(where)}: {where}: low {dist.low} is above high {dist.high}")
    _as_tune_and_optuna_take_it(dist, where, blame)
    probes = [("choices", c) for c in dist.choices] if isinstance(dist, Categorical) else [
        ("low", dist.low), ("high", dist.high)]
    for field, value in probes:
        try:
            TrialSettings(**{**defaults, name: value})
        except ValidationError as err:
            loc, msg = _loc(err, ("params",))
            raise ConfigError(f"{blame(where)}: {where}.{field}: {msg}") from None
    return dist


def _on_grid(x: float, q: float) -> bool:
    """Ray Tune's own test of a quantized bound (``ray.tune.search.sample.Float.quantized``)."""
    return math.isclose(x / q, round(x / q))


def _as_tune_and_optuna_take_it(dist: BaseModel, where: str, blame) -> None:
    """What Ray Tune or Optuna would refuse (or silently distort) only once the sweep has started: a ``quniform``
    bound off the grid of ``q`` (``tune.quniform`` raises "not divisible by quantization factor"), and a
    categorical choice given twice (the sampler then draws it twice as often)."""
    if isinstance(dist, QUniform):
        low, high, q = dist.low, dist.high, dist.q
        first, last = math.ceil(low / q - 1e-9) * q, math.floor(high / q + 1e-9) * q  # the grid inside [low, high]
        if first > last + 1e-12 * q:
            raise ConfigError(f"{blame(where)}: {where}.q: no multiple of q {q:g} lies in [{low:g}, {high:g}], and "
                              f"quniform draws multiples of q; use a smaller q")
        off = [(f, v, fix) for f, v, fix in (("low", low, first), ("high", high, last)) if not _on_grid(v, q)]
        if off:
            fixes = ", ".join(f"{f}: {_short(fix)}" for f, _, fix in off)
            raise ConfigError(f"{blame(where)}: {where}.{off[0][0]}: {off[0][1]:g} is not a multiple of q {q:g}, and "
                              f"Ray Tune's quniform needs both bounds on the grid of q; use {fixes}")
    if isinstance(dist, Categorical):
        repeated = [c for i, c in enumerate(dist.choices) if c in dist.choices[:i]]
        if repeated:
            raise ConfigError(f"{blame(where)}: {where}.choices: {repeated[0]!r} is given twice, so the search "
                              f"would draw it twice as often; give each choice once")


def _short(x: float) -> str:
    """A grid point without float noise: ``0.30000000000000004`` -> ``0.3``."""
    return f"{x:.12g}"


def _validate_params(params: dict, blame) -> SearchSpace:
    """Check each search-space entry and return the :class:`SearchSpace`. Fixed values are checked together
    (``nothing to train``), and each distribution's extremes together with them."""
    out = {}
    defaults = TrialSettings().model_dump()
    for name in params:
        if name not in TRIAL_FIELDS:
            raise ConfigError(f"{blame(f'params.{name}')}: params.{name}: unknown parameter; known: "
                              f"{', '.join(sorted(TRIAL_FIELDS))}")
    fixed = {k: v for k, v in params.items() if not (isinstance(v, dict) and "distribution" in v)}
    for name, spec in fixed.items():
        try:
            out[name] = getattr(TrialSettings(**{**defaults, name: spec}), name)
        except ValidationError as err:
            raise ConfigError(_fmt(err, blame, ("params",))) from None
    try:
        TrialSettings(**{**defaults, **fixed})
    except ValidationError as err:
        raise ConfigError(_fmt(err, blame, ("params",))) from None
    if params.get("shots_per_class") is not None and "data_fraction" in params:
        raise ConfigError(f"{blame('params.shots_per_class')}: params.shots_per_class: k-shot and data_fraction both "
                          f"choose the fine-tuning subset; remove data_fraction from params")
    with_fixed = {**defaults, **out}
    searched = {name: _distribution(name, spec, blame, with_fixed) for name, spec in params.items() if name not in fixed}
    if not searched:
        raise ConfigError(f"{blame('params')}: params: nothing to search; give at least one parameter a "
                          f"distribution")
    return SearchSpace(fixed=out, searched=searched)


def _set_path(tree: dict, dotted: str, value, origin: str) -> None:
    keys = _dotted(dotted).split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"{origin}: {dotted}: {k!r} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any, str]:
    """``"search.trials=4"`` -> ``("search.trials", 4, "--set search.trials")``; values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set search.trials=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        return key, parse_value(raw) if raw.strip() else None, f"--set {key}"
    except YamlFileError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None


def read_space(path: Path) -> dict:
    """The raw mapping of a search-space file (duplicate keys rejected)."""
    file = str(path)
    if path.is_dir():
        raise ConfigError(f"{file}: is a directory, not a search space file (give a .yaml file, e.g. "
                          f"{DEFAULT_SPACE})")
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
        raise ConfigError(f"{file}: search space file not found (--space takes a path, or a shipped space's "
                          f"name: {shipped})")
    try:
        raw = read_yaml(path)
    except (YamlFileError, UnicodeDecodeError) as exc:
        raise ConfigError(str(exc) if isinstance(exc, YamlFileError) else f"{file}: not a text file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping at the top level, got {type(raw).__name__}")
    return copy.deepcopy(raw)


def load_study_config(path: Path | str | None = None, overrides: list[Override] = ()) -> StudyConfig:
    """Read, override and validate a search space into a :class:`StudyConfig` (its ``space`` typed and split).

    ``overrides`` are ``(dotted key, value[, flag])``; an error in an overridden field names the flag."""
    path = Path(path) if path else DEFAULT_SPACE
    raw = read_space(path)
    blame = Blame(str(path), overrides)
    for o in overrides:
        _set_path(raw, o[0], o[1], blame(_dotted(o[0])))
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_fmt(err, blame)) from None
    cfg._space = _validate_params(cfg.params, blame)
    if cfg.search.sampler == "stratified" and not any(isinstance(d, Categorical) for d in cfg.space.searched.values()):
        raise ConfigError(f"{blame('search.sampler')}: search.sampler: stratified needs a categorical knob to stratify "
                          f"over (e.g. params.method: {{distribution: categorical, choices: [lora, full]}})")
    _check_early_stopping(cfg, blame)
    cfg.data = cfg.data.resolved(str(path))
    if cfg.params.get("shots_per_class") is not None and not cfg.data.finetune.label_column:
        raise ConfigError(f"{blame('data.finetune.label_column')}: data.finetune.label_column: params.shots_per_class "
                          f"takes k images of each class, but data.finetune has no labels (captions only); name its "
                          f"label column")
    return cfg


def _check_early_stopping(cfg: StudyConfig, blame) -> None:
    """ASHA's first rung must come no later than the longest trial's last epoch (Ray Tune's ASHAScheduler asserts
    ``max_t >= grace_period``, with ``max_t`` the space's largest ``epochs``)."""
    es, longest = cfg.search.early_stopping, max(int(e) for e in cfg.space.values("epochs"))
    if es is not None and es.grace_period > longest:
        where = "search.early_stopping.grace_period"
        raise ConfigError(f"{blame(where)}: {where}: {es.grace_period} epochs, but no trial of this space runs more "
                          f"than {longest} (params.epochs); use grace_period: {longest} or fewer")
