"""The sweep's own logic, fast: no Ray cluster, no CLI. Tune's results are real ``ray.tune.Result`` objects and the
MLflow store is a real SQLite one; only the running of Tune itself is left out (the end-to-end tests run it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Result

from study.config import ConfigError, load_study_config
from study.orchestration.prepare import Prepared
from study.orchestration.sweep import RunOptions, Sweep, SweepState
from study.orchestration.trial import number_in
from study.orchestration.tuner import collect
from study.tracking import SweepRecorder, find_sweep
from study.vocabulary import DONE, ERROR, UNFINISHED

DONE_METRICS = {"val/specialized_top1": 0.5, "test/specialized_top1": 0.4, "epoch": 2}


def _result(trial_id: str, number: int, metrics: dict | None = None, error: Exception | None = None,
            config: dict | None = None) -> Result:
    """A Tune result as ``Tuner.fit()`` returns it: Tune's count in its trial folder's name."""
    return Result(metrics={"trial_id": trial_id, **(metrics or {}), **({"config": config} if config else {})},
                  checkpoint=None, error=error,
                  path=f"/storage/sweep-x/trial_driver_{trial_id}_{number:05d}_{number - 1}_learning_rate=0.001",
                  metrics_dataframe=None)


def test_number_in_reads_tunes_count_from_a_folder_or_an_experiment_tag():
    assert number_in("trial_driver_ab12cd34_00003_2_learning_rate=0.001_2026-12-03", "ab12cd34") == 3
    assert number_in("3_learning_rate=0.001", "ab12cd34") == 3  # Tune's experiment_tag
    assert number_in("3", "ab12cd34", offset=8) == 11  # an extension numbers on after the first part's 8
    assert number_in("", "ab12cd34") is None and number_in("trial_driver_ab12cd34", "ab12cd34") is None


def test_collect_types_tunes_results_and_tells_an_interruption_from_early_stopping():
    space = load_study_config(None).space
    results = [_result("aaaa0001", 1, DONE_METRICS, config={"learning_rate": 1e-3, "lora_rank": 2}),
               _result("bbbb0002", 2, {"val/specialized_top1": 0.3, "epoch": 1}),  # no test numbers
               _result("cccc0003", 3, error=RuntimeError("boom\nstudy.library.objective.NonFiniteLossError: nan")),
               _result("dddd0004", 4, {})]  # never reported
    rows = collect(results, terminated=2, space=space, offset=4)
    assert [(r.trial_id, r.status, r.number) for r in rows] == [
        ("aaaa0001", DONE, 5), ("bbbb0002", DONE, 6), ("cccc0003", ERROR, 7), ("dddd0004", UNFINISHED, 8)]
    assert rows[0].settings.learning_rate == 1e-3 and rows[0].settings.lora_rank == 2
    assert rows[0].settings.epochs == space.fixed["epochs"]  # the fixed knobs fill in
    assert rows[2].error == "NonFiniteLossError: nan"
    # Interrupted: a trial without its last epoch's test numbers was cut off, not stopped by the scheduler.
    assert [r.status for r in collect(results, 2, space, interrupted=True)][:2] == [DONE, UNFINISHED]
    # Tune finished fewer trials than reported epochs: the same conclusion, without the signal.
    assert [r.status for r in collect(results, 1, space)][:2] == [DONE, UNFINISHED]


def test_a_replicates_config_is_unpacked_to_its_settings_and_the_trial_it_reruns():
    space = load_study_config(None).space
    r = _result("eeee0005", 1, DONE_METRICS, config={"replicate": {
        "learning_rate": 2e-3, "lora_rank": 4, "data_fraction": 0.5, "tether_weight": 0.0, "lora_blocks": 1,
        "seed": 1, "replicate_of": "aaaa0001"}})
    (row,) = collect([r], 1, space)
    assert row.replicate_of == "aaaa0001" and row.settings.seed == 1 and row.label == "rep eeee0005"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real SQLite MLflow store for this file (creating one takes seconds; each test gets its experiment)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, MlflowClient(uri), folder


@pytest.fixture()
def sweep_store(store, request):
    """A sweep's parent run in an experiment of its own, as SweepRecorder.start leaves it."""
    uri, c, folder = store
    exp = c.create_experiment(request.node.name, artifact_location=(folder / request.node.name).as_uri())
    parent = c.create_run(exp, tags={"study.kind": "sweep"}).info.run_id
    return uri, c, exp, parent


class OfflineTune(Sweep):
    """A sweep whose Tune experiments return prepared results instead of running (one list per call)."""

    def __init__(self, *args, parts: list[list[Result]]):
        super().__init__(*args)
        self.parts, self.built = parts, []

    def tune(self, build_tuner):
        self.built.append(build_tuner)
        results = self.parts.pop(0)
        return ResultList(results), False


class ResultList(list):
    @property
    def num_terminated(self) -> int:
        return sum("test/specialized_top1" in r.metrics for r in self)


def _sweep(tmp_path, store, trials: int, resume: bool, parts):
    uri, _, exp, parent = store
    cfg = load_study_config(None, [("search.trials", trials)])
    opts = RunOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", tracking_uri=uri, resume=resume)
    state = SweepState(sweep="sweep-x", tracking_uri=uri, experiment_id=exp, parent_run_id=parent,
                       storage=str(tmp_path / "ray"), part_trials={"sweep-x": 2}, baseline={})
    prepared = Prepared(None, 10, {}, {}, {}, 0.0, {})
    return OfflineTune(cfg, prepared, opts, state, parts=parts)


