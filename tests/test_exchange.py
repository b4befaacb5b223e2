"""The exchange rate (general points lost per point of specialized gain) recovers a known slope from trial records
and covers it with its interval; the report says it per method, with "too few trials" below 4; and the WiSE-FT
alpha follows the headline metric, so a collapsed trial's alpha is never chosen by top-1."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from helpers import log_study, trial_metrics

from analysis.exchange import MIN_TRIALS, exchange_rate, trial_points


def _curves(rate: float, trials: int, noise: float, seed: int = 0) -> dict:
    """``trials`` WiSE-FT curves (alpha 0.25 ... 1) whose general change is ``-rate`` x the specialized gain, plus
    Gaussian noise of ``noise`` points; each trial reaches its own gain."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in range(trials):
        reach = rng.uniform(5, 30)
        out[f"t{t:02d}"] = [(a * reach, -rate * a * reach + rng.normal(0, noise)) for a in (0.25, 0.5, 0.75, 1.0)]
    return out


def test_a_known_slope_is_recovered_and_covered_by_its_interval():
    exact = exchange_rate(_curves(1.3, 6, noise=0.0), "lora")
    assert exact.rate == pytest.approx(1.3) and exact.ci_low == pytest.approx(1.3) and exact.ci_high == pytest.approx(1.3)
    noisy = exchange_rate(_curves(0.8, 12, noise=2.0, seed=1), "full")
    assert noisy.enough and noisy.trials == 12 and noisy.points == 48
    assert noisy.ci_low < 0.8 < noisy.ci_high and abs(noisy.rate - 0.8) < 0.1
    assert noisy.ci_high - noisy.ci_low < 0.3  # 12 trials pin it down
    # Over many draws of the noise, the 95% interval covers the true slope about 95% of the time.
    covered = [(r := exchange_rate(_curves(0.8, 8, noise=3.0, seed=s), resamples=500)).ci_low < 0.8 < r.ci_high
               for s in range(60)]
    assert 0.8 <= np.mean(covered) <= 1.0


def test_fewer_than_four_trials_give_no_interval():
    few = exchange_rate(_curves(1.0, MIN_TRIALS - 1, noise=1.0), "bitfit")
    assert not few.enough and math.isnan(few.ci_low) and few.trials == 3
    assert few.words() == "BitFit: too few trials (3)"
    assert exchange_rate({}, "attention").trials == 0


def test_a_method_that_moves_no_general_point_reads_zero_and_the_sentence_names_the_rate_once():
    # A methods smoke study found these: general changes all exactly 0 gave "-0.00 [0.00, -0.00]" (negative zeros),
    # and the methods without a rate began a second "Exchange rate:" in the same sentence.
    from analysis.exchange import rate_sentence

    flat = exchange_rate({f"t{t}": [(5.0 * (t + 1), -0.0), (10.0 * (t + 1), 0.0)] for t in range(5)}, "bitfit")
    assert flat.enough and flat.words() == "BitFit 0.00 [0.00, 0.00]"
    few = exchange_rate(_curves(1.0, 2, noise=0.0), "lora")
    sentence = rate_sentence([flat, few], "balanced_accuracy")
    assert sentence.count("xchange rate") == 1 and "-0.00" not in sentence and "negative rate" not in sentence
    assert sentence.endswith("cost 0.00 general points with BitFit [0.00, 0.00]. No rate for LoRA: too few trials "
                             "(2, fewer than 4).")
    assert rate_sentence([few], "top1") == "No exchange rate for LoRA: too few trials (2, fewer than 4)."


def test_only_intervals_that_lie_apart_rank_two_methods():
    from analysis.exchange import ExchangeRate, ranking_sentence

    rates = [ExchangeRate("lora", 1.0, 0.8, 1.2, 5, 20), ExchangeRate("full", 1.5, 1.1, 1.9, 5, 20),
             ExchangeRate("bitfit", 2.5, 2.0, 3.0, 5, 20)]
    assert ranking_sentence(rates) == ("Only where intervals lie apart do these trials rank two methods (a lower rate "
                                       "first): LoRA below BitFit; full fine-tuning below BitFit; the other 1 of the 3 "
                                       "pairs overlap.")
    assert ranking_sentence(rates[:2]).startswith("Their intervals overlap")


