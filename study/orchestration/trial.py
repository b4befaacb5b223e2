"""One Tune trial: typed settings, its MLflow run, and its training by the sweep's runner.

:func:`trial_driver` is the Tune trainable. It turns Tune's sampled values into :class:`TrialSettings`, opens
(or, on resume, finds) the trial's MLflow run, and trains as the sweep's runner does (:mod:`.runners`): in this
process, or in a Ray Train run of its workers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from pydantic import BaseModel, ConfigDict

from ..config import ResourcesSection, SearchSpace
from ..settings import TrialSettings
from ..tracking import client, end_trial_run, ensure_trial_run, retrying, subset_input
from ..vocabulary import FAILED, FINISHED, KIND_TAG, REPLICATE, REPLICATE_OF_TAG
from .runners import Runner
from .worker import WorkerJob

REPLICATE_OF = "replicate_of"  # config key of a replicate trial: the sweep trial whose settings it reruns
REPLICATE_GRID = "replicate"   # replicate trials nest their config under this grid key


class SweepContext(BaseModel):
    """Study-wide facts every trial needs (handed over typed, with ``tune.with_parameters``)."""

    model_config = ConfigDict(extra="forbid")
    job: WorkerJob  # everything but the trial's own settings and run id
    space: SearchSpace  # the fixed knobs; Tune's config holds the searched ones
    runner: Runner
    resources: ResourcesSection
    experiment_id: str
    parent_run_id: str
    train_storage: str
    trial_offset: int = 0  # trials of the sweep's earlier parts (a resumed sweep's extension numbers on)
    training_input: Optional[dict] = None  # the fine-tuning set as the parent run's dataset input records it


def unpack(config: dict) -> tuple[dict, Optional[str]]:
    """A Tune config's sampled knob values and, for a seed replicate (its values nested under the grid key), the
    id of the trial it reruns."""
    sampled = dict(config.get(REPLICATE_GRID, config))
    return sampled, sampled.pop(REPLICATE_OF, None)


def tune_config(settings: TrialSettings, space: SearchSpace) -> dict:
    """The inverse of :meth:`SearchSpace.settings` for a grid: the knobs the space does not fix, with list knobs
    joined as ``"attn+mlp"`` (Tune configs hold scalars)."""
    values = settings.model_dump()
    return {k: "+".join(v) if isinstance(v, list) else v for k, v in values.items() if k not in space.fixed}


def trial_driver(config: dict, context: SweepContext) -> None:
    """The Tune trainable: typed settings, the trial's MLflow run, then its training as the sweep's runner
    trains (:mod:`.runners`); the run is closed FINISHED or FAILED with the reason."""
    import ray.tune

    sampled, replicate_of = unpack(config)
    settings = context.space.settings(sampled)  # the sampled knobs over the space's fixed ones, typed
    trial_id = ray.tune.get_context().get_trial_id()
    uri = context.job.tracking_uri
    tags = {KIND_TAG: REPLICATE, REPLICATE_OF_TAG: replicate_of} if replicate_of else None
    number = trial_number(ray.tune.get_context(), context.trial_offset)
    inputs = ([subset_input(context.training_input, settings.data_fraction, settings.shots_per_class)]
              if context.training_input else None)
    run_id = retrying(lambda: ensure_trial_run(uri, context.experiment_id, context.parent_run_id, trial_id,
                                               settings.model_dump(), json.dumps(settings.model_dump(), indent=2),
                                               tags, run_name=run_name(config, replicate_of, number), inputs=inputs,
                                               number=None if replicate_of else number),
                      what="opening the trial's MLflow run")
    job = context.job.model_copy(update={"settings": settings, "run_id": run_id})
    try:
        context.runner.fit(job, context.resources, context.train_storage, trial_id)
    except Exception as exc:  # a stop by Tune (SystemExit) leaves the run to the sweep's close_stopped_runs
        reason = failure_reason(exc)
        retrying(lambda: end_trial_run(client(uri), run_id, FAILED, reason=reason),
                 what="closing the trial's MLflow run")
        raise
    retrying(lambda: end_trial_run(client(uri), run_id, FINISHED), what="closing the trial's MLflow run")


# Short names of the knobs in a trial's run name, e.g. "t03 f=0.953 lr=1.4e-3 K=2 r=4 tw=0.997".
KNOB_ABBREVIATIONS = {"learning_rate": "lr", "lora_rank": "r", "data_fraction": "f", "lora_blocks": "K",
                      "tether_weight": "tw", "lora_alpha": "a", "weight_decay": "wd", "batch_size": "bs",
                      "epochs": "ep", "warmup_steps": "wu", "lora_targets": "on", "lora_towers": "towers",
                      "shots_per_class": "k"}


def trial_number(ctx, offset: int = 0) -> Optional[int]:
    """The trial's 1-based number in the sweep: Tune's count in its trial folder's name
    (``trial_driver_<id>_<n>_<config>_<date>``) plus the earlier parts' trials; None if the name has none."""
    return number_in(os.path.basename(ctx.get_trial_dir() or ""), ctx.get_trial_id(), offset)


def number_in(folder: str, trial_id: str, offset: int = 0) -> Optional[int]:
    """Tune's count of trial ``trial_id`` from its folder's name (or its ``experiment_tag``, ``<n>_<config>``),
    plus ``offset``; None if the name holds none."""
    m = re.match(rf"(?:.*_{re.escape(trial_id)}_)?(\d+)(?:_|$)", folder)
    return int(m.group(1)) + offset if m else None


def run_name(config: dict, replicate_of: Optional[str], number: Optional[int]) -> str:
    """A readable MLflow run name: ``t03 f=0.953 lr=1.4e-3 K=2 r=4 tw=0.997`` (the searched knobs, by name), or
    for a seed replicate ``rep seed=1 of <trial id>``."""
    config, _ = unpack(config)
    if replicate_of:
        return f"rep seed={config.get('seed', '?')} of {replicate_of}"

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e") if v and abs(v) < 1e-2 else f"{v:.3g}"
        return str(v)

    knobs = " ".join(f"{KNOB_ABBREVIATIONS.get(k, k)}={fmt(v)}" for k, v in sorted(config.items()))
    return f"t{number:02d} {knobs}".strip() if number is not None else knobs or "trial"


def failure_reason(exc: BaseException) -> str:
    """The innermost worker error, one line, without its module path, e.g. 'NonFiniteLossError: loss became
    nan ...'."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "Error:" in line and not line.startswith(" "):
            return re.sub(r"^[\w.]+\.(\w+:)", r"\1", line.strip())  # "study.library.objective.X: ..." -> "X: ..."
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def driver_trainable(context: SweepContext):
    """The Tune trainable: :func:`trial_driver` with the study context, holding what the runner's trial holds."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(trial_driver, context=context),
                               tune.PlacementGroupFactory([context.runner.bundle(context.resources)]))
