"""The study runner: one sweep of a validated study, from the MLflow parent run to the written report.

:func:`run_study` reads as its steps: :func:`open_sweep` (or resume one), run the
Tune sweep, :func:`close_stray_runs`, the optional :func:`run_replicates`, then
the summary and :func:`analyse`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, StudyConfig
from ..selection import holm
from ..vocabulary import BASELINE, COLLAPSED_TAG, DONE, ERROR
from ..vocabulary import FAILED as FAILED_STATUS
from ..vocabulary import FAILURE_TAG, GENERAL_TOP1
from ..vocabulary import INTERRUPTED as INTERRUPTED_STATUS
from ..vocabulary import (KIND_TAG, OVERLAP_METRIC, PARENT_TAG, REPLICATED, ROLES, SPECIALIZED_TOP1, SWEEP, SWEEP_TAG,
                          TEST, TRANSFER_NOTE_TAG, TRANSFER_TAG, UNFINISHED, VAL, key, top_level)
from . import tracking
from .prepare import Prepared
from .replicates import format_spreads, pick_best, replicate_configs, spread_metrics, spreads
from .summary import TrialOutcome, failure_counts, format_summary, headline_metrics
from .trial import SweepContext
from .tuner import collect, make_replicate_tuner, make_tuner, restorable, run_sweep, split_space, sweep_path
from .worker import WorkerJob


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

    def state_file(self, study: str) -> Path:
        """The sweep's own small state (ids of its runs, its Tune storage), for ``--resume``."""
        return self.output_dir / study / "sweep.json"

    def saved_state(self, study: str) -> Optional[dict]:
        """The state of the sweep ``--resume`` continues; None when no sweep was ever started here (an
        interrupt during the baseline leaves none); :class:`ConfigError` when the state is unreadable."""
        path = self.state_file(study)
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: {path}: unreadable sweep state ({exc})") from None
        missing = {"sweep", "storage", "tracking_uri", "parent_run_id", "experiment_id"} - set(state)
        if missing:
            raise ConfigError(f"--resume: {path}: sweep state lacks {', '.join(sorted(missing))}")
        return state


def start_sweep_runs(cfg: StudyConfig, prepared: Prepared, tracking_uri: str, sweep_name: str) -> dict:
    """Create the experiment, the sweep's parent run and its baseline child run."""
    c = tracking.client(tracking_uri)
    exp_id = tracking.ensure_experiment(c, cfg.name, tracking_uri)
    tags = {KIND_TAG: SWEEP, SWEEP_TAG: sweep_name, TRANSFER_TAG: "in-distribution" if prepared.transfer else "zero-shot",
            **({TRANSFER_NOTE_TAG: prepared.transfer} if prepared.transfer else {}), **tracking.provenance_tags()}
    parent = c.create_run(exp_id, tags=tags, run_name=sweep_label(sweep_name)).info.run_id
    try:
        baseline = record_sweep_start(c, exp_id, parent, cfg, prepared)
    except BaseException as exc:  # the sweep never started: close what was opened, then fail as before
        close_sweep({"tracking_uri": tracking_uri, "parent_run_id": parent, "experiment_id": exp_id},
                    130 if isinstance(exc, KeyboardInterrupt) else 1, f"{type(exc).__name__}: {exc}")
        raise
    return {"experiment_id": exp_id, "parent_run_id": parent, "baseline_run_id": baseline}


def sweep_label(sweep_name: str) -> str:
    """The parent run's name: ``sweep-20261129-093105`` -> ``sweep 09:31:05 2026-11-29``, the part that tells
    sweeps apart first (the runs table cuts long names)."""
    m = re.fullmatch(r"sweep-(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})(\d{2})", sweep_name)
    return f"sweep {m[4]}:{m[5]}:{m[6]} {m[1]}-{m[2]}-{m[3]}" if m else sweep_name


