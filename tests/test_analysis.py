"""analysis/ reads a study from a real MLflow store, never changes its runs, and writes a report
whose numbers match its table. Studies are written here with MlflowClient, as study.run writes them
(including the shapes of older versions that lack metrics), so no sweep has to run."""

from __future__ import annotations

import re

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis.__main__ import main as analysis_main
from analysis.records import load_study, wilson


def _study(tmp_path, trials, experiment="s", parent_status="FINISHED", with_images=True):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment(experiment, artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp, tags={"study.kind": "sweep"}).info.run_id
    base = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "baseline"}).info.run_id
    bm = {"specialized_top1": 0.20, "general_top1": 0.80, **({"specialized_images": 800} if with_images else {})}
    c.log_batch(base, metrics=[Metric(k, v, 0, 0) for k, v in bm.items()])
    c.set_terminated(base)
    for i, (status, params, metrics) in enumerate(trials):
        run = c.create_run(exp, tags={"mlflow.parentRunId": parent, "study.kind": "trial",
                                      "study.trial_id": f"t{i:07d}", "study.status": status,
                                      **({"study.failure_reason": "NonFiniteLossError: loss became inf"}
                                         if status == "FAILED" else {})}).info.run_id
        c.log_batch(run, params=[], metrics=[Metric(k if "/" in k else f"final/{k}", v, 0, 0)
                                             for k, v in metrics.items()])
        for k, v in params.items():
            c.log_param(run, k, str(v))
        c.set_terminated(run, "FINISHED" if status == "FINISHED" else "FAILED")
    if parent_status == "FINISHED":
        c.set_terminated(parent)
    return uri, c, parent


def _trial(lr, rank, frac, tether, spec, gen, dw=1.0, images=True):
    params = {"learning_rate": lr, "lora_rank": rank, "data_fraction": frac, "tether_weight": tether,
              "lora_blocks": 1, "epochs": 8, "batch_size": 64, "seed": 0}
    metrics = {"specialized_top1": spec, "general_top1": gen, "weight_change_norm": dw, "steps": 100 * frac}
    if images:
        metrics.update(specialized_images=800, general_images=1000)
    return ("FINISHED", params, metrics)


def _snapshot(c, exp_name):
    exp = c.get_experiment_by_name(exp_name)
    return {r.info.run_id: (r.info.status, r.data.metrics, r.data.params,
                            {k: v for k, v in r.data.tags.items()})
            for r in c.search_runs([exp.experiment_id], max_results=1000)}