def test_resume_with_more_trials_extends_the_sweep_by_a_part_that_numbers_on(tmp_path, sweep_store):
    first = [_result("aaaa0001", 1, DONE_METRICS), _result("bbbb0002", 2, DONE_METRICS)]
    more = [_result("cccc0003", 1, DONE_METRICS), _result("dddd0004", 2, DONE_METRICS)]
    sweep = _sweep(tmp_path, sweep_store, trials=4, resume=True, parts=[first, more])
    rows = sweep.search()
    assert [(r.trial_id, r.number) for r in rows] == [("aaaa0001", 1), ("bbbb0002", 2), ("cccc0003", 3),
                                                      ("dddd0004", 4)]
    assert sweep.state.parts == ["sweep-x", "sweep-x-more1"] and sweep.state.part_trials["sweep-x-more1"] == 2
    saved = SweepState.load(tmp_path / "out" / "clip-alignment-study" / "sweep.json")  # saved before it ran
    assert saved.parts == sweep.state.parts and saved.part_trials == sweep.state.part_trials
    assert len(sweep.built) == 2


def test_no_extension_without_resume_or_while_a_part_is_unfinished(tmp_path, sweep_store):
    cut = [_result("aaaa0001", 1, DONE_METRICS), _result("bbbb0002", 2, {"val/specialized_top1": 0.3})]
    sweep = _sweep(tmp_path, sweep_store, trials=4, resume=True, parts=[cut])
    rows = sweep.search()  # the first part still has a trial cut off: it resumes first, then a later --resume extends
    assert [r.status for r in rows] == [DONE, UNFINISHED] and sweep.state.parts == ["sweep-x"]
    done = [_result("aaaa0001", 1, DONE_METRICS), _result("bbbb0002", 2, DONE_METRICS)]
    sweep = _sweep(tmp_path, sweep_store, trials=4, resume=False, parts=[done])
    assert len(sweep.search()) == 2 and sweep.state.parts == ["sweep-x"]


def test_stray_runs_are_closed_orphans_kept_and_early_stopped_trials_marked(sweep_store):
    uri, c, exp, parent = sweep_store

    def trial(tid, status="RUNNING", final=False):
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "trial", "study.trial_id": tid,
                                      "study.status": status}).info.run_id
        if final:
            from helpers import log_final_records

            log_final_records(c, run, DONE_METRICS)
        return run

    runs = {"orphan": trial("oooo0001"), "stopped": trial("ssss0002"), "complete": trial("ffff0003", final=True),
            "failed": trial("xxxx0004", "FAILED")}
    known, done = {"ssss0002", "ffff0003", "xxxx0004"}, {"ssss0002", "ffff0003"}
    orphans, stopped = SweepRecorder(uri, exp, parent).close_strays(known, done)
    assert orphans == ["oooo0001"] and stopped == ["ssss0002"]
    status = {k: (c.get_run(r).info.status, c.get_run(r).data.tags["study.status"]) for k, r in runs.items()}
    assert status == {"orphan": ("KILLED", "ORPHANED"), "stopped": ("FINISHED", "EARLY_STOPPED"),
                      "complete": ("FINISHED", "FINISHED"), "failed": ("RUNNING", "FAILED")}
    assert "killed before Tune recorded" in c.get_run(runs["orphan"]).data.tags["study.failure_reason"]
    assert SweepRecorder(uri, exp, parent).close_strays(known, done) == ([], [])  # nothing closes twice


def test_sweep_state_round_trips_and_a_broken_one_names_resume(tmp_path):
    path = tmp_path / "sweep.json"
    state = SweepState(sweep="sweep-x", tracking_uri="sqlite:///m.db", experiment_id="1", parent_run_id="p",
                       storage="/r", baseline={"val/specialized_top1": 0.25})
    assert state.parts == ["sweep-x"]  # the first part is the sweep's own
    state.save(path)
    assert SweepState.load(path) == state and SweepState.load(tmp_path / "none.json") is None
    path.write_text(json.dumps({"sweep": "sweep-x", "storage": "/r"}))
    with pytest.raises(ConfigError, match=r"--resume: .*sweep.json: sweep state lacks experiment_id, "
                                          r"parent_run_id, tracking_uri"):
        SweepState.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable sweep state"):
        SweepState.load(Path(path))


def test_an_experiments_latest_sweep_is_not_a_smoke_test_while_it_holds_a_real_one(store):
    # A new user ran the study, then --smoke-test in the same experiment: `analysis compare <experiment>` and
    # `analysis --experiment` took the smoke test's sweep for the study's.
    uri, c, folder = store
    exp = c.create_experiment("smoke-after-real", artifact_location=(folder / "smoke-after-real").as_uri())
    real = c.create_run(exp, tags={"study.kind": "sweep"}, start_time=1_000).info.run_id
    smoke = c.create_run(exp, tags={"study.kind": "sweep", "study.smoke_test": "true"}, start_time=2_000).info.run_id
    assert find_sweep(c, "smoke-after-real").info.run_id == real
    assert find_sweep(c, "smoke-after-real", smoke).info.run_id == smoke  # named, it is read
    only = c.create_experiment("smoke-only", artifact_location=(folder / "smoke-only").as_uri())
    first = c.create_run(only, tags={"study.kind": "sweep", "study.smoke_test": "true"}, start_time=1_000).info.run_id
    second = c.create_run(only, tags={"study.kind": "sweep", "study.smoke_test": "true"}, start_time=2_000).info.run_id
    assert find_sweep(c, "smoke-only").info.run_id == second != first
