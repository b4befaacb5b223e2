"""k-shot budgets and the linear-probe ceiling as the summary and the report word them, and a k-shot study end to end.

The report's sweep is written here with MlflowClient as study.run writes one (test_analysis.py's helpers); the
end-to-end study runs the real CLI (``--smoke-test --space kshot``: 2 trials) and is marked slow (about 40 s).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import mlflow_runs, run_cli
from test_analysis import BASELINE, _study, _trial

from analysis import plots
from analysis.report import run_analysis
from study.selection import distance_closed
from study.tracking import read_sweep, run_metrics

PROBE = {"specialized_linear_probe_balanced_accuracy": 0.60, "specialized_linear_probe_balanced_accuracy_ci_low": 0.55,
         "specialized_linear_probe_balanced_accuracy_ci_high": 0.65, "specialized_linear_probe_top1": 0.61,
         "specialized_linear_probe_train_images": 200}


def test_distance_closed_claims_only_what_the_interval_allows():
    assert distance_closed(0.42, 0.581, 0.815, 0.118, 0.2).startswith(
        "zero-shot 42.0% → 58.1%; the baseline's linear probe reaches 81.5%, so fine-tuning closed 41% of the distance")
    assert distance_closed(0.42, 0.45, 0.815, -0.01, 0.07).endswith("not distinguishable from none")
    assert "no distance to close" in distance_closed(0.42, 0.5, 0.423)
    assert "distance itself is uncertain" in distance_closed(0.42, 0.5, 0.6, 0.05, 0.1, 0.40, 0.8)
    assert "went past" in distance_closed(0.42, 0.9, 0.8, 0.4, 0.5)


def test_a_k_shot_sweep_reports_the_ceiling_and_draws_shots_on_a_log_axis(tmp_path, monkeypatch):
    trials = []
    for i, k in enumerate((4, 8, 16)):  # 3 trials: too few for importances, which keeps this test short
        status, params, m = _trial(1e-3, 4, 1.0, 0, 0.30 + 0.05 * i, 0.80 - 0.01 * i)
        params = {**params, "shots_per_class": k}
        trials.append((status, params, m))
    uri, c, parent = _study(tmp_path, trials, baseline={**BASELINE, **PROBE})
    drawn = {}
    save = plots.save

    def keep(fig, path):
        drawn[path.stem] = [ax.get_xscale() for ax in fig.axes], [ax.get_xlabel() for ax in fig.axes]
        return save(fig, path)

    monkeypatch.setattr(plots, "save", keep)
    _, lines = run_analysis(read_sweep(uri, "s", None), tmp_path / "out")
    text = " ".join(lines)
    # the best (validation) trial is k = 16 at 0.40 balanced accuracy: (0.40 - 0.20) / (0.60 - 0.20) = 50%
    assert "16 shots per class" in text
    assert "zero-shot 20.0% → 40.0%; the baseline's linear probe reaches 60.0% (95% CI 55.0% to 65.0%), so " \
           "fine-tuning closed 50% of the distance (the gain's paired 95% CI: 43% to 58% of it)" in text
    assert "along shots_per_class" in text and "along data_fraction" not in text
    scales, labels = drawn["marginals"]
    assert [s for s, lab in zip(scales, labels) if lab.startswith("shots per class")] == ["log", "log"]
    report = (tmp_path / "out" / "s" / parent / "report.md").read_text()
    header = report.split("## Trials")[1].strip().splitlines()[0]
    assert "| lora_rank | shots_per_class |" in header and "data_fraction" not in header  # k, not the fraction
    assert "| method |" not in header  # one method: no column for it


@pytest.mark.slow
def test_a_two_trial_k_shot_study_runs_end_to_end(tmp_path, smoke_cache):
    proc = run_cli(["--smoke-test", "--space", "kshot"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[proc.stdout.index("Study summary") - 73:])
    c, runs = mlflow_runs(tmp_path, "clip-alignment-kshot")
    trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
    baseline = run_metrics(c, next(r for r in runs if r.data.tags.get("study.kind") == "baseline"))
    assert len(trials) == 2
    for r in trials:
        k = int(r.data.params["shots_per_class"])
        assert k in (1, 2, 4, 8, 16) and f"k={k}" in r.info.run_name
        assert r.data.params["data_fraction"] == "1.0"
        assert [d.dataset.name for d in r.inputs.dataset_inputs] == [f"finetune (train) k={k}"]
        m = run_metrics(c, r)
        assert m["train_pairs"] == 4 * k  # exactly k images of each of the 4 classes
        assert 0 <= m["test/specialized_linear_probe_balanced_accuracy"] <= 1  # evaluation.linear_probe: true
    assert not math.isnan(baseline["test/specialized_linear_probe_balanced_accuracy"])
    assert baseline["test/specialized_linear_probe_train_images"] > 0
    assert "baseline linear probe (the ceiling" in proc.stdout and "linear-probe ceiling, specialized" in proc.stdout


def test_a_budget_curve_keeps_each_k_a_level_of_its_own():
    # The k-shot study's report once read "peaks at shots_per_class ≈ 1.5": five k were binned into quartiles.
    k = pd.Series([1, 1, 2, 2, 4, 4, 8, 8, 16, 16], dtype=float)
    gain = pd.Series([1.0, 3.0, 0.0, 2.0, -1.0, -1.0, 0.5, 0.5, 4.0, 2.0])
    means = plots.level_means(k, gain)
    assert means.to_dict() == {1.0: 2.0, 2.0: 1.0, 4.0: -1.0, 8.0: 0.5, 16.0: 3.0}
    assert plots.level_means(k, gain, agg="count").tolist() == [2] * 5
    rates = pd.Series(np.geomspace(1e-4, 1e-2, 10))  # a continuous knob is still binned into quartiles
    assert len(plots.level_means(rates, gain)) == 4
