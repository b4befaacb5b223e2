"""One Tune trial: typed settings, its MLflow run, and the worker loop.

:func:`trial_driver` opens (or, on resume, finds) the trial's MLflow run. A trial of one worker then runs
the worker loop in its own process (Tune's Function Trainable API: no Train controller or worker group to
start, and Tune reuses the process for the next trial). A trial of several workers launches a Ray Train run
(a ``TorchTrainer``, see :func:`trainer_class`) named after the trial id, so that a retried or restored trial
resumes from its own checkpoints; results reach Tune through ``TuneReportCallback`` (Ray's documented
Train-in-Tune pattern, ``doc/source/train/doc_code/train_tune_interop.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
from functools import partial
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from ..settings import TrialSettings
from ..vocabulary import FAILED, FINISHED, KIND_TAG, REPLICATE, REPLICATE_OF_TAG
from .tracking import client, end_trial_run, ensure_trial_run, retrying, subset_input
from .worker import WorkerJob, run_worker, train_fn_per_worker

# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and only a poll
# passes a report on to Tune or notices that the run finished: at 2 s a trial's teardown waited 2-4 s for polls
# (measured: 4.3 s -> 1.0 s from the last report to the trial's end at 0.5 s). A poll is one small actor call per
# worker. Train propagates the variable to its controller and workers; a value the user set wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
REPLICATE_OF = "replicate_of"  # config key of a replicate trial: the sweep trial whose settings it reruns
REPLICATE_GRID = "replicate"   # replicate trials nest their config under this grid key


class SweepContext(BaseModel):
    """Study-wide facts every trial needs (handed over typed, with ``tune.with_parameters``)."""

    model_config = ConfigDict(extra="forbid")
    job: WorkerJob  # everything but the trial's own settings and run id
    fixed: dict[str, Any] = {}  # the space's fixed knob values; Tune's config holds the searched ones
    experiment_id: str
    parent_run_id: str
    train_storage: str
    workers_per_trial: int
    gpus_per_worker: float
    max_failures: int = 2
    trial_offset: int = 0  # trials of the sweep's earlier parts (a resumed sweep's extension numbers on)
    training_input: Optional[dict] = None  # the fine-tuning set as the parent run's dataset input records it


def trial_settings(config: dict, fixed: dict) -> tuple[TrialSettings, Optional[str]]:
    """The typed settings of a Tune config (searched knobs over the fixed ones) and, for a seed replicate,
    the id of the trial it reruns. Raises pydantic's ``ValidationError`` on an invalid config."""
    config = dict(config.get(REPLICATE_GRID, config))
    replicate_of = config.pop(REPLICATE_OF, None)
    return TrialSettings.model_validate({**fixed, **config}), replicate_of


def tune_config(settings: TrialSettings, fixed: dict) -> dict:
    """The inverse of :func:`trial_settings` for a grid: the knobs that are not fixed, with list knobs
    joined as ``"attn+mlp"`` (Tune configs hold scalars)."""
    values = settings.model_dump()
    return {k: "+".join(v) if isinstance(v, list) else v for k, v in values.items() if k not in fixed}


def trial_driver(config: dict, context: SweepContext) -> None:
    """The Tune trainable: typed settings, the trial's MLflow run, then its training: in this process for a
    trial of one worker (``job.runner == "tune"``), else a Ray Train run of its workers (:func:`fit_train_run`)."""
    import ray.tune

    for name, value in TRAIN_ENV.items():  # this trial's own process
        os.environ.setdefault(name, value)
    settings, replicate_of = trial_settings(config, context.fixed)
    trial_id = ray.tune.get_context().get_trial_id()
    uri = context.job.tracking_uri
    tags = {KIND_TAG: REPLICATE, REPLICATE_OF_TAG: replicate_of} if replicate_of else None
    name = run_name(config, replicate_of, trial_number(ray.tune.get_context(), context.trial_offset))
    inputs = [subset_input(context.training_input, settings.data_fraction)] if context.training_input else None
    run_id = retrying(lambda: ensure_trial_run(uri, context.experiment_id, context.parent_run_id, trial_id,
                                               settings.model_dump(), json.dumps(settings.model_dump(), indent=2),
                                               tags, run_name=name, inputs=inputs),
                      what="opening the trial's MLflow run")
    job = context.job.model_copy(update={"settings": settings, "run_id": run_id})
    try:
        if job.runner == "tune":
            run_worker(job, time.time())
        else:
            fit_train_run(job, context, trial_id)
    except Exception as exc:  # a stop by Tune (SystemExit) leaves the run to the sweep's close_stopped_runs
        reason = failure_reason(exc)
        retrying(lambda: end_trial_run(client(uri), run_id, FAILED, reason=reason),
                 what="closing the trial's MLflow run")
        raise
    retrying(lambda: end_trial_run(client(uri), run_id, FINISHED), what="closing the trial's MLflow run")


