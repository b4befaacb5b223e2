"""Run one sweep of a validated study: MLflow parent and baseline runs, the Tune sweep, the summary."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from . import tracking
from .config import StudyConfig
from .prepare import Prepared
from .replicates import REPORTED, format_spreads, pick_best, replicate_configs, spread_metrics, spreads
from .summary import TrialOutcome, format_summary
from .sweep import (SweepContext, failure_reason, make_replicate_tuner, make_tuner, restorable, run_sweep,
                    sweep_path)
from .train_loop import WorkerJob


def start_sweep_runs(cfg: StudyConfig, prepared: Prepared, tracking_uri: str, sweep_name: str) -> dict:
    """Create the experiment, the sweep's parent run and its baseline child run."""
    c = tracking.client(tracking_uri)
    exp_id = tracking.ensure_experiment(c, cfg.name, tracking_uri)
    tags = {tracking.KIND_TAG: "sweep", "study.sweep": sweep_name, **tracking.provenance_tags()}
    parent = c.create_run(exp_id, tags=tags, run_name=sweep_name).info.run_id
    config_dump = cfg.model_dump(mode="json")
    tracking.log_params(c, parent, {"search.trials": str(cfg.search.trials),
                                    "search.objective": ",".join(f"{o.metric}:{o.mode}" for o in cfg.search.objective),
                                    "model.name": cfg.model.name, "model.pretrained": str(prepared.model_pretrained),
                                    "data.finetune.source": cfg.data.finetune.source,
                                    "data.finetune.pairs": str(prepared.finetune_pairs)})
    tracking.log_dict_artifact(c, parent, None, "study_config.yaml", yaml.safe_dump(config_dump, sort_keys=False))
    tracking.log_dict_artifact(c, parent, tracking.package_versions(), "package_versions.json")
    base_tags = {"mlflow.parentRunId": parent, tracking.KIND_TAG: "baseline", **tracking.provenance_tags()}
    baseline = c.create_run(exp_id, tags=base_tags, run_name="baseline").info.run_id
    tracking.log_params(c, baseline, {"model.name": cfg.model.name, "model.pretrained": str(prepared.model_pretrained)})
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(baseline, metrics=[Metric(k, v, now, 0) for k, v in prepared.baseline.items()])
    for bench, (matrix, classnames) in prepared.baseline_confusions.items():
        tracking.log_confusion(c, baseline, bench, matrix, classnames)
    c.set_terminated(baseline)
    return {"experiment_id": exp_id, "parent_run_id": parent, "baseline_run_id": baseline}


def collect(results) -> list[TrialOutcome]:
    rows = []
    for r in results:
        # Tune names trial folders "<trainable>_<trial id>_<index>_<params>"; failed trials may have no metrics.
        match = re.search(r"_([0-9a-f]{8})_\d+_", Path(r.path).name)
        trial_id = (r.metrics or {}).get("trial_id") or (match.group(1) if match else Path(r.path).name)
        status = "ERROR" if r.error else ("TERMINATED" if r.metrics and "specialized_top1" in r.metrics else "UNFINISHED")
        err = failure_reason(r.error) if r.error else ""
        rows.append(TrialOutcome(trial_id, status, dict(r.config or {}), dict(r.metrics or {}), err))
    return rows


