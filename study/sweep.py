"""Ray Tune + Optuna over Ray Train: all of the project's Ray wiring lives here.

One Tune trial runs :func:`trial_driver`, which opens (or, on resume, finds)
the trial's MLflow run and launches a ``TorchTrainer`` named after the trial
id, so that a retried or restored trial resumes from its own checkpoints.
Results reach Tune through ``TuneReportCallback`` (the Train V2 pattern).
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, ConfigDict

from .config import Categorical, IntRange, LogUniform, QUniform, StudyConfig, TrialSettings, Uniform
from .train_loop import WorkerJob, train_fn_per_worker


class SweepContext(BaseModel):
    """Study-wide facts every trial needs (passed with ``tune.with_parameters``)."""

    model_config = ConfigDict(extra="forbid")
    job: WorkerJob  # everything but the trial's own settings and run id
    experiment_id: str
    parent_run_id: str
    train_storage: str
    workers_per_trial: int
    gpus_per_worker: float
    max_failures: int = 2


REPLICATE_OF = "replicate_of"  # config key of a replicate trial: the sweep trial whose settings it reruns


def tune_space(params: dict) -> dict:
    """Map validated search-space entries to Ray Tune sampling primitives."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in params.items():
        if isinstance(p, LogUniform):
            out[name] = tune.loguniform(p.low, p.high)
        elif isinstance(p, Uniform):
            out[name] = tune.uniform(p.low, p.high)
        elif isinstance(p, QUniform):
            out[name] = tune.quniform(p.low, p.high, p.q)
        elif isinstance(p, IntRange):  # inclusive high, as the YAML reads
            out[name] = (tune.lograndint if p.distribution == "logint" else tune.randint)(p.low, p.high + 1)
        elif isinstance(p, Categorical):
            out[name] = tune.choice(p.choices)
        else:
            out[name] = "+".join(p) if isinstance(p, list) else p
    return out


def trial_driver(config: dict, context: dict) -> None:
    """One Tune trial: typed settings, its MLflow run, then a Ray Train run."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .tracking import client, end_trial_run, ensure_trial_run, retrying

    config = dict(config.get("replicate", config))  # replicate trials nest theirs under a grid key
    replicate_of = config.pop(REPLICATE_OF, None)
    settings = TrialSettings.model_validate(config)
    ctx = SweepContext.model_validate(context)
    trial_id = ray.tune.get_context().get_trial_id()
    tracking_uri = ctx.job.tracking_uri
    tags = {"study.kind": "replicate", "study.replicate_of": replicate_of} if replicate_of else None
    run_id = retrying(lambda: ensure_trial_run(tracking_uri, ctx.experiment_id, ctx.parent_run_id, trial_id,
                                               settings.model_dump(), json.dumps(settings.model_dump(), indent=2),
                                               tags), what="opening the trial's MLflow run")
    job = ctx.job.model_copy(update={"settings": settings, "run_id": run_id})
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=job.model_dump(),
        scaling_config=scaling_config(ctx),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",  # deterministic: a retried driver resumes from its checkpoints
            storage_path=ctx.train_storage,
            callbacks=[TuneReportCallback()],
            # Lost workers or nodes: restart the worker group and resume from the last checkpoint. A
            # non-finite loss fails the same way on every retry, so it costs only those few restarts.
            failure_config=ray.train.FailureConfig(max_failures=ctx.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        reason = failure_reason(exc)
        retrying(lambda: end_trial_run(client(tracking_uri), run_id, "FAILED", reason=reason),
                 what="closing the trial's MLflow run")
        raise
    retrying(lambda: end_trial_run(client(tracking_uri), run_id, "FINISHED"), what="closing the trial's MLflow run")


def scaling_config(ctx: SweepContext):
    """Workers per trial and what each holds; a fractional ``gpus_per_worker`` (e.g. 0.25) packs several
    small trials onto one GPU."""
    import ray.train

    gpu = {"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {}
    return ray.train.ScalingConfig(num_workers=ctx.workers_per_trial, use_gpu=ctx.gpus_per_worker > 0,
                                   resources_per_worker={"CPU": ctx.job.cpus_per_worker, **gpu})


def failure_reason(exc: BaseException) -> str:
    """The innermost worker error, one line, e.g. 'NonFiniteLossError: loss became nan ...'."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "Error:" in line and not line.startswith(" "):
            return line.strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def progress_callback():
    """One line per epoch and per finished trial, instead of Tune's tables of every metric."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "specialized_top1" not in result:
                return
            line = (f"[trial {trial.trial_id}] epoch {result.get('epoch')}: specialized "
                    f"{result['specialized_top1']:.1%}, general {result.get('general_top1', float('nan')):.1%}, "
                    f"loss {result.get('train_loss', float('nan')):.3f}")
            if "wiseft_best_alpha" in result:
                line += f", WiSE-FT best alpha {result['wiseft_best_alpha']:g}"
            print(line, flush=True)

        finished = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            print(f"[trial {trial.trial_id}] finished ({self.finished} this session)", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[trial {trial.trial_id}] failed; see its MLflow run's study.failure_reason tag", flush=True)

    return Progress()


def sweep_path(storage: str, name: str) -> str:
    """Where Tune keeps the sweep's state: ``<storage_path>/<name>`` (a local path or a URI)."""
    return f"{storage.rstrip('/')}/{name}"


