"""One sweep of a study, owned by :class:`Sweep`: from its MLflow parent run to its written report.

:meth:`Sweep.run` reads as the sweep's life: :meth:`Sweep.open` (a new sweep, or the interrupted one to resume),
:meth:`Sweep.search` (each Tune part, and an extension when ``--resume`` asks for more trials), the closing of
stray trial runs, the optional :meth:`Sweep.replicate`, :meth:`Sweep.annotate`, then :meth:`Sweep.report` (the
summary and the analysis, from one read of MLflow) and :meth:`Sweep.close`. Its typed state (:class:`SweepState`)
is saved beside the sweep's Tune state for ``--resume``; every MLflow write goes through its
:class:`~study.tracking.SweepRecorder`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ValidationError

from .. import tracking
from ..config import ConfigError, StudyConfig
from ..selection import holm
from ..vocabulary import DONE, ERROR, GENERAL_TOP1, REPLICATED, ROLES, SPECIALIZED_TOP1, TEST, UNFINISHED, VAL, key
from .prepare import Prepared
from .replicates import format_spreads, pick_best, replicate_configs, spread_metrics, spreads
from .runners import choose_runner
from .summary import failure_counts, format_summary, headline_metrics
from .trial import SweepContext
from .tuner import TrialOutcome, collect, make_replicate_tuner, make_tuner, restorable, run_sweep, sweep_path
from .worker import WorkerJob

INTERRUPTED = "interrupted; continue with the same command plus --resume"


@dataclass(frozen=True)
class RunOptions:
    """Where a sweep runs and records, as the command line gave it (paths absolute)."""

    output_dir: Path
    cache_dir: Path
    tracking_uri: Optional[str] = None  # None: MLflow's embedded store in the current directory
    storage_path: Optional[str] = None  # Ray storage shared by all nodes; None: under output_dir
    address: Optional[str] = None       # Ray cluster address; None: start a local Ray
    resume: bool = False
    tracking_flag: str = "--tracking-uri"  # where the tracking URI came from (a flag or MLFLOW_TRACKING_URI)
    smoke_test: bool = False  # --smoke-test: the parent run is tagged, so that no reader takes it for the study

    def state_file(self, study: str) -> Path:
        """The sweep's own small state (:class:`SweepState`), for ``--resume``."""
        return self.output_dir / study / "sweep.json"


class SweepState(BaseModel):
    """What a sweep is, for ``--resume``: its runs, its Tune storage and parts, its baseline. Saved as
    ``<output-dir>/<study>/sweep.json`` whenever it changes."""

    sweep: str                  # the first part's Tune experiment name, sweep-YYYYMMDD-HHMMSS
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    baseline_run_id: Optional[str] = None
    storage: str                # Tune's storage_path: the parts live in <storage>/<part>
    parts: list[str] = []       # the Tune experiments of the sweep, the first one first (an extension adds one)
    part_trials: dict[str, int] = {}  # trials each part planned
    baseline: dict[str, float] = {}   # the base model's metrics, every part of every benchmark

    def model_post_init(self, context) -> None:
        if not self.parts:  # states saved before parts had names
            self.parts = [self.sweep]

    @classmethod
    def load(cls, path: Path) -> Optional["SweepState"]:
        """The state saved at ``path``; None when no sweep was ever started there (an interrupt during the
        baseline leaves none); :class:`ConfigError` naming ``--resume`` when it cannot be read."""
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_text())
        except OSError as exc:
            raise ConfigError(f"--resume: {path}: unreadable sweep state ({exc})") from None
        except ValidationError as err:
            missing = sorted(str(e["loc"][0]) for e in err.errors() if e["type"] == "missing")
            if missing:
                raise ConfigError(f"--resume: {path}: sweep state lacks {', '.join(missing)}") from None
            raise ConfigError(f"--resume: {path}: unreadable sweep state ({err.errors()[0]['msg']})") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))