def run_study(cfg: StudyConfig, params: dict, prepared: Prepared, args, state_file: Path) -> int:
    tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
    storage = args.storage_path or str((args.output_dir / cfg.name / "ray").resolve())
    if args.resume:
        state = json.loads(state_file.read_text())
        sweep_name, storage = state["sweep"], state["storage"]
        tracking_uri = args.tracking_uri or state["tracking_uri"]  # where the sweep's runs already are
        if not restorable(storage, sweep_name):
            print(f"error: --resume: no restorable Tune state at {sweep_path(storage, sweep_name)}", file=sys.stderr)
            return 2
        print(f"[study] resuming sweep {sweep_name} (parent run {state['parent_run_id']})", flush=True)
    else:
        sweep_name = time.strftime("sweep-%Y%m%d-%H%M%S")
        state = {"sweep": sweep_name, "tracking_uri": tracking_uri, "storage": storage,
                 "baseline": prepared.baseline,
                 **start_sweep_runs(cfg, prepared, tracking_uri, sweep_name)}
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(state, indent=2))
    print(f"[study] baseline zero-shot top-1: specialized {state['baseline']['specialized_top1']:.1%}, "
          f"general {state['baseline']['general_top1']:.1%}", flush=True)

    job = WorkerJob(settings={}, data=cfg.data, model_name=cfg.model.name, model_pretrained=prepared.model_pretrained,
                    precision=cfg.model.precision, cache_dir=str(args.cache_dir.resolve()),
                    cpus_per_worker=cfg.resources.cpus_per_worker, tracking_uri=tracking_uri,
                    baseline=state["baseline"], baseline_predictions=prepared.baseline_predictions,
                    evaluation=cfg.evaluation)
    context = SweepContext(job=job, experiment_id=state["experiment_id"], parent_run_id=state["parent_run_id"],
                           train_storage=f"{sweep_path(storage, sweep_name)}/train",
                           workers_per_trial=cfg.resources.workers_per_trial,
                           gpus_per_worker=cfg.resources.gpus_per_worker,
                           max_failures=cfg.resources.max_failures)
    # Save Tune's experiment state at every step (it is tiny), so a killed driver loses as little as
    # possible: a trial Tune never recorded would be sampled again under a new id on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # A trial stopped early is blocked inside TorchTrainer.fit(), so a graceful stop never returns; kill its
    # actor after a few seconds (Tune waits 600 s by default), which ends its Train run and frees its workers.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", "5")
    results = run_sweep(lambda: make_tuner(cfg, params, context, storage, sweep_name, resume=args.resume),
                        args.address)
    rows = collect(results)
    c = tracking.client(tracking_uri)
    orphans = tracking.mark_orphans(c, state["experiment_id"], state["parent_run_id"], {r.trial_id for r in rows})
    if orphans:
        print(f"[study] {len(orphans)} MLflow run(s) of trials that Tune never recorded before the interruption "
              f"were marked ORPHANED: {', '.join(orphans)}", flush=True)
    stopped = tracking.close_stopped_runs(c, state["experiment_id"], state["parent_run_id"],
                                          {r.trial_id for r in rows if r.status == "TERMINATED"})
    if stopped:
        print(f"[study] early stopping ended {len(stopped)} trial(s) before their last epoch: {', '.join(stopped)}",
              flush=True)
    unfinished = [r for r in rows if r.status == "UNFINISHED"]
    if unfinished or len(rows) < cfg.search.trials:
        print(f"[study] sweep stopped with {len(unfinished)} unfinished trial(s); continue it with the same "
              f"command plus --resume", flush=True)
        return 130
    spread_lines = []
    if cfg.search.replicate_seeds > 1:
        spread = run_replicates(cfg, rows, context, storage, f"{sweep_name}-replicates", args, c, state)
        if spread is None:
            return 130
        spread_lines = format_spreads(spread, state["baseline"])
    c.set_terminated(state["parent_run_id"])
    print(format_summary(rows, state["baseline"], cfg.name, tracking_uri, state["parent_run_id"],
                         cfg.multi_objective, spread_lines), flush=True)
    analyse(tracking_uri, cfg.name, state["parent_run_id"], args.output_dir)
    return 0


def run_replicates(cfg: StudyConfig, rows: list[TrialOutcome], context: SweepContext, storage: str, name: str,
                   args, c, state: dict):
    """Rerun the best configurations with more seeds; log the spread to the parent run. None if interrupted."""
    from mlflow.entities import Metric

    objective = cfg.search.objective[0]
    best = pick_best(rows, objective.metric, objective.mode, cfg.search.replicate_top)
    configs = replicate_configs(best, cfg.search.replicate_seeds)
    print(f"[study] seed replicates: {len(best)} configuration(s) x {cfg.search.replicate_seeds - 1} more seed(s) "
          f"= {len(configs)} trial(s)", flush=True)
    results = run_sweep(lambda: make_replicate_tuner(configs, context, storage, name, args.resume, cfg),
                        args.address)
    replicate_rows = collect(results)
    if any(r.status == "UNFINISHED" for r in replicate_rows) or len(replicate_rows) < len(configs):
        print("[study] replicates stopped before they finished; continue with the same command plus --resume",
              flush=True)
        return None
    spread = spreads(best, replicate_rows)
    now = int(time.time() * 1000)
    metrics = spread_metrics(spread)
    c.log_batch(state["parent_run_id"], metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    table = ["trial_id,seeds," + ",".join(f"{k}_mean,{k}_sd" for k in REPORTED)]
    for s in spread:
        table.append(f"{s.trial_id},{s.n}," + ",".join(
            f"{s.mean(k)},{s.sd(k)}" if k in s.values else "," for k in REPORTED))
    tracking.log_dict_artifact(c, state["parent_run_id"], None, "replicates.csv", "\n".join(table) + "\n")
    return spread


def analyse(tracking_uri: str, experiment: str, parent_run_id: str, output_dir: Path) -> None:
    """Write the trade-off report; a failure here never undoes a finished sweep."""
    from analysis.report import run_analysis

    try:
        report, _ = run_analysis(tracking_uri, experiment, parent_run_id, (output_dir / "analysis").resolve())
    except Exception as exc:  # the sweep's runs are safe in MLflow; say how to retry
        print(f"[study] analysis failed ({type(exc).__name__}: {exc}); rerun it with: python -m analysis "
              f"--experiment {experiment} --parent-run {parent_run_id} --tracking-uri {tracking_uri}", flush=True)
        return
    print(f"[study] trade-off report: {report} (also on the parent run under analysis/)", flush=True)
