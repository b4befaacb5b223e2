"""One rule for the best trial and one Pareto front, shared by the CLI summary and the report."""

from __future__ import annotations

import re

import pytest
from helpers import log_final_records, log_sweep_config
from mlflow.tracking import MlflowClient

from study.orchestration.summary import format_summary, knobs
from study.selection import best_trial, pareto_front
from study.tracking import log_dict_artifact, read_sweep
from study.settings import TrialSettings


def test_best_trial_breaks_ties_by_general_accuracy_then_by_id():
    recs = [("b", {"specialized_top1": 0.5, "general_top1": 0.6}),
            ("a", {"specialized_top1": 0.5, "general_top1": 0.6}),
            ("c", {"specialized_top1": 0.5, "general_top1": 0.7}),
            ("d", {"specialized_top1": 0.4, "general_top1": 0.9}),
            ("e", {"general_top1": 0.99})]  # a failed trial: never chosen
    assert best_trial(recs) == "c"
    assert best_trial(recs[:2]) == "a" and best_trial(list(reversed(recs[:2]))) == "a"
    assert best_trial(recs, "general_top1") == "e"
    assert best_trial(recs, "specialized_top1", "min") == "d"
    assert best_trial([("x", {})]) is None


def test_pareto_front_keeps_ties_and_drops_dominated_trials():
    recs = [("a", {"specialized_top1": 0.5, "general_top1": 0.6}), ("b", {"specialized_top1": 0.5, "general_top1": 0.6}),
            ("c", {"specialized_top1": 0.4, "general_top1": 0.6}), ("d", {"specialized_top1": 0.3, "general_top1": 0.9})]
    assert pareto_front(recs) == ["a", "b", "d"]


def _parts(spec: float, gen: float) -> dict:
    """Metrics as a trial reports them: both parts, both headline metrics (same values for brevity)."""
    return {f"{part}/{role}_{m}": v for part in ("val", "test") for role, v in (("specialized", spec), ("general", gen))
            for m in ("top1", "balanced_accuracy")}


def test_a_tie_gives_the_same_best_trial_in_the_summary_and_in_the_report(tmp_path):
    """Two trials tie at 50.0% specialized on validation; the one that kept more general accuracy wins in both
    places, whatever order MLflow or Tune list them in (the bug: the summary named one, report.md the other)."""
    from analysis.report import run_analysis
    from study.config import load_study_config

    cfg = load_study_config(None, [("name", "tie")])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("tie", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, tags={"study.kind": "sweep"}).info.run_id
    log_sweep_config(c, parent, cfg.evaluation.headline)
    baseline = _parts(0.4, 0.8)
    base = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "baseline"}).info.run_id
    log_final_records(c, base, baseline)
    c.set_terminated(base)
    trials = {"aaaa0001": (0.5, 0.3), "ffff0002": (0.5, 0.7), "bbbb0003": (0.45, 0.8)}
    for tid, (spec, gen) in trials.items():
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "trial", "study.trial_id": tid,
                                      "study.status": "FINISHED"}).info.run_id
        log_final_records(c, run, _parts(spec, gen))  # as the worker logs a trial's last epoch
        log_dict_artifact(c, run, TrialSettings().model_dump(), "trial_config.json")
        c.set_terminated(run)
    sweep = read_sweep(uri, "tie", parent)
    summary = format_summary(sweep, cfg, uri)
    named = re.search(r"best trial (\w+)", summary).group(1)
    report, lines = run_analysis(sweep, tmp_path / "out")
    in_report = re.search(r"was (\w+) \(LoRA", " ".join(lines)).group(1)
    assert named == in_report == "ffff0002"
    assert "ffff0002" in report.read_text()
    # the same whatever order the runs come in
    sweep.trials.reverse()
    assert re.search(r"best trial (\w+)", format_summary(sweep, cfg, uri)).group(1) == "ffff0002"


def test_holm_matches_statsmodels_and_verdicts_follow_the_interval():
    from statsmodels.stats.multitest import multipletests

    from study.selection import holm, verdict

    raw = {"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")}
    expected = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    assert holm(raw) == pytest.approx(dict(zip("abc", expected))) and "d" not in holm(raw)
    assert holm(raw)["a"] == pytest.approx(0.03)  # 3 x 0.01
    assert verdict(0.05, 0.01, 0.09, False) == "gain"
    assert verdict(0.05, -0.01, 0.09, False) == "no reliable gain"
    assert verdict(-0.05, -0.09, -0.01, False) == "loss"
    assert verdict(0.09, 0.04, 0.14, True).startswith("no reliable gain (the model collapsed")


def test_the_summarys_knobs_are_those_the_trials_method_used():
    # A methods study printed lora_rank=4, lora_alpha=None for its best trial, a full fine-tuning, and a k-shot one
    # data_fraction=1 beside shots_per_class.
    full = knobs(TrialSettings(method="full", learning_rate=1e-3, lora_blocks=2))
    assert full["method"] == "full" and full["lora_blocks"] == 2 and full["data_fraction"] == 1.0
    assert not {"lora_rank", "lora_alpha", "lora_targets"} & full.keys() and None not in full.values()
    assert not {"lora_blocks", "lora_towers", "lora_rank"} & knobs(TrialSettings(method="projections")).keys()
    lora = knobs(TrialSettings(lora_rank=8, shots_per_class=4))
    assert lora["lora_rank"] == 8 and lora["shots_per_class"] == 4 and "data_fraction" not in lora
