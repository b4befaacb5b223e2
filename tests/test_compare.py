"""``python -m analysis compare``: several sweeps (by experiment name or parent run id, from different tracking
stores) in one table (Markdown, CSV, LaTeX) and one figure, every number as that sweep's own report gives it, and a
note where the sweeps ran under different versions of the packages that move numbers."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from helpers import log_study, run_cli, trial_metrics

from analysis.__main__ import main as analysis_main


def _trials(method: str, gains: list[float], rate: float, base: tuple = (0.2, 0.8)) -> list:
    s, g0 = base
    return [({"method": method, "learning_rate": 1e-3 * (i + 1)},
             trial_metrics(s + g, g0 - rate * g, base, chosen=0.5,
                           curve={a: (s + a * g, g0 - a * rate * g * (1 + 0.02 * (-1) ** i)) for a in (0.0, 0.5, 1.0)}))
            for i, g in enumerate(gains)]


def _report_row(uri: str, experiment: str, out) -> pd.Series:
    """The sweep's own report (as study.run writes it at the end of a sweep), read back: its headline row."""
    from analysis.report import run_analysis
    from study.tracking import read_sweep

    report, _ = run_analysis(read_sweep(uri, experiment), out)
    return pd.read_csv(report.parent / "headline.csv").iloc[0], report


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or a == b
    return str(a) == str(b)