def record_sweep_start(c, exp_id: str, parent: str, cfg: StudyConfig, prepared: Prepared) -> str:
    """The parent run's params and artifacts, and the baseline run (closed); returns the baseline's run id."""
    tracking.log_params(c, parent, {"search.trials": str(cfg.search.trials),
                                    "evaluation.headline": cfg.evaluation.headline,
                                    "search.objective": ",".join(f"{o.metric}:{o.mode}" for o in cfg.search.objective),
                                    "search.sampler": cfg.search.sampler,
                                    "model.name": cfg.model.name, "model.pretrained": str(prepared.model_pretrained),
                                    "data.finetune.source": cfg.data.finetune.source,
                                    "data.finetune.pairs": str(prepared.finetune_pairs)})
    tracking.log_dict_artifact(c, parent, None, "study_config.yaml",
                               yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tracking.log_dict_artifact(c, parent, tracking.package_versions(), "package_versions.json")
    base_tags = {PARENT_TAG: parent, KIND_TAG: BASELINE, **tracking.provenance_tags()}
    label = sweep_label(c.get_run(parent).data.tags.get(SWEEP_TAG, ""))
    baseline = c.create_run(exp_id, tags=base_tags, run_name=f"{BASELINE} · {label}").info.run_id
    tracking.log_params(c, baseline, {"model.name": cfg.model.name, "model.pretrained": str(prepared.model_pretrained)})
    inputs = tracking.dataset_inputs(cfg.data, {"finetune": "training", "specialized": "evaluation",
                                                "general": "evaluation"})  # each local source stamped once
    c.log_inputs(parent, inputs)
    c.log_inputs(baseline, [i for i in inputs if i.tags[0].value == "evaluation"])
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(parent, metrics=[Metric(f"{OVERLAP_METRIC}/{name}", v["images"], now, 0)
                                 for name, v in prepared.overlap.items()])
    c.log_batch(baseline, metrics=[Metric(k, v, now, 0) for k, v in top_level(prepared.baseline).items()])
    tracking.log_metric_artifacts(c, baseline, prepared.baseline, prepared.baseline_confusions)
    for bench, (matrix, classnames) in prepared.baseline_confusions.items():
        tracking.log_confusion(c, baseline, bench, matrix, classnames)
    c.set_terminated(baseline)
    return baseline


def open_sweep(cfg: StudyConfig, prepared: Prepared, opts: RunOptions) -> dict:
    """A new sweep (parent and baseline runs written, state saved), or the interrupted one to resume."""
    state_file = opts.state_file(cfg.name)
    state = opts.saved_state(cfg.name) if opts.resume else None
    if opts.resume and state is None:
        print(f"[study] --resume: no sweep of study {cfg.name!r} was started under {opts.output_dir}; "
              f"starting a new one", flush=True)
    if state is not None:
        state["tracking_uri"] = opts.tracking_uri  # the preflight's: the saved one unless a flag moved the store
        # A part Tune never saved (an interrupt just after the parent run was written) starts afresh.
        print(f"[study] resuming sweep {state['sweep']} (parent run {state['parent_run_id']})", flush=True)
        reopen(state)
        return state
    sweep_name = time.strftime("sweep-%Y%m%d-%H%M%S")
    tracking_uri = opts.tracking_uri  # checked and made absolute by the preflight
    state = {"sweep": sweep_name, "tracking_uri": tracking_uri, "parts": [sweep_name],
             "part_trials": {sweep_name: cfg.search.trials},
             "storage": opts.storage_path or str(opts.output_dir / cfg.name / "ray"), "baseline": prepared.baseline,
             **start_sweep_runs(cfg, prepared, tracking_uri, sweep_name)}
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state, indent=2))
    return state


def reopen(state: dict) -> None:
    """Mark a resumed sweep's parent run RUNNING again (an interruption closed it as KILLED)."""
    c = tracking.client(state["tracking_uri"])
    parent = c.get_run(state["parent_run_id"])
    if parent.info.status != "RUNNING":
        c.update_run(state["parent_run_id"], status="RUNNING")
    if FAILURE_TAG in parent.data.tags:
        c.delete_tag(state["parent_run_id"], FAILURE_TAG)


def sweep_context(cfg: StudyConfig, fixed: dict, prepared: Prepared, opts: RunOptions, state: dict) -> SweepContext:
    """What every trial of the sweep shares, typed."""
    job = WorkerJob(data=cfg.data, model_name=cfg.model.name, model_pretrained=prepared.model_pretrained,
                    precision=cfg.model.precision, cache_dir=str(opts.cache_dir),
                    cpus_per_worker=cfg.resources.cpus_per_worker, tracking_uri=state["tracking_uri"],
                    baseline=state["baseline"], baseline_predictions=prepared.baseline_predictions,
                    evaluation=cfg.evaluation, prefix_depths=prepared.prefix_depths,
                    runner="tune" if in_tune(cfg) else "train")
    return SweepContext(job=job, fixed=fixed, experiment_id=state["experiment_id"],
                        parent_run_id=state["parent_run_id"],
                        train_storage=f"{sweep_path(state['storage'], state['sweep'])}/train",
                        workers_per_trial=cfg.resources.workers_per_trial,
                        gpus_per_worker=cfg.resources.gpus_per_worker, max_failures=cfg.resources.max_failures,
                        training_input=tracking.training_input(tracking.client(state["tracking_uri"]),
                                                               state["parent_run_id"]))


