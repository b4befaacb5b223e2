"""analysis/ reads a study from a real MLflow store, never changes its runs, and writes a report
whose numbers match its table. Studies are written here with MlflowClient, as study.run writes them
(validation and test parts; and the shapes of older versions that lack metrics), so no sweep has to run."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from helpers import log_final_records, log_sweep_config
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis.__main__ import main as analysis_main
from analysis.records import load_study
from study.tracking import read_sweep

BASELINE = {"specialized_top1": 0.20, "specialized_balanced_accuracy": 0.20, "general_top1": 0.80,
            "general_balanced_accuracy": 0.80, "specialized_chance_top1": 0.25,
            "specialized_chance_balanced_accuracy": 0.25, "general_chance_top1": 0.2,
            "general_chance_balanced_accuracy": 0.2, "specialized_images": 400}


def _study(tmp_path, trials, experiment="s", parent_status="FINISHED", baseline=None, split=True,
           headline="balanced_accuracy"):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment(experiment, artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, tags={"study.kind": "sweep"}).info.run_id
    if split:  # as study.run logs it; older sweeps (split=False) predate the logged config
        log_sweep_config(c, parent, headline)
    base = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "baseline"}).info.run_id
    bm = baseline or BASELINE
    bm = {f"{p}/{k}": v for k, v in bm.items() for p in ("val", "test")} if split else bm
    if split:
        log_final_records(c, base, bm)  # as the study logs it
    else:  # sweeps before the validation/test split logged everything at the top level
        c.log_batch(base, metrics=[Metric(k, v, 0, 0) for k, v in bm.items()])
    c.set_terminated(base)
    for i, (status, params, metrics) in enumerate(trials):
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "trial",
                                      "study.trial_id": f"t{i:07d}", "study.status": status,
                                      **({"study.failure_reason": "NonFiniteLossError: loss became inf"}
                                         if status == "FAILED" else {})}).info.run_id
        if split:
            log_final_records(c, run, metrics)  # as the worker logs a trial's last epoch
        else:  # ... and as it did before metrics/final.json: every metric at the top level, as final/<key>
            c.log_batch(run, metrics=[Metric(f"final/{k}", v, 0, 0) for k, v in metrics.items()])
        for k, v in params.items():
            c.log_param(run, k, str(v))
        c.set_terminated(run, "FINISHED" if status == "FINISHED" else "FAILED")
    if parent_status == "FINISHED":
        c.set_terminated(parent)
    return uri, c, parent


def _trial(lr, rank, frac, tether, spec, gen, val_spec=None, dw=1.0, p=0.01, base=(0.2, 0.8)):
    """A finished trial as the worker logs it: validation and test parts; ``val_spec`` (default: the test
    value) is what the choice sees."""
    params = {"learning_rate": lr, "lora_rank": rank, "data_fraction": frac, "tether_weight": tether,
              "lora_blocks": 1, "epochs": 8, "batch_size": 64, "seed": 0}
    val_spec = spec if val_spec is None else val_spec
    m = {"weight_change_norm": dw, "steps": 100 * frac, "test/specialized_images": 400, "test/general_images": 500,
         "test/specialized_mcnemar_p": p}
    for part, s in (("val", val_spec), ("test", spec)):
        for metric in ("top1", "balanced_accuracy"):
            m[f"{part}/specialized_{metric}"], m[f"{part}/general_{metric}"] = s, gen
    for role, value, b in (("specialized", spec, base[0]), ("general", gen, base[1])):
        for metric in ("top1", "balanced_accuracy"):
            m[f"test/{role}_{metric}_gain_ci_low"] = value - b - 0.03
            m[f"test/{role}_{metric}_gain_ci_high"] = value - b + 0.03
    return ("FINISHED", params, m)


def _snapshot(c, exp_name):
    exp = c.get_experiment_by_name(exp_name)
    return {r.info.run_id: (r.info.status, r.data.metrics, r.data.params,
                            {k: v for k, v in r.data.tags.items()})
            for r in c.search_runs([exp.experiment_id], max_results=1000)}


def test_report_chooses_on_validation_reports_test_and_runs_are_untouched(tmp_path, monkeypatch):
    grid = [_trial(lr, r, f, t, 0.20 + 0.3 * f * (lr * 300), 0.80 - 0.2 * lr * 100 + 0.02 * t, dw=lr * 1000)
            for lr, r, f, t in [(1e-3, 2, 0.2, 0), (2e-3, 4, 0.4, 1), (4e-3, 8, 0.6, 2), (8e-4, 2, 0.8, 3),
                                (3e-3, 4, 1.0, 0.5), (6e-3, 8, 0.3, 1.5), (1.5e-3, 4, 0.9, 2.5)]]
    # The trial with the best test score is not the one validation prefers: the report must follow validation.
    grid[0][2]["val/specialized_balanced_accuracy"] = 0.99
    grid.append(("FAILED", {"learning_rate": 1.0, "lora_rank": 2}, {}))
    uri, c, parent = _study(tmp_path, grid)
    before = _snapshot(c, "s")
    monkeypatch.chdir(tmp_path)
    assert analysis_main(["--experiment", "s", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    assert _snapshot(c, "s") == before, "analysis must never change a run"

    out = tmp_path / "out" / "s" / parent
    for name in ("report.md", "trials.csv", "tradeoff_map.png", "accuracy_vs_intensity.png", "marginals.png",
                 "importances.png"):
        assert (out / name).stat().st_size > 0, name
    assert {a.path for a in c.list_artifacts(parent, "analysis")} >= {"analysis/report.md", "analysis/trials.csv"}
    table = pd.read_csv(out / "trials.csv")
    done = table[table["included"]]
    assert len(done) == 7 and list(table[~table["included"]]["status"]) == ["FAILED"]
    assert done["weight_change_norm"].notna().all() and done["steps"].notna().all()  # metrics of no part kept
    report = (out / "report.md").read_text()
    chosen = done[done["trial_id"] == "t0000000"].iloc[0]
    assert "was t0000000" in report  # validation's choice, though t0000004 scores higher on test
    assert f"{chosen['specialized_gain_pts']:+.1f} points (paired 95% CI" in report
    assert "7 finished trials with 1 seed each" in report and "FAILED: 1" in report
    assert "chance 25.0%, one over the classes" in report
    assert re.search(r"mattered most for the specialized gain was \w+", report)
    assert "NonFiniteLossError" in report and "trial(s)" not in report
    assert "largest data_fraction tried" in report and "largest lora_rank tried" in report  # both searched: a trend


def test_single_trial_study_says_so(tmp_path):
    uri, c, parent = _study(tmp_path, [_trial(1e-3, 4, 0.5, 0, 0.3, 0.7)], parent_status="RUNNING")
    from analysis.report import run_analysis

    report, lines = run_analysis(read_sweep(uri, "s", None), tmp_path / "out")
    text = " ".join(lines)
    assert "1 finished trial with 1 seed each" in text and "still running" in text
    assert "Too few finished trials" in text and "anecdotal" in text
    assert report.exists()


def test_wiseft_curves_are_drawn_where_logged(tmp_path):
    trials = [_trial(1e-3 * (i + 1), 4, 0.25 * (i + 1), 0, 0.25 + 0.05 * i, 0.75 - 0.05 * i) for i in range(4)]
    for _, _, m in trials:  # the α curve on both parts: alpha 0 is the baseline, 1 the fine-tuned model
        for part in ("val", "test"):
            for metric in ("top1", "balanced_accuracy"):
                for role, base in (("specialized", 0.20), ("general", 0.80)):
                    for a in (0.0, 0.5, 1.0):
                        m[f"{part}/wiseft/alpha_{a:g}/{role}_{metric}"] = base + a * (m[f"{part}/{role}_{metric}"] - base)
        m["wiseft_best_alpha"] = 0.5  # chosen on validation
        for role in ("specialized", "general"):
            for metric in ("top1", "balanced_accuracy"):
                m[f"test/wiseft_best_{role}_{metric}"] = m[f"test/wiseft/alpha_0.5/{role}_{metric}"]
    uri, c, parent = _study(tmp_path, trials)
    rec = load_study(uri, "s")
    assert len(rec.wiseft) == 4 and [a for a, _, _ in rec.wiseft["t0000000"]] == [0.0, 0.5, 1.0]
    # The figure draws the trade-off map's metric and units: the headline's change in points against the baseline,
    # on the test part (alpha 0 is the origin; t0000003, specialized 40% and general 60%, halfway at 0.5).
    assert rec.wiseft_part == "test"
    assert [v for point in rec.wiseft["t0000003"] for v in point] == pytest.approx([0, 0, 0, 0.5, 10, -10, 1, 20, -20])
    from analysis.report import run_analysis

    report, _ = run_analysis(read_sweep(uri, "s", parent), tmp_path / "out")
    assert (report.parent / "wiseft_curves.png").stat().st_size > 0
    assert "wiseft_curves.png" in report.read_text()
    # The chosen trial (specialized 40%, general 60%) at the alpha validation chose, 0.5: 30% and 70% on test.
    assert ("validation chose α = 0.5 by mean balanced accuracy; there, test balanced accuracy was specialized 30.0% "
            "and general 70.0%") in report.read_text()


def test_older_runs_without_some_metrics(tmp_path):
    """Sweeps from before the validation/test split (plain metric names, no intervals) still load."""
    trials = []
    for i in range(4):
        params = {"learning_rate": 1e-3 * (i + 1), "lora_rank": 2, "data_fraction": 0.2 * (i + 1),
                  "tether_weight": 0, "seed": 0}
        trials.append(("FINISHED", params, {"specialized_top1": 0.25 + 0.05 * i, "general_top1": 0.75}))
    uri, c, parent = _study(tmp_path, trials, split=False, baseline={"specialized_top1": 0.2, "general_top1": 0.8})
    rec = load_study(uri, "s")
    assert len(rec.trials) == 4 and rec.trials["weight_change_norm"].isna().all() and rec.headline == "top1"
    from analysis.report import run_analysis

    report, lines = run_analysis(read_sweep(uri, "s", parent), tmp_path / "out")
    text = " ".join(lines)
    assert "was t0000003" in text and "no paired interval logged" in text and "no reliable gain" in text


def test_unknown_experiment_is_a_clear_error(tmp_path, capsys):
    uri, _, _ = _study(tmp_path, [])
    assert analysis_main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_imbalanced_collapsed_trial_claims_no_gain_and_chance_is_the_majority_share(tmp_path):
    """The new user's case: 3 classes at 50/25/25, trials chosen and reported on top-1. The baseline had 40.9%
    top-1 and 41.7% balanced accuracy; the trial predicts the majority class for every test image: top-1
    50.0% (+9.1 points, an interval above 0), balanced accuracy 33.3%. It is chosen, and never called a gain."""
    base = {"specialized_top1": 0.409, "specialized_balanced_accuracy": 0.417, "general_top1": 0.8,
            "general_balanced_accuracy": 0.8, "specialized_chance_top1": 0.5,
            "specialized_chance_balanced_accuracy": 1 / 3, "general_chance_top1": 0.2,
            "general_chance_balanced_accuracy": 0.2}
    status, params, m = _trial(1e-3, 4, 1.0, 0, 0.333, 0.8, p=0.00042, base=(0.417, 0.8))
    m.update({"test/specialized_top1": 0.5, "val/specialized_top1": 0.5, "test/specialized_collapsed": 1.0,
              "test/specialized_pred_majority_share": 1.0, "test/specialized_top1_gain_ci_low": 0.04,
              "test/specialized_top1_gain_ci_high": 0.14})
    others = [_trial(2e-3, 2, 0.5, 1, 0.40, 0.79, p=p, base=(0.417, 0.8)) for p in (0.2, 0.03)]
    uri, c, parent = _study(tmp_path, [(status, params, m), *others], baseline=base, headline="top1")
    from analysis.report import run_analysis
    from statsmodels.stats.multitest import multipletests

    _, lines = run_analysis(read_sweep(uri, "s", parent), tmp_path / "out")
    text = " ".join(lines)
    best = next(s for s in lines if s.startswith("Specialized top-1"))
    assert "was t0000000" in text and "+9.1 points" in best and ": gain" not in best
    assert "no reliable gain (the model collapsed to one class)" in best and "a collapse, not a gain" in best
    assert "balanced accuracy 33.3% vs 41.7%" in best
    assert "1 trial collapsed, answering one class for nearly every specialized test image (t0000000)" in text
    assert "chance 50.0%, always answering the majority class" in text
    expected = multipletests([0.00042, 0.2, 0.03], method="holm")[1][0]
    assert f"Holm-adjusted over 3 trials p = {expected:.2g}" in best
    assert load_study(uri, "s").adjusted["t0000000"] == pytest.approx(expected)


def test_report_names_the_software_and_warns_when_runs_disagree_on_a_version(tmp_path):
    """Each run records the versions it ran under (version.* tags); a sweep resumed after an upgrade has runs
    under two torch versions, and the finding says so. optuna agreeing everywhere draws no warning."""
    uri, c, parent = _study(tmp_path, [_trial(1e-3, 4, 0.5, 0, 0.3, 0.7), _trial(2e-3, 2, 0.9, 1, 0.35, 0.6),
                                       _trial(4e-3, 8, 0.3, 2, 0.4, 0.5)])
    exp = c.get_experiment_by_name("s").experiment_id
    runs = sorted(c.search_runs([exp]), key=lambda r: r.data.tags.get("study.trial_id", ""))
    for run, torch in zip(runs, ["2.14.1", "2.14.1", "2.14.1", "2.15.0", "2.14.1"]):  # parent, baseline, 3 trials
        c.set_tag(run.info.run_id, "version.torch", torch)
        c.set_tag(run.info.run_id, "version.optuna", "5.1.0")
    from analysis.report import run_analysis

    report, lines = run_analysis(read_sweep(uri, "s", None), tmp_path / "out")
    text = report.read_text()
    assert "Software (the runs' `version.*` tags): torch 2.14.1/2.15.0, optuna 5.1.0." in text
    warned = [s for s in lines if "did not all use the same" in s]
    assert warned == ["Its runs did not all use the same torch (2.14.1 in 4 runs, 2.15.0 in 1 run), so part of any "
                      "difference between trials may come from the software, not the knobs."]
    assert "torch 2.14.1/2.15.0" in (report.parent / "report.html").read_text()
