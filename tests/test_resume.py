"""Interrupt a sweep mid-way, rerun with --resume: nothing finished reruns, each trial keeps one run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import mlflow_runs, run_cli

from study.tracking import run_metrics

EPOCHS = 4
ARGS = ["--smoke-test", "--trials", "2", "--max-concurrent", "1", "--set", f"params.epochs={EPOCHS}"]
# The Pareto search (NSGA-II): optuna 5.1's sampler holds a lock that Tune's save of the searcher could not pickle.
PARETO = ["--space", "pareto"]
EXPERIMENT = {"default": "clip-alignment-study", "pareto": "clip-alignment-pareto"}
OBJECTIVES = {"default": ["val/specialized_balanced_accuracy"],
              "pareto": ["val/specialized_balanced_accuracy", "val/general_balanced_accuracy"]}


def _query(db: Path, sql: str) -> list[str]:
    import sqlite3

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return [r[0] for r in con.execute(sql).fetchall()]
    except sqlite3.Error:
        return []


def _finished_trials(db: Path) -> list[str]:
    return _query(db, "select run_uuid from tags where key='study.status' and value='FINISHED'")


def _second_trial_started(db: Path) -> bool:
    """A trial that has not finished recorded its first epoch."""
    return bool(_query(db, "select distinct run_uuid from metrics where key='train_loss' and run_uuid not in "
                           "(select run_uuid from tags where key='study.status' and value='FINISHED')"))


def _stop_after_first_trial(cwd: Path, cache: Path, sig: int, group: bool = True, args: list[str] = ARGS) -> int:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(cwd / "first.log", "w")
    # Its own process group, like a job in a terminal: Ctrl-C or kill reaches Ray's processes too.
    proc = subprocess.Popen([sys.executable, "-m", "study.run", "--cache-dir", str(cache), *args], cwd=cwd,
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not _finished_trials(cwd / "mlflow.db"):
        assert proc.poll() is None, (cwd / "first.log").read_text()[-3000:]
        time.sleep(1)
    assert _finished_trials(cwd / "mlflow.db"), "no trial finished in time"
    while time.time() < deadline and not _second_trial_started(cwd / "mlflow.db"):  # into the second trial,
        assert proc.poll() is None, (cwd / "first.log").read_text()[-3000:]   # which has epochs left
        time.sleep(0.1)
    (os.killpg if group else os.kill)(proc.pid, sig)
    code = proc.wait(timeout=180)
    if sig == signal.SIGKILL:
        time.sleep(2)  # let the orphaned Ray processes notice, then make sure none survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code


# README's suite keeps Ctrl-C on the Pareto search (NSGA-II, whose sampler optuna 5.1 made hard to save); CI's slow
# stage runs Ctrl-C on the default TPE search, kill -9 and SIGTERM.
@pytest.mark.parametrize("sig,space", [pytest.param(signal.SIGINT, "default", marks=pytest.mark.slow),
                                       (signal.SIGINT, "pareto"),
                                       pytest.param(signal.SIGKILL, "default", marks=pytest.mark.slow),
                                       pytest.param(signal.SIGTERM, "default", marks=pytest.mark.slow)],
                         ids=["ctrl-c", "ctrl-c-pareto", "kill-9", "sigterm"])
def test_interrupted_sweep_resumes_without_duplicates(tmp_path, smoke_cache, sig, space):
    # Ctrl-C and kill -9 reach the whole process group (a terminal's job); `kill` (SIGTERM) only the driver.
    args = ARGS + (PARETO if space == "pareto" else [])
    code = _stop_after_first_trial(tmp_path, smoke_cache, sig, group=sig != signal.SIGTERM, args=args)
    assert code != 0, "an interrupted sweep must not report success"
    c, runs = mlflow_runs(tmp_path, EXPERIMENT[space])
    if sig != signal.SIGKILL:  # a clean exit: 130, the sweep's run closed as KILLED with why, no run RUNNING
        assert code == 130 and "--resume" in (tmp_path / "first.log").read_text()
        parent = next(r for r in runs if r.data.tags.get("study.kind") == "sweep")
        assert parent.info.status == "KILLED" and "--resume" in parent.data.tags["study.failure_reason"]
        assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    done_before = {r.data.tags["study.trial_id"]: r for r in runs
                   if r.data.tags.get("study.kind") == "trial" and r.data.tags["study.status"] == "FINISHED"}
    assert len(done_before) == 1

    proc = run_cli([*args, "--resume"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming sweep" in proc.stdout and "Study summary" in proc.stdout

    c, runs = mlflow_runs(tmp_path, EXPERIMENT[space])
    assert [r.data.tags["study.kind"] for r in runs].count("sweep") == 1
    assert [r.data.tags["study.kind"] for r in runs].count("baseline") == 1
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    parent = next(r for r in runs if r.data.tags.get("study.kind") == "sweep")
    assert parent.info.status == "FINISHED" and "study.failure_reason" not in parent.data.tags
    # A run whose trial Tune never saved (killed between sampling and saving) is kept but
    # marked ORPHANED; every trial of the sweep has exactly one run.
    orphans = [r for r in runs if r.data.tags.get("study.status") == "ORPHANED"]
    assert all(r.info.status == "KILLED" for r in orphans)
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial" and r not in orphans]
    ids = [r.data.tags["study.trial_id"] for r in trials]
    assert len(ids) == 2 and len(set(ids)) == 2, ids
    for run in trials:
        assert run.data.tags["study.status"] == "FINISHED"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.data.tags["study.trial_id"], steps)
    for trial_id, before in done_before.items():  # finished trials were not run again
        after = next(r for r in trials if r.data.tags["study.trial_id"] == trial_id)
        assert after.info.run_id == before.info.run_id
        assert after.info.end_time == before.info.end_time

    # Optuna kept what it learned: the restored searcher's study (its sampler too) holds every trial, with the
    # values of every objective, each told once.
    from ray.tune.search.optuna import OptunaSearch

    exp_dir = next((tmp_path / "outputs" / EXPERIMENT[space] / "ray").glob("sweep-*"))
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(exp_dir))
    assert type(searcher._ot_study.sampler).__name__ == ("NSGAIISampler" if space == "pareto" else "TPESampler")
    assert len(searcher._ot_study.trials) == 2
    values = sorted(t.values for t in searcher._ot_study.trials if t.values is not None)
    expected = sorted([r.data.metrics[m] for m in OBJECTIVES[space]] for r in trials)
    assert len(values) == 2 and all(v == pytest.approx(e, abs=1e-6) for v, e in zip(values, expected)), values


def _kill_at_last_checkpoint(cwd: Path, cache: Path, args: list[str], epochs: int) -> str:
    """Run ``args`` and, once the first trial's Ray Train run starts storing its last epoch's checkpoint,
    freeze the driver (SIGSTOP: Tune records nothing more) until Train has registered that checkpoint, then
    SIGKILL the process group. Returns the killed trial's id."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "study.run", "--cache-dir", str(cache), *args], cwd=cwd,
                            stdout=open(cwd / "first.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    train = cwd / "outputs" / "clip-alignment-study" / "ray"
    deadline, ckpts = time.time() + 240, []
    while len(ckpts) < epochs:
        assert proc.poll() is None and time.time() < deadline, (cwd / "first.log").read_text()[-3000:]
        time.sleep(0.05)
        ckpts = [p for p in train.glob("sweep-*/train/train-*/checkpoint_*") if p.is_dir()]
    os.kill(proc.pid, signal.SIGSTOP)
    last = max(ckpts, key=lambda p: p.name)  # named by time
    snapshot = last.parent / "checkpoint_manager_snapshot.json"
    while not (snapshot.exists() and last.name in snapshot.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(2)  # let the orphaned Ray processes notice, then make sure none survives
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert last.name in snapshot.read_text(), "Ray Train never registered the last epoch's checkpoint"
    return last.parent.name.removeprefix("train-")


def _tune_results(cwd: Path, trial_id: str) -> list[dict]:
    """What Tune recorded of a trial's results (its result.json, one line per result)."""
    import json

    ray = cwd / "outputs" / "clip-alignment-study" / "ray"
    log = next(ray.glob(f"sweep-*/trial_driver_{trial_id}_*/result.json"))
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_killed_during_last_checkpoint_resumes_to_completion(tmp_path, smoke_cache, epochs):
    """Killed after Ray Train stored the last epoch's checkpoint but before Tune recorded its result: the
    resumed trial has nothing left to train, yet Tune must get its final result (it used to fail on the
    missing metric, or keep an earlier epoch's numbers)."""
    # The window lies between Ray Train's checkpoint and Tune's record of it: a trial that trains in Tune
    # reports both at once (its kill then reruns the last epoch, which test_interrupted_sweep_... covers).
    args = ["--smoke-test", "--trials", "2", "--max-concurrent", "1", "--set", f"params.epochs={epochs}",
            "--set", "resources.trial_runner=ray_train"]
    killed = _kill_at_last_checkpoint(tmp_path, smoke_cache, args, epochs)
    assert all(r.get("epoch") != epochs for r in _tune_results(tmp_path, killed))  # the window was hit
    c, runs = mlflow_runs(tmp_path)
    before = next(r for r in runs if r.data.tags.get("study.trial_id") == killed)

    proc = run_cli([*args, "--resume"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming sweep" in proc.stdout
    assert "Requesting resources" not in proc.stdout + proc.stderr  # Train controller's INFO lines stay out

    c, runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags["study.kind"] == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == 2
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
    ids = [r.data.tags["study.trial_id"] for r in trials]
    assert len(ids) == 2 and len(set(ids)) == 2 and killed in ids, ids  # one run per trial
    for run in trials:
        assert run.data.tags["study.status"] == "FINISHED" and run.info.status == "FINISHED"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), steps
        final = run_metrics(c, run)  # its final records: metrics/final.json
        last = _tune_results(tmp_path, run.data.tags["study.trial_id"])[-1]  # Tune has the final result
        assert last["epoch"] == epochs == final["epoch"]
        assert last["test/specialized_balanced_accuracy"] == pytest.approx(final["test/specialized_balanced_accuracy"])
    after = next(r for r in trials if r.data.tags["study.trial_id"] == killed)
    assert after.info.run_id == before.info.run_id
