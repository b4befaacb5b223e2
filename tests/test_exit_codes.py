"""Exit codes a script can trust, and a sweep's parent run never left RUNNING (CI's slow stage)."""

from __future__ import annotations

import pytest

from helpers import mlflow_runs, run_cli

pytestmark = pytest.mark.slow


def _kinds(runs, kind: str) -> list:
    return [r for r in runs if r.data.tags.get("study.kind") == kind]


def test_a_sweep_whose_every_trial_fails_exits_1_with_the_reasons_counted(tmp_path, smoke_cache):
    # A learning rate of 1e30 overflows the loss in the first step of every trial.
    proc = run_cli(["--smoke-test", "--set", "learning_rate=1e30"], tmp_path, smoke_cache, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trials: 0 finished, 2 failed" in proc.stdout
    assert "failure reasons: 2 x NonFiniteLossError" in proc.stdout
    c, runs = mlflow_runs(tmp_path)
    parent = _kinds(runs, "sweep")[0]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["study.failure_reason"].startswith("all 2 trials failed: 2 x NonFiniteLossError")
    assert all(r.info.status != "RUNNING" for r in runs)


def test_resume_with_more_trials_extends_the_sweep(tmp_path, smoke_cache):
    args = ["--smoke-test", "--trials", "1", "--max-concurrent", "1"]
    first = run_cli(args, tmp_path, smoke_cache, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = run_cli(["--smoke-test", "--trials", "3", "--max-concurrent", "1", "--resume"], tmp_path, smoke_cache,
                   timeout=900)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "extending the sweep from 1 to 3 trials" in more.stdout
    assert "trials: 3 finished, 0 failed, 0 unfinished" in more.stdout
    c, runs = mlflow_runs(tmp_path)
    trials = _kinds(runs, "trial")
    assert len(_kinds(runs, "sweep")) == 1 and len(_kinds(runs, "baseline")) == 1
    assert len({r.data.tags["study.trial_id"] for r in trials}) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the extension is searched, not replayed: its trials draw new learning rates
    assert len({r.data.params["learning_rate"] for r in trials}) == 3