def driver_trainable(context: SweepContext):
    """The Tune trainable: :func:`trial_driver` with the study context, placed on the head node.

    The driver only waits on its TorchTrainer, so it holds no CPU (the workers do). Pinning it to the
    head means losing a worker node never kills a driver: Train restarts the lost workers elsewhere.
    """
    from ray import tune

    bundle = {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}
    return tune.with_resources(tune.with_parameters(trial_driver, context=context.model_dump()),
                               tune.PlacementGroupFactory([bundle]))


def make_tuner(cfg: StudyConfig, params: dict, context: SweepContext, storage: str, name: str,
               resume: bool):
    """A new ``Tuner`` for the sweep, or the restored one when ``resume`` is set."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = driver_trainable(context)
    path = sweep_path(storage, name)
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    metrics = [o.metric for o in cfg.search.objective]
    modes = [o.mode for o in cfg.search.objective]
    sampler = (optuna.samplers.NSGAIISampler(seed=cfg.search.seed) if cfg.multi_objective
               else optuna.samplers.TPESampler(seed=cfg.search.seed, n_startup_trials=min(4, cfg.search.trials)))
    storage_url = cfg.search.optuna_storage or os.environ.get("OPTUNA_STORAGE")
    # OptunaSearch owns metric and mode (for multi-objective search TuneConfig must not set them).
    searcher = OptunaSearch(metric=metrics if cfg.multi_objective else metrics[0],
                            mode=modes if cfg.multi_objective else modes[0], sampler=sampler,
                            storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,
                            study_name=f"{cfg.name}/{name}" if storage_url else None)
    # reuse_actors=False: a stopped trial's actor is terminated, and with it the Train controller and the
    # workers it owns; a reused actor would keep them (and their CPUs/GPUs) alive.
    tune_config = tune.TuneConfig(search_alg=searcher, num_samples=cfg.search.trials, reuse_actors=False,
                                  max_concurrent_trials=concurrency(cfg), scheduler=early_stopping(cfg, params))
    return tune.Tuner(trainable, param_space=tune_space(params), tune_config=tune_config,
                      run_config=run_config(name, storage))


def run_config(name: str, storage: str):
    """Tune's RunConfig: state under ``<storage>/<name>``, our progress lines, a failed trial stays failed
    (its Train run already retried lost workers)."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=[progress_callback()],
                          failure_config=tune.FailureConfig(max_failures=0))


def concurrency(cfg: StudyConfig) -> int:
    """``search.max_concurrent``, or for ``auto`` as many trials as the cluster's resources hold now."""
    if cfg.search.max_concurrent != "auto":
        return cfg.search.max_concurrent
    import ray

    free = ray.cluster_resources()
    r = cfg.resources
    fits = int(free.get("CPU", 0) // (r.workers_per_trial * r.cpus_per_worker))
    if r.gpus_per_worker:
        fits = min(fits, int(free.get("GPU", 0) // (r.workers_per_trial * r.gpus_per_worker)))
    fits = max(1, fits)
    print(f"[study] max_concurrent auto: {fits} trial(s) at once (cluster: {free.get('CPU', 0):g} CPUs, "
          f"{free.get('GPU', 0):g} GPUs; {r.workers_per_trial} worker(s) x {r.cpus_per_worker:g} CPU, "
          f"{r.gpus_per_worker:g} GPU per trial)", flush=True)
    return fits


def max_epochs(params: dict) -> int:
    e = params.get("epochs", TrialSettings().epochs)
    if isinstance(e, Categorical):
        return int(max(e.choices))
    return int(getattr(e, "high", e))


def early_stopping(cfg: StudyConfig, params: dict):
    """ASHA over epochs, on the first objective unless ``early_stopping.metric`` says otherwise."""
    es = cfg.search.early_stopping
    if es is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    first = cfg.search.objective[0]
    metric = es.metric or first.metric
    mode = es.mode or (first.mode if metric == first.metric else "min" if metric == "train_loss" else "max")
    # Rungs lie below the last epoch; a trial writes all its final records before its last report, so
    # ASHA's stop at max_t loses nothing.
    return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=max_epochs(params),
                         grace_period=es.grace_period, reduction_factor=es.reduction_factor)


def make_replicate_tuner(configs: list[dict], context: SweepContext, storage: str, name: str, resume: bool,
                         cfg: StudyConfig):
    """A Tuner that runs each of ``configs`` once (a grid, no searcher): the seed replicates."""
    from ray import tune

    trainable = driver_trainable(context)
    path = sweep_path(storage, name)
    if resume and restorable(storage, name):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(trainable, param_space={"replicate": tune.grid_search(configs)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(cfg), reuse_actors=False),
                      run_config=run_config(name, storage))


def restorable(storage: str, name: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(sweep_path(storage, name))


def run_sweep(build_tuner, address: str | None):
    """Start (or join) Ray, build the tuner (``with_parameters`` needs Ray up), run the sweep, shut Ray
    down; returns Tune's ``ResultGrid``."""
    import ray

    # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner needs to
    # free the workers of a trial that was stopped early or lost its driver.
    ray.init(address=address, log_to_driver=True, include_dashboard=None if address else True,
             dashboard_host="127.0.0.1", configure_logging=True, logging_level="WARNING")
    try:
        return build_tuner().fit()
    finally:
        ray.shutdown()