def test_a_trials_points_are_its_model_and_its_test_curve_in_points():
    m = trial_metrics(0.40, 0.60, curve={0.0: (0.2, 0.8), 0.5: (0.30, 0.72), 1.0: (0.40, 0.60)}, chosen=0.5)
    flat = [v for point in trial_points(m, "balanced_accuracy") for v in point]
    assert flat == pytest.approx([0, 0, 10, -8, 20, -20])
    older = {k: v for k, v in m.items() if "/wiseft/" not in k}  # a run that scored only its chosen alpha on test
    assert [v for point in trial_points(older, "top1") for v in point] == pytest.approx([10, -8, 20, -20])


def test_the_report_gives_each_methods_rate_and_draws_it(tmp_path):
    """A study of LoRA (5 trials, 0.5 general points per specialized point) and full fine-tuning (5 trials, 1.5)
    and BitFit (2 trials): the finding gives both rates with intervals that exclude each other, and BitFit's
    "too few trials"; the report's headline table gives the same."""
    from analysis.report import run_analysis
    from study.tracking import read_sweep

    trials = []
    for method, rate, n in (("lora", 0.5, 5), ("full", 1.5, 5), ("bitfit", 1.0, 2)):
        for i in range(n):
            gain = 0.04 * (i + 1)
            wobble = 0.002 * (-1) ** i  # a little noise, so that the interval has a width
            curve = {a: (0.2 + a * gain, 0.8 - a * (rate * gain + wobble)) for a in (0.0, 0.5, 1.0)}
            trials.append(({"method": method, "learning_rate": 1e-3 * (i + 1)},
                           trial_metrics(*curve[1.0], curve=curve, chosen=0.5)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_study(uri, "methods", trials)
    report, lines = run_analysis(read_sweep(uri, "methods"), tmp_path / "out")
    sentence = next(s for s in lines if s.startswith("Exchange rate (balanced accuracy"))
    found = re.search(r"cost ([\d.]+) general points with LoRA \[([\d.]+), ([\d.]+)\] and ([\d.]+) with full "
                      r"fine-tuning \[([\d.]+), ([\d.]+)\]", sentence)
    lora, low, high, full, full_low, full_high = map(float, found.groups())
    assert lora == pytest.approx(0.5, abs=0.01) and low <= lora <= high and high - low < 0.1
    assert full == pytest.approx(1.5, abs=0.01) and full_low <= full <= full_high
    assert "BitFit: too few trials (2, fewer than 4)" in sentence
    assert "The intervals do not overlap: LoRA traded least general accuracy per point of specialized gain, then full " \
           "fine-tuning." in sentence
    table = report.read_text().split("## Headline")[1]
    assert f"LoRA {lora:.2f} [{low:.2f}, {high:.2f}]; full fine-tuning {full:.2f}" in table
    assert "BitFit: too few trials (2)" in table
    assert (report.parent / "tradeoff_map.png").stat().st_size > 0
    assert "lora_rank" not in " ".join(lines)  # fixed in this study: no "too few trials to say where gains saturate"
    header = report.read_text().split("## Trials")[1].strip().splitlines()[0]
    assert header.startswith("| trial_id | status | method |")  # a methods study's table says which trial is which


def test_a_collapsed_trial_never_has_its_alpha_chosen_by_top1_when_the_headline_is_balanced_accuracy():
    """The case that prompted it: 3 classes at 50/25/25; the fine-tuned model answers the majority class for every
    image. Along alpha its specialized top-1 rises to 50% (the majority share) while its balanced accuracy falls to
    33.3% (chance). By default the alpha follows the headline's mean over both roles: balanced accuracy here."""
    from study.config import EvaluationSection
    from study.library.wiseft import choose_alpha

    spec = {0.0: (0.409, 0.417), 0.25: (0.44, 0.40), 0.5: (0.47, 0.37), 0.75: (0.50, 0.34), 1.0: (0.50, 0.333)}
    general = {0.0: 0.80, 0.25: 0.80, 0.5: 0.79, 0.75: 0.78, 1.0: 0.77}  # both metrics alike
    validation = {a: {"val/mean_top1": (top1 + general[a]) / 2, "val/mean_balanced_accuracy": (ba + general[a]) / 2}
                  for a, (top1, ba) in spec.items()}
    select = EvaluationSection(headline="balanced_accuracy").wiseft_metric
    assert select == "mean_balanced_accuracy"
    assert choose_alpha(validation, select) == 0.0  # balanced accuracy: the base model
    assert choose_alpha(validation, "mean_top1") == 0.75  # what top-1 would have chosen: the collapse
    assert EvaluationSection(headline="top1").wiseft_metric == "mean_top1"
    assert EvaluationSection(wiseft_select="specialized_top1").wiseft_metric == "specialized_top1"  # an override