def in_tune(cfg: StudyConfig) -> bool:
    """Whether each trial trains in its Tune trial rather than in a Ray Train run (``resources.trial_runner``)."""
    return cfg.resources.trial_runner == "auto" and cfg.resources.workers_per_trial == 1


def run_study(cfg: StudyConfig, params: dict, prepared: Prepared, opts: RunOptions) -> int:
    """Run (or resume) one sweep of ``cfg`` and report it. Returns the exit code: 0 at least one trial
    finished, 1 every trial failed (or the sweep itself broke), 130 interrupted. Whatever happens, the parent
    run is closed (FINISHED, FAILED or KILLED, with a reason tag), never left RUNNING."""
    try:
        state = open_sweep(cfg, prepared, opts)  # on failure, the runs it opened are closed already
    except KeyboardInterrupt:
        print("[study] interrupted while recording the sweep's start; nothing to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - e.g. the tracking store failing after the preflight
        print(f"[study] could not record the sweep at {opts.tracking_uri}: {one_line(exc)}", file=sys.stderr)
        return 1
    try:
        code, reason = sweep_and_report(cfg, params, prepared, opts, state)
    except KeyboardInterrupt:
        code, reason = 130, INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - any failure must still close the parent run
        print(f"[study] the sweep failed: {one_line(exc)}", file=sys.stderr, flush=True)
        code, reason = 1, f"{type(exc).__name__}: {str(exc)[:4000]}"
    if code == 130:
        print("[study] interrupted; continue this sweep with the same command plus --resume", flush=True)
    close_sweep(state, code, reason)
    return code


INTERRUPTED = "interrupted; continue with the same command plus --resume"


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def sweep_and_report(cfg: StudyConfig, params: dict, prepared: Prepared, opts: RunOptions,
                     state: dict) -> tuple[int, str]:
    """The sweep (all its parts), the replicates, the summary and the analysis: ``(exit code, reason)``."""
    b = state["baseline"]
    print(f"[study] baseline zero-shot top-1 (validation part): specialized {b[key(VAL, SPECIALIZED_TOP1)]:.1%}, "
          f"general {b[key(VAL, GENERAL_TOP1)]:.1%}", flush=True)
    fixed, _ = split_space(params)
    context = sweep_context(cfg, fixed, prepared, opts, state)
    # Save Tune's experiment state at every step (it is tiny), so a killed driver loses as little as
    # possible: a trial Tune never recorded would be sampled again under a new id on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # A trial stopped early is blocked inside TorchTrainer.fit(), so a graceful stop never returns; kill its
    # actor after a few seconds (Tune waits 600 s by default), which ends its Train run and frees its workers.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
    rows = sweep_parts(cfg, params, context, state, opts)
    close_stray_runs(state, rows)
    if any(r.status == UNFINISHED for r in rows) or len(rows) < cfg.search.trials:
        return 130, INTERRUPTED
    done = [r for r in rows if r.status == DONE]
    spread_lines = []
    if done and cfg.search.replicate_seeds > 1:
        spread = run_replicates(cfg, rows, context, state, opts)
        if spread is None:
            return 130, INTERRUPTED
        spread_lines = format_spreads(spread, state["baseline"])
    adjusted = annotate_trials(state, rows)
    log_headline(state, headline_metrics(rows, state["baseline"], cfg))
    print(format_summary(rows, state["baseline"], cfg, state["tracking_uri"], state["parent_run_id"], spread_lines,
                         adjusted, prepared.transfer, state["experiment_id"]), flush=True)
    if not done:
        return 1, f"all {len(rows)} trials failed: {failure_counts([r for r in rows if r.status == ERROR])}"
    analyse(state["tracking_uri"], cfg.name, state["parent_run_id"], opts.output_dir)
    return 0, ""


def log_headline(state: dict, metrics: dict[str, float]) -> None:
    """The sweep's headline numbers on its parent run (:func:`summary.headline_metrics`), so that the runs table
    shows them on the sweep's row."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracking.client(state["tracking_uri"]).log_batch(
        state["parent_run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def sweep_parts(cfg: StudyConfig, params: dict, context: SweepContext, state: dict,
                opts: RunOptions) -> list[TrialOutcome]:
    """Run (or restore) each Tune experiment of the sweep, then, when ``--resume`` asks for more trials than
    the sweep has, one more part with the missing trials, its sampler told the trials so far."""
    fixed = context.fixed
    planned = state.setdefault("part_trials", {})
    rows: list[TrialOutcome] = []
    complete = True
    for name in state.setdefault("parts", [state["sweep"]]):
        restore = opts.resume and restorable(state["storage"], name)
        part_ctx = context.model_copy(update={"trial_offset": len(rows)})  # run names number on across parts
        results, interrupted = run_sweep(lambda: make_tuner(cfg, params, part_ctx, state["storage"], name, restore,
                                                            planned.get(name), rows), opts.address)
        part = collect(results, fixed, interrupted, part_ctx.trial_offset)
        # interrupted: a trial cut off, or fewer trials than the part planned (a sweep saved before parts had
        # a plan counts as complete when nothing in it is unfinished)
        complete &= not any(r.status == UNFINISHED for r in part) and len(part) >= planned.get(name, len(part))
        rows += part
    missing = cfg.search.trials - len(rows)
    if not (opts.resume and complete and missing > 0):
        return rows
    name = f"{state['sweep']}-more{len(state['parts'])}"
    print(f"[study] extending the sweep from {len(rows)} to {cfg.search.trials} trials ({name})", flush=True)
    state["parts"].append(name)
    planned[name] = missing
    opts.state_file(cfg.name).write_text(json.dumps(state, indent=2))
    more = context.model_copy(update={"trial_offset": len(rows)})
    results, interrupted = run_sweep(lambda: make_tuner(cfg, params, more, state["storage"], name, False,
                                                        missing, rows), opts.address)
    return rows + collect(results, fixed, interrupted, more.trial_offset)


def close_sweep(state: dict, code: int, reason: str) -> None:
    """Close the parent run: FINISHED for exit 0, KILLED for an interruption, else FAILED, with the reason
    in ``study.failure_reason``; and any child run still open (the baseline; trials cut off mid-way, as
    ``study.status=INTERRUPTED``, which ``--resume`` reopens). A tracking store that is down
    now only costs a warning: ``--resume`` closes the runs later."""
    status = {0: "FINISHED", 130: "KILLED"}.get(code, "FAILED")
    try:
        c = tracking.client(state["tracking_uri"])
        children = c.search_runs([state["experiment_id"]], f"tags.`{PARENT_TAG}` = '{state['parent_run_id']}' "
                                 f"and attributes.status = 'RUNNING'", max_results=10000)
        for run in children:  # the baseline, or trials cut off mid-way (their drivers were stopped with Ray)
            if run.data.tags.get(KIND_TAG) != BASELINE:
                tracking.end_trial_run(c, run.info.run_id, INTERRUPTED_STATUS if code == 130 else FAILED_STATUS)
            else:  # the search returned only runs still RUNNING
                c.set_terminated(run.info.run_id, status=status)
        if c.get_run(state["parent_run_id"]).info.status == "RUNNING":
            if reason:
                c.set_tag(state["parent_run_id"], FAILURE_TAG, reason[:5000])
            c.set_terminated(state["parent_run_id"], status=status)
    except Exception as exc:  # noqa: BLE001 - closing must never hide the sweep's own outcome
        print(f"[study] warning: could not close the parent run {state['parent_run_id']} as {status} "
              f"({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr, flush=True)


def annotate_trials(state: dict, rows: list[TrialOutcome]) -> dict[str, float]:
    """After the sweep: Holm-adjust the finished trials' McNemar p-values against the baseline (specialized,
    test part) and log them beside the raw ones; tag trials whose test predictions collapsed. Returns the
    adjusted p-values by trial id."""
    from mlflow.entities import Metric

    raw = {r.trial_id: r.metrics.get(key(TEST, "specialized_mcnemar_p"), float("nan")) for r in rows
           if r.status == DONE}  # trials stopped early have no test p-value and are left out (NaN)
    adjusted = holm(raw)
    c, now = tracking.client(state["tracking_uri"]), int(time.time() * 1000)
    for r in rows:
        run = tracking.find_trial_run(c, state["experiment_id"], state["parent_run_id"], r.trial_id)
        if run is None or r.status != DONE:
            continue
        if r.trial_id in adjusted:
            c.log_batch(run.info.run_id, metrics=[Metric(key(TEST, "specialized_mcnemar_p_holm"), adjusted[r.trial_id],
                                                         now, 0)])
        collapsed = [role for role in ROLES if r.metrics.get(key(TEST, f"{role}_collapsed"), 0) >= 1]
        if collapsed:
            c.set_tag(run.info.run_id, COLLAPSED_TAG, ",".join(collapsed))
    return adjusted


def close_stray_runs(state: dict, rows: list[TrialOutcome]) -> None:
    """Close the runs of trials Tune never recorded (ORPHANED) and of trials the scheduler stopped."""
    c = tracking.client(state["tracking_uri"])
    orphans = tracking.mark_orphans(c, state["experiment_id"], state["parent_run_id"], {r.trial_id for r in rows})
    if orphans:
        print(f"[study] {len(orphans)} MLflow run(s) of trials that Tune never recorded before the interruption "
              f"were marked ORPHANED: {', '.join(orphans)}", flush=True)
    stopped = tracking.close_stopped_runs(c, state["experiment_id"], state["parent_run_id"],
                                          {r.trial_id for r in rows if r.status == DONE})
    if stopped:
        print(f"[study] early stopping ended {len(stopped)} trial(s) before their last epoch: {', '.join(stopped)}",
              flush=True)


def run_replicates(cfg: StudyConfig, rows: list[TrialOutcome], context: SweepContext, state: dict,
                   opts: RunOptions):
    """Rerun the best configurations with more seeds; log the spread to the parent run. None if interrupted."""
    from mlflow.entities import Metric

    objective = cfg.search.objective[0]
    best = pick_best(rows, key(VAL, objective.metric), objective.mode, cfg.search.replicate_top)
    configs = replicate_configs(best, cfg.search.replicate_seeds, context.fixed)
    print(f"[study] seed replicates: {len(best)} configuration(s) x {cfg.search.replicate_seeds - 1} more seed(s) "
          f"= {len(configs)} trial(s)", flush=True)
    name = f"{state['sweep']}-replicates"
    results, interrupted = run_sweep(lambda: make_replicate_tuner(configs, context, state["storage"], name,
                                                                  opts.resume, cfg), opts.address)
    replicate_rows = collect(results, context.fixed, interrupted)
    if any(r.status == UNFINISHED for r in replicate_rows) or len(replicate_rows) < len(configs):
        print("[study] replicates stopped before they finished; continue with the same command plus --resume",
              flush=True)
        return None
    spread = spreads(best, replicate_rows)
    c = tracking.client(state["tracking_uri"])
    now = int(time.time() * 1000)
    c.log_batch(state["parent_run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in spread_metrics(spread).items()])
    table = ["trial_id,seeds," + ",".join(f"{k}_mean,{k}_sd" for k in REPLICATED)]
    table += [f"{s.trial_id},{s.n}," + ",".join(f"{s.mean(k)},{s.sd(k)}" if k in s.values else "," for k in REPLICATED)
              for s in spread]
    tracking.log_dict_artifact(c, state["parent_run_id"], None, "replicates.csv", "\n".join(table) + "\n")
    return spread


def analyse(tracking_uri: str, experiment: str, parent_run_id: str, output_dir: Path) -> None:
    """Write the trade-off report; a failure here never undoes a finished sweep."""
    from analysis.report import run_analysis

    try:
        report, _ = run_analysis(tracking_uri, experiment, parent_run_id, (output_dir / "analysis").resolve(),
                                 sweep_done=True)
    except Exception as exc:  # the sweep's runs are safe in MLflow; say how to retry
        print(f"[study] analysis failed ({type(exc).__name__}: {exc}); rerun it with: python -m analysis "
              f"--experiment {experiment} --parent-run {parent_run_id} --tracking-uri {tracking_uri}", flush=True)
        return
    print(f"[study] trade-off report: {report} (also on the parent run under analysis/)", flush=True)
