"""Exit codes a script can trust, and a sweep's parent run never left RUNNING (CI's slow stage)."""

from __future__ import annotations

import json

import pytest

from helpers import mlflow_runs, run_cli

pytestmark = pytest.mark.slow


def _kinds(runs, kind: str) -> list:
    return [r for r in runs if r.data.tags.get("study.kind") == kind]


def test_a_sweep_whose_every_trial_fails_exits_1_with_the_reasons_counted(tmp_path, smoke_cache):
    # A learning rate of 1e30 overflows the loss in the first step of every trial.
    proc = run_cli(["--smoke-test", "--set", "learning_rate=1e30"], tmp_path, smoke_cache, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    c, runs = mlflow_runs(tmp_path)
    parent = _kinds(runs, "sweep")[0]
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["trials_finished"] == 0 and parent.data.metrics["trials_failed"] == 2
    assert [r.data.tags["study.failure_reason"].split(":")[0] for r in _kinds(runs, "trial")] == \
        ["NonFiniteLossError"] * 2
    assert parent.data.tags["study.failure_reason"].startswith("all 2 trials failed: 2 x NonFiniteLossError")
    assert all(r.info.status != "RUNNING" for r in runs)


def test_resume_with_more_trials_extends_the_sweep(tmp_path, smoke_cache):
    args = ["--smoke-test", "--trials", "1", "--max-concurrent", "1"]
    first = run_cli(args, tmp_path, smoke_cache, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = run_cli(["--smoke-test", "--trials", "3", "--max-concurrent", "1", "--resume"], tmp_path, smoke_cache,
                   timeout=900)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    c, runs = mlflow_runs(tmp_path)
    trials = _kinds(runs, "trial")
    parent = _kinds(runs, "sweep")[0]
    assert parent.data.metrics["trials_finished"] == 3 and parent.data.metrics["trials_unfinished"] == 0
    state = json.loads((tmp_path / "outputs" / "clip-alignment-study" / "sweep.json").read_text())
    assert len(state["parts"]) == 2 and state["part_trials"][state["parts"][1]] == 2  # one more Tune part
    assert sorted(int(r.data.tags["study.trial_number"]) for r in trials) == [1, 2, 3]  # numbered on
    assert len(_kinds(runs, "sweep")) == 1 and len(_kinds(runs, "baseline")) == 1
    assert len({r.data.tags["study.trial_id"] for r in trials}) == 3
    assert {r.info.status for r in runs} == {"FINISHED"}
    # the extension is searched, not replayed: its trials draw new learning rates
    assert len({r.data.params["learning_rate"] for r in trials}) == 3
