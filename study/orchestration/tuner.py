"""Ray Tune + Optuna: the search space, the searcher, the scheduler, running a sweep, and its results.

The project's Tune wiring lives here and in :mod:`.trial`; every non-obvious
setting carries a one-line reason.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from ..config import Categorical, IntRange, LogUniform, QUniform, SearchSpace, StudyConfig, Uniform
from ..settings import TrialSettings
from ..tracking import trial_label
from ..vocabulary import DONE, ERROR, GENERAL_TOP1, SPECIALIZED_TOP1, TEST, TRAIN_METRICS, UNFINISHED, VAL, key
from .trial import REPLICATE_GRID, SweepContext, driver_trainable, failure_reason, number_in, unpack


@dataclass
class TrialOutcome:
    """A Tune trial as the sweep sees it once Tune returns (:func:`collect`)."""

    trial_id: str
    status: str  # vocabulary.DONE, ERROR or UNFINISHED
    settings: Optional[TrialSettings]
    metrics: dict
    error: str = ""
    replicate_of: Optional[str] = None  # for a seed replicate: the sweep trial it reruns
    config: dict = field(default_factory=dict)  # the knob values Tune sampled for it (searched knobs only)
    number: Optional[int] = None  # its number in the sweep, as its MLflow run's name starts (t03)

    @property
    def label(self) -> str:
        return trial_label(self.number, self.trial_id, self.replicate_of is not None)


def tune_space(searched: dict) -> dict:
    """Ray Tune sampling primitives for the searched knobs (``SearchSpace.searched``; the fixed ones travel typed,
    in the trials' context)."""
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in searched.items():
        if isinstance(p, LogUniform):
            out[name] = tune.loguniform(p.low, p.high)
        elif isinstance(p, Uniform):
            out[name] = tune.uniform(p.low, p.high)
        elif isinstance(p, QUniform):
            out[name] = tune.quniform(p.low, p.high, p.q)
        elif isinstance(p, IntRange):  # inclusive high, as the YAML reads
            out[name] = (tune.lograndint if p.distribution == "logint" else tune.randint)(p.low, p.high + 1)
        elif isinstance(p, Categorical):  # scalars only: a list knob is searched as "attn+mlp"
            out[name] = tune.choice(p.choices)
    return out


def progress_callback(offset: int = 0):
    """One line per epoch and per finished trial, and a compact table of every trial (status, epoch, validation
    top-1, loss) when a trial ends and at most once a minute, instead of Tune's tables of every metric. Trials
    are named as their MLflow runs (``t03 <id>``; ``offset``: the sweep's earlier parts' trials)."""
    from ray import tune

    class Progress(tune.Callback):
        finished = 0
        shown = 0.0  # when the table was last printed

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if key(VAL, SPECIALIZED_TOP1) not in result:
                return
            line = (f"[trial {label(trial, offset)}] epoch {result.get('epoch')}: validation top-1 specialized "
                    f"{result[key(VAL, SPECIALIZED_TOP1)]:.1%}, general "
                    f"{result.get(key(VAL, GENERAL_TOP1), float('nan')):.1%}, loss "
                    f"{result.get('train_loss', float('nan')):.3f}")
            if "wiseft_best_alpha" in result:
                line += f", WiSE-FT best alpha {result['wiseft_best_alpha']:g}"
            print(line, flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished += 1
            print(f"[trial {label(trial, offset)}] finished ({self.finished} this session)", flush=True)
            self.table(trials, {trial.trial_id: "TERMINATED"})  # Tune sets its status after this call

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[trial {label(trial, offset)}] failed; see its MLflow run's study.failure_reason tag", flush=True)
            self.table(trials, {trial.trial_id: "ERROR"})

        def on_step_end(self, iteration, trials, **info):
            if time.time() - self.shown >= 60 and any(t.status == "RUNNING" for t in trials):
                self.table(trials)

        def table(self, trials, ended: dict | None = None) -> None:
            self.shown = time.time()
            print(trial_table(trials, ended, offset), flush=True)

    return Progress()


def label(trial, offset: int = 0) -> str:
    """A Tune ``Trial`` named as its MLflow run is (``t03 <id>``, ``rep <id>``): Tune's count leads its
    ``experiment_tag``."""
    replicate = unpack(trial.config or {})[1] is not None
    return trial_label(number_in(trial.experiment_tag or "", trial.trial_id, offset), trial.trial_id, replicate)


def trial_table(trials, ended: dict | None = None, offset: int = 0) -> str:
    """Tune's trials as a compact table: id, status (``ended`` overrides it by trial id), last epoch, validation
    top-1 (specialized, general) and training loss of the last result."""
    from collections import Counter

    status = {t.trial_id: (ended or {}).get(t.trial_id, t.status) for t in trials}
    counts = Counter(status.values())
    lines = ["[study] trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())),
             f"  {'trial':<16}{'status':<12}{'epoch':>6}{'val spec.':>11}{'val gen.':>10}{'loss':>8}"]
    for t in trials:
        r = t.last_result or {}
        spec, gen = r.get(key(VAL, SPECIALIZED_TOP1)), r.get(key(VAL, GENERAL_TOP1))
        lines.append(f"  {label(t, offset):<16}{status[t.trial_id]:<12}{r.get('epoch', '-')!s:>6}"
                     f"{'-' if spec is None else f'{spec:.1%}':>11}{'-' if gen is None else f'{gen:.1%}':>10}"
                     f"{'-' if 'train_loss' not in r else format(r['train_loss'], '.3f'):>8}")
    return "\n".join(lines)


def sweep_path(storage: str, name: str) -> str:
    """Where Tune keeps the sweep's state: ``<storage_path>/<name>`` (a local path or a URI)."""
    return f"{storage.rstrip('/')}/{name}"


def searcher(cfg: StudyConfig, name: str, seen: list[TrialOutcome] = ()):
    """OptunaSearch: TPE for one objective, NSGA-II for a Pareto search; optionally stored for optuna-dashboard.
    ``seen``: trials of the sweep's earlier parts (``--resume`` with more ``--trials``), told to the sampler
    as evaluated points so that the extension continues the search instead of restarting it."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory"; we print our own

    metrics = [key(VAL, o.metric) for o in cfg.search.objective]  # the search never sees a test number
    modes = [o.mode for o in cfg.search.objective]
    seed = cfg.search.seed + len(seen)  # an extension's sampler must not redraw the first part's random starts
    sampler = make_sampler(cfg, seed)
    storage_url = cfg.search.optuna_storage or os.environ.get("OPTUNA_STORAGE")
    told = [r for r in seen if r.config and all(m in r.metrics for m in metrics)]
    rewards = [[r.metrics[m] for m in metrics] if cfg.multi_objective else r.metrics[metrics[0]] for r in told]
    # OptunaSearch owns metric and mode (for multi-objective search TuneConfig must not set them).
    return OptunaSearch(metric=metrics if cfg.multi_objective else metrics[0],
                        mode=modes if cfg.multi_objective else modes[0], sampler=sampler,
                        points_to_evaluate=[r.config for r in told] or None, evaluated_rewards=rewards or None,
                        storage=optuna.storages.RDBStorage(storage_url) if storage_url else None,
                        study_name=f"{cfg.name}/{name}" if storage_url else None)


def make_sampler(cfg: StudyConfig, seed: int):
    """The Optuna sampler ``search.sampler`` names, seeded (see :class:`study.config.SearchSection`)."""
    import optuna

    name = cfg.search.sampler
    if name == "auto":
        name = "nsgaii" if cfg.multi_objective else "tpe"
    s = optuna.samplers
    if name == "tpe":
        return s.TPESampler(seed=seed, n_startup_trials=min(4, cfg.search.trials))
    if name == "stratified":
        from .stratified import StratifiedSampler

        return StratifiedSampler({k: len(d.choices) for k, d in cfg.space.searched.items() if isinstance(d, Categorical)},
                                 seed=seed)
    return picklable({"random": s.RandomSampler, "qmc": s.QMCSampler, "gp": s.GPSampler, "cmaes": s.CmaEsSampler,
                      "nsgaii": s.NSGAIISampler, "nsgaiii": s.NSGAIIISampler}[name](seed=seed))


# Upstream workaround, optuna 5.1.0: BaseGASampler (NSGAIISampler, NSGAIIISampler) now holds a threading.Lock in
# `_thread_lock` (optuna/samplers/_ga/_base.py) and no longer pickles, while Ray Tune pickles its searcher, sampler
# included, every time it saves the experiment (OptunaSearch.save), which `--resume` restores. optuna 5.0 had no
# lock. Delete `picklable` and `_FreshLock` once `pickle.dumps(optuna.samplers.NSGAIISampler())` works again;
# tests/test_search.py keeps every sampler's pickle round trip tested, under the lock and the newest optuna.
class _FreshLock:
    """A ``threading.Lock`` that pickles as a new, released lock (as optuna's own JournalStorage does)."""

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def __reduce__(self):
        return _FreshLock, ()


def picklable(sampler):
    """``sampler`` with optuna 5.1's unpicklable GA-sampler lock swapped for :class:`_FreshLock`; any other
    sampler (and every sampler under optuna 5.0) is returned as it is."""
    if isinstance(getattr(sampler, "_thread_lock", None), type(threading.Lock())):
        sampler._thread_lock = _FreshLock()
    return sampler


def make_tuner(cfg: StudyConfig, context: SweepContext, storage: str, name: str, resume: bool,
               samples: int | None = None, seen: list[TrialOutcome] = ()):
    """A new ``Tuner`` for (a part of) the sweep, or the restored one when ``resume`` is set. ``samples``:
    trials in this part (default ``search.trials``); ``seen``: the earlier parts' trials (see :func:`searcher`)."""
    from ray import tune

    trainable = driver_trainable(context)
    if resume:
        return tune.Tuner.restore(sweep_path(storage, name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    tune_config = tune.TuneConfig(search_alg=searcher(cfg, name, seen), num_samples=samples or cfg.search.trials,
                                  reuse_actors=context.runner.reuse_actors,
                                  max_concurrent_trials=concurrency(cfg), scheduler=early_stopping(cfg))
    return tune.Tuner(trainable, param_space=tune_space(cfg.space.searched), tune_config=tune_config,
                      run_config=run_config(name, storage, context))


def run_config(name: str, storage: str, context: SweepContext):
    """Tune's RunConfig: state under ``<storage>/<name>``, our progress lines, and Tune's retries of a failed
    trial (the runner's: none when its Train run already retried lost workers)."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, verbose=0,
                          callbacks=[progress_callback(context.trial_offset)],
                          failure_config=tune.FailureConfig(max_failures=context.runner.retries(context.resources)))


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


def early_stopping(cfg: StudyConfig):
    """ASHA over epochs, on the first objective unless ``early_stopping.metric`` says otherwise."""
    es = cfg.search.early_stopping
    if es is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    first = cfg.search.objective[0]
    metric = es.metric or first.metric
    mode = es.mode or (first.mode if metric == first.metric else "min" if metric == "train_loss" else "max")
    metric = metric if metric in TRAIN_METRICS else key(VAL, metric)
    # Rungs lie below the last epoch; a trial writes all its final records before its last report, so
    # ASHA's stop at max_t loses nothing.
    return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=int(max(cfg.space.values("epochs"))),
                         grace_period=es.grace_period, reduction_factor=es.reduction_factor)


def make_replicate_tuner(configs: list[dict], context: SweepContext, storage: str, name: str, resume: bool,
                         cfg: StudyConfig):
    """A Tuner that runs each of ``configs`` once (a grid, no searcher): the seed replicates."""
    from ray import tune

    trainable = driver_trainable(context)
    if resume and restorable(storage, name):
        return tune.Tuner.restore(sweep_path(storage, name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    return tune.Tuner(trainable, param_space={REPLICATE_GRID: tune.grid_search(configs)},
                      tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(cfg),
                                                  reuse_actors=context.runner.reuse_actors),
                      run_config=run_config(name, storage, context))


def restorable(storage: str, name: str) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(sweep_path(storage, name))


def run_sweep(build_tuner, address: str | None):
    """Start (or join) Ray, build the tuner (``with_parameters`` needs Ray up), run the sweep, shut Ray
    down; returns Tune's ``ResultGrid`` and whether a stop signal (Ctrl-C, ``kill``) interrupted it.

    Without ``address`` each study starts its own local Ray (``ray.init`` joins only a Ray that ``ray start``
    recorded, as on a cluster head; it never joins another study's), so studies on one machine share no
    lifetime and ``ray.shutdown()`` stops only the Ray this study started. Joining a running study's Ray
    instead would let its shutdown kill the other study's trials. A joined Ray is only disconnected.
    """
    import ray

    from .ray_address import init_ray

    # The dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner needs to
    # free the workers of a trial that was stopped early or lost its driver; init_ray points every worker's
    # state-API client at this study's Ray.
    where = f"joining Ray at {address}" if address and address != "local" else "starting a local Ray"
    print(f"[study] {where} and Tune; the trial table follows once trials start (seconds)", flush=True)
    init_ray(address, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    # Tune's newer console output prints a configuration box and a TensorBoard hint even when silent; its
    # legacy output at verbose=0 prints nothing. The study prints its own lines (progress_callback).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    previous = signal.signal(signal.SIGTERM, term_as_interrupt)  # ray.init installed its own, which aborts
    on_int = signal.getsignal(signal.SIGINT)
    try:
        results = build_tuner().fit()
        # Tune's fit() installs a SIGINT handler that, once it catches a stop, puts back the one it replaced
        # (ray/tune/tune.py, _setup_signal_catching). Its stop also ends the trials that train in Tune as
        # TERMINATED, so only this tells an interrupted trial from one the scheduler stopped.
        interrupted = (signal.getsignal(signal.SIGINT) is on_int
                       and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")))
        return results, interrupted
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, on_int)


def term_as_interrupt(signum, frame) -> None:
    """SIGTERM handler (``kill``, a batch scheduler's stop): the same graceful stop as Ctrl-C. Tune stops its
    trials and saves its state, the study closes its runs as KILLED and exits 130, and ``--resume``
    continues."""
    os.kill(os.getpid(), signal.SIGINT)


def collect(results, terminated: int, space: SearchSpace, interrupted: bool = False,
            offset: int = 0) -> list[TrialOutcome]:
    """Tune's results (``Result`` objects; ``terminated``: how many trials Tune finished) as typed
    :class:`TrialOutcome` rows; the trial id is Tune's own (``Result.metrics`` always carries it, reported or not).
    After an interruption (see :func:`run_sweep`) a trial without its last epoch's test numbers is UNFINISHED,
    which ``--resume`` continues. ``offset``: the sweep's earlier parts' trials, for the numbers."""
    rows = []
    for r in results:
        metrics = dict(r.metrics or {})
        # DONE: ran and reported (the scheduler may have stopped it early, then it has no test numbers)
        status = ERROR if r.error else (DONE if key(VAL, SPECIALIZED_TOP1) in metrics else UNFINISHED)
        config = dict(r.config or {})
        sampled, replicate_of = unpack(config)
        try:
            settings = space.settings(sampled)
        except ValidationError:
            settings, replicate_of = None, None
        number = number_in(os.path.basename(str(r.path or "")), metrics["trial_id"], offset)
        rows.append(TrialOutcome(metrics["trial_id"], status, settings, metrics,
                                 failure_reason(r.error) if r.error else "", replicate_of, config, number))
    if interrupted or sum(r.status == DONE for r in rows) > terminated:
        # An interruption: Tune finished fewer trials than reported epochs. The ones without their last
        # epoch's test numbers were cut off, not stopped by the scheduler; --resume continues them.
        for r in rows:
            if r.status == DONE and key(TEST, SPECIALIZED_TOP1) not in r.metrics:
                r.status = UNFINISHED
    return rows