def test_report_matches_table_and_runs_are_untouched(tmp_path, monkeypatch):
    grid = [_trial(lr, r, f, t, 0.20 + 0.3 * f * (lr * 300), 0.80 - 0.2 * lr * 100 + 0.02 * t, dw=lr * 1000)
            for lr, r, f, t in [(1e-3, 2, 0.2, 0), (2e-3, 4, 0.4, 1), (4e-3, 8, 0.6, 2), (8e-4, 2, 0.8, 3),
                                (3e-3, 4, 1.0, 0.5), (6e-3, 8, 0.3, 1.5), (1.5e-3, 4, 0.9, 2.5)]]
    grid.append(("FAILED", {"learning_rate": 1.0, "lora_rank": 2}, {}))
    uri, c, parent = _study(tmp_path, grid)
    before = _snapshot(c, "s")
    monkeypatch.chdir(tmp_path)
    assert analysis_main(["--experiment", "s", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    assert _snapshot(c, "s") == before, "analysis must never change a run"

    out = tmp_path / "out" / "s" / parent
    for name in ("trials.csv", "report.md", "tradeoff_map.png", "accuracy_vs_intensity.png", "marginals.png",
                 "importances.png"):
        assert (out / name).stat().st_size > 0, name
    assert {a.path for a in c.list_artifacts(parent, "analysis")} >= {"analysis/report.md", "analysis/trials.csv"}

    table = pd.read_csv(out / "trials.csv")
    done = table[table["included"]]
    assert len(done) == 7 and list(table[~table["included"]]["status"]) == ["FAILED"]
    report = (out / "report.md").read_text()
    best = done.loc[done["specialized_gain_pts"].idxmax()]
    assert f"{best['specialized_gain_pts']:+.1f} points over the zero-shot baseline of 20.0%" in report
    assert f"trial {best['trial_id']}" in report
    assert f"by {best['general_change_pts']:+.1f} points" in report
    lo, hi = wilson(best["specialized_top1"], 800)
    assert f"{lo * 100:.1f}–{hi * 100:.1f}%" in report
    assert "7 finished trial(s)" in report and "FAILED: 1" in report
    assert re.search(r"mattered most for the specialized gain was \w+", report)
    assert "NonFiniteLossError" in report


def test_single_trial_study_says_so(tmp_path):
    uri, c, parent = _study(tmp_path, [_trial(1e-3, 4, 0.5, 0, 0.3, 0.7)], parent_status="RUNNING")
    from analysis.report import run_analysis

    report, lines = run_analysis(uri, "s", None, tmp_path / "out")
    text = " ".join(lines)
    assert "1 finished trial(s)" in text and "still running" in text
    assert "Too few finished trials" in text and "anecdotal" in text
    assert report.exists()


def test_wiseft_curves_are_drawn_where_logged(tmp_path):
    trials = [_trial(1e-3 * (i + 1), 4, 0.25 * (i + 1), 0, 0.25 + 0.05 * i, 0.75 - 0.05 * i) for i in range(4)]
    for _, _, m in trials:  # a newer evaluator's α curve: alpha 0 is the baseline, 1 the fine-tuned model
        for a in (0.0, 0.5, 1.0):
            m[f"wiseft/alpha_{a}/specialized_top1"] = 0.20 + a * (m["specialized_top1"] - 0.20)
            m[f"wiseft/alpha_{a}/general_top1"] = 0.80 + a * (m["general_top1"] - 0.80)
    uri, c, parent = _study(tmp_path, trials)
    rec = load_study(uri, "s")
    assert len(rec.wiseft) == 4 and [a for a, _, _ in rec.wiseft["t0000000"]] == [0.0, 0.5, 1.0]
    from analysis.report import run_analysis

    report, _ = run_analysis(uri, "s", parent, tmp_path / "out")
    assert (report.parent / "wiseft_curves.png").stat().st_size > 0
    assert "wiseft_curves.png" in report.read_text()
    # The best trial (specialized 40%, general 60%) at alpha 0.5: 30% and 70%, against a 20% / 80% baseline.
    assert "was at α = 0.5: specialized +10.0 points, general -10.0 points" in report.read_text()


def test_older_runs_without_some_metrics(tmp_path):
    trials = [_trial(1e-3 * (i + 1), 2, 0.2 * (i + 1), 0, 0.25 + 0.05 * i, 0.75, images=False) for i in range(4)]
    for _, _, m in trials:
        m.pop("weight_change_norm")
    uri, c, parent = _study(tmp_path, trials, with_images=False)
    rec = load_study(uri, "s")
    assert len(rec.trials) == 4 and rec.trials["weight_change_norm"].isna().all()
    from analysis.report import run_analysis

    report, lines = run_analysis(uri, "s", parent, tmp_path / "out")
    assert "no confidence interval logged" in " ".join(lines)


def test_unknown_experiment_is_a_clear_error(tmp_path, capsys):
    uri, _, _ = _study(tmp_path, [])
    assert analysis_main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err


def test_logged_bootstrap_intervals_are_preferred(tmp_path):
    trials = [_trial(1e-3 * (i + 1), 4, 0.25 * (i + 1), 0, 0.25 + 0.05 * i, 0.75 - 0.01 * i) for i in range(4)]
    for _, _, m in trials:
        m.update(specialized_top1_ci_low=m["specialized_top1"] - 0.031, specialized_top1_ci_high=m["specialized_top1"] + 0.029,
                 specialized_top1_gain_ci_low=0.123, specialized_top1_gain_ci_high=0.234, specialized_mcnemar_p=0.0042)
    uri, c, parent = _study(tmp_path, trials)
    from analysis.report import run_analysis

    _, lines = run_analysis(uri, "s", parent, tmp_path / "out")
    text = " ".join(lines)
    assert "95% bootstrap CI of its accuracy 36.9–42.9%" in text, text  # best: 0.40 -3.1/+2.9 points
    assert "of the gain +12.3 to +23.4 points, paired; McNemar p = 0.0042" in text
