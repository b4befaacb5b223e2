"""The exchange rate of each fine-tuning method: general points lost per point of specialized gain
(:data:`study.vocabulary.EXCHANGE_RATE`).

Every WiSE-FT curve starts at the baseline (alpha 0 is the base model exactly), so the rate is the least-squares
slope through the origin of ``-general change`` against ``specialized gain`` (headline metric, test part, points),
over a method's trials and the points of their WiSE-FT curves:

    rate = -sum(x * y) / sum(x * x)

A trial contributes its trained model (alpha 1) and each alpha of its curve scored on the test part. The 95%
interval is a percentile bootstrap over trials (a resampled trial brings all its points), since the points of one
curve are not independent. IIMM (arXiv 2407.15731) reports in-domain gain and out-of-domain loss rising together
roughly linearly across methods; WiSE-FT (arXiv 2109.01903) traces the same trade along alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from study.vocabulary import METHOD_WORDS, TEST, change_name, headline, key

MIN_TRIALS = 4          # below this many trials a method's rate is "too few trials"
RESAMPLES = 2000

Points = Sequence[tuple[float, float]]  # (specialized gain, general change), points


@dataclass(frozen=True)
class ExchangeRate:
    """One method's exchange rate (general points lost per specialized point gained) with its bootstrap 95%
    interval; ``ci_low``/``ci_high`` are NaN when the trials are too few (``enough`` False) or the gains all 0."""

    method: str
    rate: float
    ci_low: float
    ci_high: float
    trials: int
    points: int

    @property
    def enough(self) -> bool:
        return self.trials >= MIN_TRIALS and not math.isnan(self.ci_low)

    def words(self) -> str:
        """``LoRA 0.81 [0.60, 1.02]`` or ``BitFit: too few trials (3)``, as the report and ``compare`` write it."""
        name = METHOD_WORDS.get(self.method, self.method)
        if self.trials < MIN_TRIALS:
            return f"{name}: too few trials ({self.trials})"
        if not self.enough:
            return f"{name}: no specialized change to measure against"
        return f"{name} {_2(self.rate)} [{_2(self.ci_low)}, {_2(self.ci_high)}]"


def _2(value: float) -> str:
    """Two decimals, never a negative zero (a rate of -0.001 reads 0.00, not -0.00)."""
    return f"{round(value, 2) + 0.0:.2f}"


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    denominator = float(np.dot(x, x))
    return -float(np.dot(x, y)) / denominator if denominator > 0 else math.nan


def exchange_rate(curves: Mapping[str, Points], method: str = "", resamples: int = RESAMPLES,
                  seed: int = 0) -> ExchangeRate:
    """The exchange rate of one method from ``curves`` (``{trial: [(specialized gain, general change), ...]}`` in
    points against the baseline), with a percentile bootstrap 95% interval over trials (``resamples`` draws,
    seeded). Fewer than :data:`MIN_TRIALS` trials give the point estimate without an interval."""
    trials = [np.asarray(p, dtype=float).reshape(-1, 2) for p in curves.values() if len(p)]
    if not trials:
        return ExchangeRate(method, math.nan, math.nan, math.nan, 0, 0)
    xs, ys = [t[:, 0] for t in trials], [t[:, 1] for t in trials]
    rate = _slope(np.concatenate(xs), np.concatenate(ys))
    low = high = math.nan
    if len(trials) >= MIN_TRIALS and not math.isnan(rate):
        # Per-trial sums make each resample a weighted sum: sum(x*y) and sum(x*x) of the drawn trials.
        xy = np.array([float(np.dot(x, y)) for x, y in zip(xs, ys)])
        xx = np.array([float(np.dot(x, x)) for x in xs])
        counts = np.random.default_rng(seed).multinomial(len(trials), [1 / len(trials)] * len(trials), resamples)
        den = counts @ xx
        rates = -(counts @ xy)[den > 0] / den[den > 0]
        low, high = (float(v) for v in np.percentile(rates, [2.5, 97.5]))
    return ExchangeRate(method, rate, low, high, len(trials), sum(len(t) for t in trials))


def trial_points(metrics: Mapping[str, float], head: str) -> list[tuple[float, float]]:
    """A trial's points on the test part in points of the ``head`` metric (``balanced_accuracy`` or ``top1``): its
    trained model (alpha 1) and every alpha of its WiSE-FT curve scored on test; an older run without the test
    curve gives its trained model and the alpha it chose. Alpha 1 counts once."""
    gain, change = change_name(headline("specialized", head)), change_name(headline("general", head))

    def point(prefix: str) -> tuple[float, float] | None:
        x, y = metrics.get(f"{prefix}{gain}"), metrics.get(f"{prefix}{change}")
        return None if x is None or y is None or math.isnan(x) or math.isnan(y) else (100 * x, 100 * y)

    by_alpha = {}
    curve = f"{TEST}/wiseft/alpha_"
    for k in metrics:
        if k.startswith(curve) and k.endswith("/" + gain):
            alpha = float(k.removeprefix(curve).split("/")[0])
            by_alpha[alpha] = point(f"{curve}{alpha:g}/")
    if not by_alpha and "wiseft_best_alpha" in metrics:
        by_alpha[float(metrics["wiseft_best_alpha"])] = point(key(TEST, "wiseft_best_"))
    if 1.0 not in by_alpha:
        by_alpha[1.0] = point(f"{TEST}/")
    return [p for _, p in sorted(by_alpha.items()) if p is not None]


def method_rates(trials: pd.DataFrame, metrics: Mapping[str, Mapping[str, float]], head: str) -> list[ExchangeRate]:
    """The exchange rate of every method among ``trials`` (the report's finished trials: ``trial_id`` and
    ``method`` columns), from each trial's logged ``metrics`` (by trial id), in the order of
    :data:`~study.vocabulary.METHOD_WORDS`."""
    methods = trials["method"].fillna("lora") if "method" in trials else pd.Series("lora", trials.index)
    order = [m for m in METHOD_WORDS if m in set(methods)] + sorted(set(methods) - set(METHOD_WORDS))
    return [exchange_rate({t: trial_points(metrics[t], head) for t in trials.loc[methods == m, "trial_id"]}, m)
            for m in order]


def rate_sentence(rates: list[ExchangeRate], head: str) -> str:
    """The finding's sentence: ``Each point of specialized gain cost 0.81 general points with LoRA [0.60, 1.02]
    and 1.40 with full fine-tuning [1.10, 1.80] ...``, with "too few trials" below :data:`MIN_TRIALS` per method,
    and whether the intervals allow ranking the methods."""
    from study.vocabulary import metric_words

    known = [r for r in rates if r.enough]
    parts = [f"{_2(r.rate)}{' general points' * (i == 0)} with {METHOD_WORDS.get(r.method, r.method)} "
             f"[{_2(r.ci_low)}, {_2(r.ci_high)}]" for i, r in enumerate(known)]
    text = ""
    if parts:
        text = (f"Exchange rate ({metric_words(head)}, test part, trials and their WiSE-FT curves, bootstrap 95% "
                f"interval over trials): each point of specialized gain cost " + _join(parts) + " (a negative rate: "
                "general accuracy rose with it)" * any(round(r.rate, 2) < 0 for r in known) + ".")
    few = [r for r in rates if not r.enough]
    if few:
        text += (" No rate for " if text else "No exchange rate for ") + "; ".join(
            f"{METHOD_WORDS.get(r.method, r.method)}: " + (f"too few trials ({r.trials}, fewer than {MIN_TRIALS})"
                                                           if r.trials < MIN_TRIALS else "no specialized change to "
                                                           "measure against") for r in few) + "."
    if len(known) > 1:
        text += " " + ranking_sentence(known)
    return text


def ranking_sentence(rates: list[ExchangeRate]) -> str:
    """Which methods the intervals tell apart: a pair is ranked only where one's interval lies wholly below the
    other's; the rest are left unranked."""
    words = {r.method: METHOD_WORDS.get(r.method, r.method) for r in rates}
    ordered = sorted(rates, key=lambda r: r.rate)
    apart = [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:] if a.ci_high < b.ci_low]
    pairs = len(ordered) * (len(ordered) - 1) // 2
    if not apart:
        return "Their intervals overlap, so these trials do not rank the methods by exchange rate."
    if len(apart) == pairs:
        return (f"The intervals do not overlap: {words[ordered[0].method]} traded least general accuracy per point of "
                f"specialized gain, then " + ", ".join(words[r.method] for r in ordered[1:]) + ".")
    return ("Only where intervals lie apart do these trials rank two methods (a lower rate first): "
            + "; ".join(f"{words[a.method]} below {words[b.method]}" for a, b in apart)
            + f"; the other {pairs - len(apart)} of the {pairs} pairs overlap.")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
