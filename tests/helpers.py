"""Helpers for tests that drive the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 300, env: dict | None = None):
    """Run ``python -m study.run`` as a user would, in ``cwd``; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "study.run", "--cache-dir", str(cache), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def mlflow_runs(cwd: Path, experiment: str = "clip-alignment-study"):
    """All runs of ``experiment`` in the default store under ``cwd``, as a list of mlflow Run objects."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return c, c.search_runs([exp.experiment_id], max_results=1000)


def log_final_records(c, run_id: str, metrics: dict) -> None:
    """A run's metrics as the study logs them: the top-level ones, and all of them in ``metrics/final.json``."""
    from mlflow.entities import Metric

    from study.tracking import log_metric_artifacts
    from study.vocabulary import top_level

    c.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in top_level(metrics).items()])
    log_metric_artifacts(c, run_id, metrics)


def log_sweep_config(c, parent_run_id: str, headline: str = "balanced_accuracy", **overrides) -> None:
    """A sweep's parent run holds its validated config as study.run logs it (``study_config.yaml``): the default
    space with ``evaluation.headline`` and any dotted ``overrides``; its objective follows the headline."""
    import yaml

    from study.config import load_study_config
    from study.tracking import CONFIG_ARTIFACT, log_dict_artifact

    cfg = load_study_config(None, [("evaluation.headline", headline),
                                   ("search.objective", [{"metric": f"specialized_{headline}", "mode": "max"}]),
                                   *overrides.items()])
    log_dict_artifact(c, parent_run_id, None, CONFIG_ARTIFACT, yaml.safe_dump(cfg.model_dump(mode="json")))


def trial_metrics(spec: float, gen: float, base: tuple = (0.2, 0.8), curve: dict | None = None,
                  chosen: float | None = None) -> dict:
    """A finished trial's last-epoch metrics as the worker logs them, both headline metrics alike: specialized
    ``spec`` and general ``gen`` on both parts, their changes against the baseline ``base`` with paired intervals
    (±3 points), and its WiSE-FT curve on both parts (``curve``: ``{alpha: (spec, gen)}``, ``chosen`` alpha)."""
    from study.vocabulary import changes

    m = {"weight_change_norm": 1.0, "steps": 100, "test/specialized_images": 400, "test/general_images": 500,
         "test/specialized_mcnemar_p": 0.01}
    baseline = {f"{part}/{role}_{metric}": b for part in ("val", "test") for role, b in zip(("specialized", "general"), base)
                for metric in ("top1", "balanced_accuracy")}
    for part in ("val", "test"):
        for metric in ("top1", "balanced_accuracy"):
            m[f"{part}/specialized_{metric}"], m[f"{part}/general_{metric}"] = spec, gen
    m.update(changes(m, baseline))
    for role, value, b in (("specialized", spec, base[0]), ("general", gen, base[1])):
        for metric in ("top1", "balanced_accuracy"):
            m[f"test/{role}_{metric}_gain_ci_low"] = value - b - 0.03
            m[f"test/{role}_{metric}_gain_ci_high"] = value - b + 0.03
    for alpha, (s, g) in (curve or {}).items():
        point = {f"{part}/{role}_{metric}": v for part in ("val", "test") for role, v in (("specialized", s), ("general", g))
                 for metric in ("top1", "balanced_accuracy")}
        point.update(changes(point, baseline))
        m.update({k.replace("/", f"/wiseft/alpha_{alpha:g}/", 1): v for k, v in point.items()})
        if alpha == chosen:
            m["wiseft_best_alpha"] = alpha
            m.update({k.replace("/", "/wiseft_best_", 1): v for k, v in point.items()})
    return m


def log_study(uri: str, experiment: str, trials: list, base: tuple = (0.2, 0.8), versions: dict | None = None,
              headline: str = "balanced_accuracy", baseline_extra: dict | None = None) -> str:
    """A finished sweep as study.run records it, in the store at ``uri``: the parent run (config, model and data
    params, run name), the baseline (specialized ``base[0]``, general ``base[1]`` on both parts and metrics) and
    ``trials`` (``(settings dict, metrics)``, numbered t01...); every run tagged with ``versions``
    (``{package: version}``). Returns the parent run id."""
    from mlflow.tracking import MlflowClient

    from study.settings import TrialSettings
    from study.tracking import log_dict_artifact

    c = MlflowClient(uri)
    exp = c.create_experiment(experiment)
    tags = {f"version.{k}": v for k, v in (versions or {}).items()}
    parent = c.create_run(exp, run_name="sweep 10:00:00 2026-12-01", tags={"study.kind": "sweep", **tags}).info.run_id
    for k, v in {"model.name": "clip-study-tiny", "data.finetune.source": "offline:micrographs"}.items():
        c.log_param(parent, k, v)
    log_sweep_config(c, parent, headline)
    baseline = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "baseline", **tags}).info.run_id
    values = {f"{part}/{role}_{m}": b for part in ("val", "test") for role, b in zip(("specialized", "general"), base)
              for m in ("top1", "balanced_accuracy")}
    values.update({f"test/{role}_chance_{m}": 0.25 for role in ("specialized", "general")
                   for m in ("top1", "balanced_accuracy")})
    log_final_records(c, baseline, {**values, **(baseline_extra or {})})
    c.set_terminated(baseline)
    for i, (settings, metrics) in enumerate(trials, 1):
        run = c.create_run(exp, run_name=f"t{i:02d}", tags={
            "mlflow.parentRunId": parent, "study.kind": "trial", "study.trial_id": f"{i:08x}",
            "study.trial_number": str(i), "study.status": "FINISHED", **tags}).info.run_id
        log_final_records(c, run, metrics)
        log_dict_artifact(c, run, TrialSettings(**settings).model_dump(), "trial_config.json")
        c.set_terminated(run)
    c.set_terminated(parent)
    return parent