# Short names of the knobs in a trial's run name, e.g. "t03 f=0.953 lr=1.4e-3 K=2 r=4 tw=0.997".
KNOB_ABBREVIATIONS = {"learning_rate": "lr", "lora_rank": "r", "data_fraction": "f", "lora_blocks": "K",
                      "tether_weight": "tw", "lora_alpha": "a", "weight_decay": "wd", "batch_size": "bs",
                      "epochs": "ep", "warmup_steps": "wu", "lora_targets": "on", "lora_towers": "towers"}


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
    config = dict(config.get(REPLICATE_GRID, config))
    config.pop(REPLICATE_OF, None)
    if replicate_of:
        return f"rep seed={config.get('seed', '?')} of {replicate_of}"

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e") if v and abs(v) < 1e-2 else f"{v:.3g}"
        return str(v)

    knobs = " ".join(f"{KNOB_ABBREVIATIONS.get(k, k)}={fmt(v)}" for k, v in sorted(config.items()))
    return f"t{number:02d} {knobs}".strip() if number is not None else knobs or "trial"


def fit_train_run(job: WorkerJob, context: SweepContext, trial_id: str) -> None:
    """A Ray Train run of the trial's workers, named after the trial so that a retried or restored trial
    resumes from its own checkpoints; its reports reach Tune through ``TuneReportCallback``."""
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = trainer_class(context)(
        train_fn_per_worker,
        # Pickled: the controller holds the config but never reads it, so it need not import this project
        # (nor torch) to unpickle it; the worker unpickles it (worker.job_of).
        train_loop_config={"job": pickle.dumps(job)},
        scaling_config=scaling_config(context),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",  # deterministic: a retried driver resumes from its checkpoints
            storage_path=context.train_storage,
            callbacks=[TuneReportCallback()],
            # Lost workers or nodes: restart the worker group and resume from the last checkpoint. A
            # non-finite loss fails the same way on every retry, so it costs only those few restarts.
            failure_config=ray.train.FailureConfig(max_failures=context.max_failures),
            # The controller's INFO lines ("Requesting resources…", "Started training worker group…") would reach
            # the study's console; its warnings and errors still do, and Train's log files keep everything.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


def trainer_class(ctx: SweepContext):
    """``TorchTrainer``, or for a trial of one CPU worker its base class ``DataParallelTrainer`` with the
    plain backend: one worker needs no torch process group (the worker loop uses ``torch.distributed`` only
    when it has peers), and without ``TorchConfig`` Train's controller never imports torch (about 1 s of CPU
    and 470 MB less per trial). The controller, the worker group, checkpoints and failure handling are the
    same. A GPU worker keeps ``TorchTrainer``, whose context sets each worker's CUDA device."""
    if ctx.workers_per_trial == 1 and not ctx.gpus_per_worker:
        from ray.train import BackendConfig
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return partial(DataParallelTrainer, backend_config=BackendConfig())
    from ray.train.torch import TorchTrainer

    return TorchTrainer


def scaling_config(ctx: SweepContext):
    """Workers per trial and what each holds; a fractional ``gpus_per_worker`` (e.g. 0.25) packs several
    small trials onto one GPU."""
    import ray.train

    gpu = {"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {}
    return ray.train.ScalingConfig(num_workers=ctx.workers_per_trial, use_gpu=ctx.gpus_per_worker > 0,
                                   resources_per_worker={"CPU": ctx.job.cpus_per_worker, **gpu})


def failure_reason(exc: BaseException) -> str:
    """The innermost worker error, one line, without its module path, e.g. 'NonFiniteLossError: loss became
    nan ...'."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "Error:" in line and not line.startswith(" "):
            return re.sub(r"^[\w.]+\.(\w+:)", r"\1", line.strip())  # "study.library.objective.X: ..." -> "X: ..."
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def driver_trainable(context: SweepContext):
    """The Tune trainable: :func:`trial_driver` with the study context and its resources.

    A trial that trains in Tune holds its worker's CPUs (and GPU share) itself. A trial that runs Ray Train
    only waits on its trainer, so it holds no CPU (the workers do), and it is pinned to the head node: losing a
    worker node then never kills a driver, and Train restarts the lost workers elsewhere.
    """
    from ray import tune

    if context.job.runner == "tune":
        gpu = {"GPU": context.gpus_per_worker} if context.gpus_per_worker else {}
        bundle = {"CPU": context.job.cpus_per_worker, **gpu}
    else:
        bundle = {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}
    return tune.with_resources(tune.with_parameters(trial_driver, context=context),
                               tune.PlacementGroupFactory([bundle]))


def tune_failures(context: SweepContext) -> int:
    """Tune's retries of a failed trial: a trial that trains in Tune recovers from a lost process or node this
    way, from its last checkpoint (``resources.max_failures``); a Ray Train run already retried its workers."""
    return context.max_failures if context.job.runner == "tune" else 0
