"""The default offline study, exactly as a new user runs it (slow: the CI's second stage).

Run with ``python -m pytest -q -m slow``. It builds the offline world from scratch in a temporary
cache (data, then the base model's pretraining), runs all trials, and checks the claims the
project makes about the offline default: the base model has real general zero-shot ability, is
near chance on the specialized benchmark, and the sweep records every trial in MLflow.
"""

from __future__ import annotations

import json

import pytest

from helpers import mlflow_runs, run_cli

from study.tracking import run_metrics


@pytest.mark.slow
def test_default_study_from_scratch(tmp_path):
    proc = run_cli([], tmp_path, tmp_path / "cache", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-1500:])

    model_meta = json.loads(next((tmp_path / "cache" / "models").glob("*.json")).read_text())
    assert model_meta["general_zero_shot"]["top1"] >= 0.60, model_meta

    c, runs = mlflow_runs(tmp_path)
    baseline = run_metrics(c, next(r for r in runs if r.data.tags.get("study.kind") == "baseline"))  # all of them
    assert baseline["test/general_top1"] >= 0.60
    assert abs(baseline["test/specialized_top1"] - baseline["test/specialized_chance_balanced_accuracy"]) <= 0.15
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
    assert len(trials) == 8 and all(r.data.tags["study.status"] == "FINISHED" for r in trials)
    best = max(r.data.metrics["test/specialized_top1"] for r in trials)
    assert best > baseline["test/specialized_top1"], "fine-tuning must raise specialized zero-shot accuracy"
    assert "points vs baseline" in proc.stdout