class Sweep:
    """One sweep of ``cfg``: its typed state, its MLflow recorder, the runner its trials use and the context they
    share. Build it with :meth:`open`; :meth:`run` does the rest and returns the exit code."""

    def __init__(self, cfg: StudyConfig, prepared: Prepared, opts: RunOptions, state: SweepState):
        self.cfg, self.prepared, self.opts, self.state = cfg, prepared, opts, state
        self.recorder = tracking.SweepRecorder(state.tracking_uri, state.experiment_id, state.parent_run_id)
        self.runner = choose_runner(cfg.resources)

    # ------------------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, cfg: StudyConfig, prepared: Prepared, opts: RunOptions) -> "Sweep":
        """The interrupted sweep ``--resume`` continues (its parent run reopened), or a new one: its parent and
        baseline runs written and its state saved. On a failure the runs it opened are closed already."""
        path = opts.state_file(cfg.name)
        state = SweepState.load(path) if opts.resume else None
        if opts.resume and state is None:
            print(f"[study] --resume: no sweep of study {cfg.name!r} was started under {opts.output_dir}; "
                  f"starting a new one", flush=True)
        if state is not None:
            state.tracking_uri = opts.tracking_uri  # the preflight's: the saved one unless a flag moved the store
            print(f"[study] resuming sweep {state.sweep} (parent run {state.parent_run_id})", flush=True)
            sweep = cls(cfg, prepared, opts, state)
            sweep.recorder.reopen()
            return sweep
        name = time.strftime("sweep-%Y%m%d-%H%M%S")
        recorder, baseline_run = tracking.SweepRecorder.start(cfg, prepared, opts.tracking_uri, name,
                                                              smoke=opts.smoke_test)
        state = SweepState(sweep=name, tracking_uri=opts.tracking_uri, experiment_id=recorder.experiment_id,
                           parent_run_id=recorder.parent_run_id, baseline_run_id=baseline_run,
                           storage=opts.storage_path or str(opts.output_dir / cfg.name / "ray"), parts=[name],
                           part_trials={name: cfg.search.trials}, baseline=prepared.baseline)
        state.save(path)
        return cls(cfg, prepared, opts, state)

    def save(self) -> None:
        self.state.save(self.opts.state_file(self.cfg.name))

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> int:
        """Search, replicate, annotate and report, then close the parent run. Returns the exit code: 0 at least
        one trial finished, 1 every trial failed (or the sweep itself broke), 130 interrupted. Whatever happens,
        the parent run is closed (FINISHED, FAILED or KILLED, with a reason tag), never left RUNNING."""
        try:
            code, reason = self._run()
        except KeyboardInterrupt:
            code, reason = 130, INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - any failure must still close the parent run
            print(f"[study] the sweep failed: {one_line(exc)}", file=sys.stderr, flush=True)
            code, reason = 1, f"{type(exc).__name__}: {str(exc)[:4000]}"
        if code == 130:
            print("[study] interrupted; continue this sweep with the same command plus --resume", flush=True)
        self.close(code, reason)
        return code

    def _run(self) -> tuple[int, str]:
        b = self.state.baseline
        print(f"[study] baseline zero-shot top-1 (validation part): specialized {b[key(VAL, SPECIALIZED_TOP1)]:.1%}, "
              f"general {b[key(VAL, GENERAL_TOP1)]:.1%}", flush=True)
        rows = self.search()
        self.close_strays(rows)
        if any(r.status == UNFINISHED for r in rows) or len(rows) < self.cfg.search.trials:
            return 130, INTERRUPTED
        done = [r for r in rows if r.status == DONE]
        spread_lines = []
        if done and self.cfg.search.replicate_seeds > 1:
            spread = self.replicate(rows)
            if spread is None:
                return 130, INTERRUPTED
            spread_lines = format_spreads(spread, self.state.baseline)
        self.annotate(rows)
        self.report(spread_lines, analyse=bool(done))
        if not done:
            return 1, f"all {len(rows)} trials failed: {failure_counts([r for r in rows if r.status == ERROR])}"
        return 0, ""

    def context(self, offset: int = 0) -> SweepContext:
        """What every trial of the sweep shares, typed; ``offset``: the trials of the parts before this one."""
        cfg, prepared, state = self.cfg, self.prepared, self.state
        job = WorkerJob(data=cfg.data, model_name=cfg.model.name, model_pretrained=prepared.model_pretrained,
                        precision=cfg.model.precision, cache_dir=str(self.opts.cache_dir),
                        cpus_per_worker=cfg.resources.cpus_per_worker, tracking_uri=state.tracking_uri,
                        baseline=state.baseline, baseline_predictions=prepared.baseline_predictions,
                        evaluation=cfg.evaluation, prefix_depths=prepared.prefix_depths)
        return SweepContext(job=job, space=cfg.space, runner=self.runner, resources=cfg.resources,
                            experiment_id=state.experiment_id, parent_run_id=state.parent_run_id,
                            train_storage=f"{sweep_path(state.storage, state.sweep)}/train", trial_offset=offset,
                            training_input=self.recorder.training_input())

    def tune(self, build_tuner) -> tuple:
        """Run one Tune experiment (``build_tuner()``: its Tuner, built once Ray is up): ``(results, interrupted)``."""
        # Save Tune's experiment state at every step (it is tiny), so a killed driver loses as little as
        # possible: a trial Tune never recorded would be sampled again under a new id on resume.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
        # A trial stopped early is blocked inside TorchTrainer.fit(), so a graceful stop never returns; kill its
        # actor after a few seconds (Tune waits 600 s by default), which ends its Train run and frees its workers.
        os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
        return run_sweep(build_tuner, self.opts.address)

    def search(self) -> list[TrialOutcome]:
        """Run (or restore) each Tune part of the sweep, then, when ``--resume`` asks for more trials than the
        sweep has, :meth:`extend` it."""
        state, rows, complete = self.state, [], True
        for name in state.parts:
            restore = self.opts.resume and restorable(state.storage, name)
            ctx = self.context(offset=len(rows))  # run names number on across parts
            results, interrupted = self.tune(lambda: make_tuner(self.cfg, ctx, state.storage, name, restore,
                                                                state.part_trials.get(name), rows))
            part = collect(results, results.num_terminated, self.cfg.space, interrupted, ctx.trial_offset)
            # interrupted: a trial cut off, or fewer trials than the part planned (a sweep saved before parts had
            # a plan counts as complete when nothing in it is unfinished)
            complete &= not any(r.status == UNFINISHED for r in part) and len(part) >= state.part_trials.get(
                name, len(part))
            rows += part
        missing = self.cfg.search.trials - len(rows)
        if self.opts.resume and complete and missing > 0:
            rows += self.extend(rows, missing)
        return rows

    def extend(self, rows: list[TrialOutcome], missing: int) -> list[TrialOutcome]:
        """One more Tune part with the ``missing`` trials, its sampler told the trials so far (``rows``)."""
        name = f"{self.state.sweep}-more{len(self.state.parts)}"
        print(f"[study] extending the sweep from {len(rows)} to {self.cfg.search.trials} trials ({name})", flush=True)
        self.state.parts.append(name)
        self.state.part_trials[name] = missing
        self.save()
        ctx = self.context(offset=len(rows))
        results, interrupted = self.tune(lambda: make_tuner(self.cfg, ctx, self.state.storage, name, False, missing,
                                                            rows))
        return collect(results, results.num_terminated, self.cfg.space, interrupted, ctx.trial_offset)

    def close_strays(self, rows: list[TrialOutcome]) -> None:
        """Close the runs of trials Tune never recorded (ORPHANED) and of trials the scheduler stopped."""
        orphans, stopped = self.recorder.close_strays({r.trial_id for r in rows},
                                                      {r.trial_id for r in rows if r.status == DONE})
        if orphans:
            print(f"[study] {len(orphans)} MLflow run(s) of trials that Tune never recorded before the interruption "
                  f"were marked ORPHANED: {', '.join(orphans)}", flush=True)
        if stopped:
            print(f"[study] early stopping ended {len(stopped)} trial(s) before their last epoch: "
                  f"{', '.join(stopped)}", flush=True)

    def replicate(self, rows: list[TrialOutcome]):
        """Rerun the best configurations with more seeds; record the spread on the parent run. None if
        interrupted."""
        cfg, state = self.cfg, self.state
        objective = cfg.search.objective[0]
        chosen = pick_best(rows, key(VAL, objective.metric), objective.mode, cfg.search.replicate_top)
        configs = replicate_configs(chosen, cfg.search.replicate_seeds, cfg.space)
        print(f"[study] seed replicates: {len(chosen)} configuration(s) x {cfg.search.replicate_seeds - 1} more "
              f"seed(s) = {len(configs)} trial(s)", flush=True)
        name, ctx = f"{state.sweep}-replicates", self.context()
        results, interrupted = self.tune(lambda: make_replicate_tuner(configs, ctx, state.storage, name,
                                                                      self.opts.resume, cfg))
        replicate_rows = collect(results, results.num_terminated, cfg.space, interrupted)
        if any(r.status == UNFINISHED for r in replicate_rows) or len(replicate_rows) < len(configs):
            print("[study] replicates stopped before they finished; continue with the same command plus --resume",
                  flush=True)
            return None
        spread = spreads(chosen, replicate_rows)
        self.recorder.log_metrics(spread_metrics(spread))
        table = ["trial_id,seeds," + ",".join(f"{k}_mean,{k}_sd" for k in REPLICATED)]
        table += [f"{s.trial_id},{s.n}," + ",".join(f"{s.mean(k)},{s.sd(k)}" if k in s.values else "," for k in REPLICATED)
                  for s in spread]
        self.recorder.log_table("replicates.csv", "\n".join(table) + "\n")
        return spread

    def annotate(self, rows: list[TrialOutcome]) -> None:
        """After the search: Holm-adjust the finished trials' McNemar p-values against the baseline (specialized,
        test part) and record them beside the raw ones; tag trials whose test predictions collapsed."""
        done = [r for r in rows if r.status == DONE]
        # trials stopped early have no test p-value and are left out (NaN)
        adjusted = holm({r.trial_id: r.metrics.get(key(TEST, "specialized_mcnemar_p"), float("nan")) for r in done})
        collapsed = {r.trial_id: [role for role in ROLES if r.metrics.get(key(TEST, f"{role}_collapsed"), 0) >= 1]
                     for r in done}
        self.recorder.annotate(adjusted, collapsed)

    def report(self, extra: list[str], analyse: bool) -> None:
        """The sweep as MLflow now holds it, read once: its headline numbers on the parent run, the summary on the
        console and (``analyse``) the trade-off report."""
        record = tracking.read_sweep(self.state.tracking_uri, self.cfg.name, self.state.parent_run_id)
        self.recorder.log_metrics(headline_metrics(record, self.cfg))
        print(format_summary(record, self.cfg, self.state.tracking_uri, extra), flush=True)
        if analyse:
            analyse_sweep(record, self.opts.output_dir)

    def close(self, code: int, reason: str) -> None:
        self.recorder.close(code, reason)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def run_study(cfg: StudyConfig, prepared: Prepared, opts: RunOptions) -> int:
    """Open (or resume) one sweep of ``cfg`` and run it; the exit code (see :meth:`Sweep.run`)."""
    try:
        sweep = Sweep.open(cfg, prepared, opts)
    except KeyboardInterrupt:
        print("[study] interrupted while recording the sweep's start; nothing to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - e.g. the tracking store failing after the preflight
        print(f"[study] could not record the sweep at {opts.tracking_uri}: {one_line(exc)}", file=sys.stderr)
        return 1
    return sweep.run()


def analyse_sweep(record: tracking.SweepRecord, output_dir: Path) -> None:
    """Write the trade-off report of the sweep read as ``record``; a failure here never undoes a finished sweep."""
    from analysis.report import run_analysis

    try:
        report, _ = run_analysis(record, (output_dir / "analysis").resolve(), sweep_done=True)
    except Exception as exc:  # the sweep's runs are safe in MLflow; say how to retry
        print(f"[study] analysis failed ({type(exc).__name__}: {exc}); rerun it with: python -m analysis "
              f"--experiment {record.experiment} --parent-run {record.parent_run_id} --tracking-uri "
              f"{record.tracking_uri}", flush=True)
        return
    print(f"[study] trade-off report: {report} (also on the parent run under analysis/)", flush=True)
