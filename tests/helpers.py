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