def test_two_stores_in_one_table_with_the_numbers_of_each_report_and_a_version_note(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    uri_a, uri_b = f"sqlite:///{a / 'mlflow.db'}", f"sqlite:///{b / 'mlflow.db'}"
    log_study(uri_a, "lora-study", _trials("lora", [0.05, 0.1, 0.15, 0.2], 0.6),
              versions={"torch": "2.14.1", "optuna": "5.1.0"})
    parent_b = log_study(uri_b, "methods-study", _trials("lora", [0.04, 0.08, 0.12, 0.16], 0.5, (0.25, 0.7))
                         + _trials("full", [0.1, 0.2, 0.3], 1.2, (0.25, 0.7)), base=(0.25, 0.7),
                         versions={"torch": "2.15.0", "optuna": "5.1.0"})
    out = tmp_path / "cmp"
    code = analysis_main(["compare", f"{uri_a}::lora-study", f"{uri_b}::{parent_b}", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.csv", "compare.tex", "fronts.png"}
    table = pd.read_csv(out / "compare.csv")
    assert list(table["study"]) == ["lora-study", "methods-study"] and table.loc[1, "parent_run"] == parent_b
    for i, (uri, experiment) in enumerate([(uri_a, "lora-study"), (uri_b, "methods-study")]):
        own, report = _report_row(uri, experiment, tmp_path / f"report{i}")
        assert set(own.index) <= set(table.columns)
        for column in own.index:  # every number of the table is the one in the sweep's own report
            assert _same(table.loc[i, column], own[column]), (experiment, column)
        md_row = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith(f"| {experiment}")]
        assert md_row and md_row[0] in report.read_text()  # the same cells, rounded the same way
    assert table.loc[0, "specialized_gain_pts"] == pytest.approx(20.0) and table.loc[1, "baseline_general_pct"] == 70
    assert table.loc[1, "exchange_rate[full]_trials"] == 3 and math.isnan(table.loc[1, "exchange_rate[full]_ci_low"])
    assert table.loc[1, "exchange_rate[lora]"] == pytest.approx(0.5, abs=0.02)
    note = ("The sweeps ran under different torch versions (lora-study (sweep 10:00:00 2026-12-01) 2.14.1; "
            "methods-study (sweep 10:00:00 2026-12-01) 2.15.0)")
    assert note in (out / "compare.md").read_text() and note in printed
    assert "optuna" not in (out / "compare.md").read_text()  # the same everywhere: no note
    tex = (out / "compare.tex").read_text()
    assert tex.count("\\\\") >= 3 and "\\toprule" in tex and "20.0\\%" in tex  # header and two rows, escaped
    assert "full fine-tuning: too few trials (3)" in tex


def test_the_table_says_how_much_of_the_distance_to_the_linear_probe_the_best_trial_closed(tmp_path):
    """Baseline specialized 20%, its linear probe 60% (95% CI 55-65%); the best trial gains 20 points (paired CI +17 to
    +23): it closed 50% [42.5%, 57.5%] of the distance (rounded as the report rounds them: 43% to 58%), in the table as in the report's sentence."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    probe = {f"test/specialized_linear_probe_{m}{s}": v for m in ("top1", "balanced_accuracy")
             for s, v in (("", 0.6), ("_ci_low", 0.55), ("_ci_high", 0.65))}
    log_study(uri, "probed", _trials("lora", [0.05, 0.1, 0.15, 0.2], 0.6), baseline_extra=probe)
    out = tmp_path / "cmp"
    assert analysis_main(["compare", f"{uri}::probed", "--out", str(out)]) == 0
    row = pd.read_csv(out / "compare.csv").iloc[0]
    assert row["specialized_probe_pct"] == pytest.approx(60.0)
    assert (row["probe_distance_closed"], row["probe_distance_closed_ci_low"],
            row["probe_distance_closed_ci_high"]) == pytest.approx((0.5, 0.425, 0.575))
    assert "| 50% [43%, 58%] of 60.0% |" in (out / "compare.md").read_text()
    own, report = _report_row(uri, "probed", tmp_path / "report")
    assert "so fine-tuning closed 50% of the distance (the gain's paired 95% CI: 43% to 58% of it)" in report.read_text()


@pytest.mark.parametrize("argv, message", [
    (["compare", "nope"], "SWEEP 'nope': no MLflow experiment named 'nope'"),
    (["compare", "sqlite:///{tmp}/none.db::s"], "SWEEP 'sqlite:///{tmp}/none.db::s': no MLflow store"),
    (["compare", "0123456789abcdef0123456789abcdef"], "no run '0123456789abcdef0123456789abcdef'"),
])
def test_a_sweep_that_is_not_there_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_study(f"sqlite:///{tmp_path / 'mlflow.db'}", "s", _trials("lora", [0.1], 0.5))
    assert analysis_main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err[0]
    assert not (tmp_path / "analysis_out").exists()


@pytest.mark.slow
def test_compare_two_real_smoke_sweeps_in_two_stores(tmp_path, smoke_cache):
    """The default study's smoke test (4 LoRA trials) and the methods study's (one trial per method), each run as a
    user runs it in its own folder and store; compare's table holds each one's report numbers exactly."""
    runs = {"default": ["--smoke-test", "--trials", "4"],
            "methods": ["--space", "methods", "--smoke-test", "--trials", "5", "--set", "lora_blocks=1"]}
    for name, argv in runs.items():
        (tmp_path / name).mkdir()
        proc = run_cli(argv, tmp_path / name, smoke_cache, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    uris = {n: f"sqlite:///{tmp_path / n / 'mlflow.db'}" for n in runs}
    out = tmp_path / "cmp"
    assert analysis_main(["compare", f"{uris['default']}::clip-alignment-study",
                          f"{uris['methods']}::clip-alignment-methods", "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare.csv")
    for i, name in enumerate(runs):
        # the report study.run wrote at the end of the sweep, in its own process
        own = pd.read_csv(next((tmp_path / name / "outputs" / "analysis").rglob("headline.csv"))).iloc[0]
        trials = pd.read_csv(next((tmp_path / name / "outputs" / "analysis").rglob("trials.csv")))
        for column in own.index:
            assert _same(table.loc[i, column], own[column]), (name, column)
        best = trials[trials["trial_id"] == own["best_trial"].split()[-1]].iloc[0]
        assert table.loc[i, "specialized_gain_pts"] == best["specialized_gain_pts"]
        assert table.loc[i, "general_change_ci_low_pts"] == best["general_change_ci_low_pts"]
    assert table.loc[0, "exchange_rate[lora]_trials"] == 4  # enough for an interval
    assert {f"exchange_rate[{m}]_trials" for m in ("lora", "full", "bitfit", "attention", "projections")} <= set(table)
    assert (out / "fronts.png").stat().st_size > 0 and (out / "compare.tex").read_text().count("\\\\") >= 3
