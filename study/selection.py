"""The one rule for "best trial", the one Pareto front, the multiple-comparison correction and the one rule
for calling a difference a gain, used by the end-of-run summary and by ``analysis`` alike.

They take plain records: ``(trial_id, metrics)`` pairs, so the CLI (Tune results)
and the report (MLflow runs) rank and word the very same numbers the very same way.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from .vocabulary import GENERAL_TOP1, SPECIALIZED_TOP1

Record = tuple[str, Mapping[str, float]]


def _value(metrics: Mapping[str, float], key: str) -> float:
    v = metrics.get(key)
    return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def best_trial(records: Iterable[Record], metric: str = SPECIALIZED_TOP1, mode: str = "max") -> str | None:
    """The id of the best trial by ``metric`` (``mode`` ``max`` or ``min``), or None when none has it.

    Ties are broken deterministically, in this order: the higher ``general_top1`` of the same part
    (``val/general_top1`` for ``val/...``: the same gain at a smaller general cost wins), then the smaller
    trial id (string order). Records lacking ``metric`` (failed or unfinished trials) are never chosen.
    """
    sign = 1.0 if mode == "max" else -1.0
    part = metric.rpartition("/")[0]
    general = f"{part}/{GENERAL_TOP1}" if part else GENERAL_TOP1
    ranked = [(sign * _value(m, metric), _value(m, general), tid) for tid, m in records
              if _value(m, metric) != -math.inf]
    if not ranked:
        return None
    return min(ranked, key=lambda r: (-r[0], -r[1], r[2]))[2]


def ranked(trials: Sequence, metric: str, mode: str = "max", top: int | None = None) -> list:
    """``trials`` (objects with ``trial_id`` and ``metrics``: Tune's outcomes or MLflow's records) best first by
    :func:`best_trial`'s rule, the first ``top`` of them (all when None); those lacking ``metric`` are left out."""
    left, out = {t.trial_id: t for t in trials}, []
    while left and (top is None or len(out) < top):
        tid = best_trial([(i, t.metrics) for i, t in left.items()], metric, mode)
        if tid is None:
            break
        out.append(left.pop(tid))
    return out


def best(trials: Sequence, metric: str, mode: str = "max"):
    """The best of ``trials`` by ``metric`` (:func:`best_trial`'s rule), or None when none has it."""
    return next(iter(ranked(trials, metric, mode, top=1)), None)


def pareto_front(records: Iterable[Record], x: str = SPECIALIZED_TOP1, y: str = GENERAL_TOP1) -> list[str]:
    """Ids of the trials not dominated on ``(x, y)``, both maximised, in input order.

    A trial is dominated when another is at least as good on both and strictly better on one; two
    trials with identical values are both on the front. Records lacking either metric are left out.
    """
    pts = [(tid, _value(m, x), _value(m, y)) for tid, m in records]
    pts = [p for p in pts if p[1] != -math.inf and p[2] != -math.inf]
    return [tid for tid, a, b in pts
            if not any(c >= a and d >= b and (c, d) != (a, b) for _, c, d in pts)]


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error rate) of ``{trial_id: p}``, one test per trial against the
    baseline; statsmodels' ``multipletests(method="holm")``. NaN p-values are left out."""
    from statsmodels.stats.multitest import multipletests

    ids = [t for t, p in pvalues.items() if p is not None and not math.isnan(p)]
    if not ids:
        return {}
    adjusted = multipletests([pvalues[t] for t in ids], method="holm")[1]
    return {t: float(a) for t, a in zip(ids, adjusted)}


def verdict(change: float, ci_low: float, ci_high: float, collapsed: bool, noun: str = "gain") -> str:
    """How a change against the baseline may be worded: ``"gain"`` (``noun``) only when its interval lies
    above 0 and the model did not collapse; ``"loss"`` when the interval lies below 0; else ``"no reliable
    gain"``. A collapsed model's difference is never a gain."""
    if collapsed:
        return f"no reliable {noun} (the model collapsed to one class)"
    if math.isnan(ci_low) or math.isnan(ci_high):
        return f"no reliable {noun} (no interval)"
    if ci_low > 0:
        return noun
    if ci_high < 0:
        return "loss"
    return f"no reliable {noun}"


def distance_closed(zero_shot: float, tuned: float, probe: float, gain_low: float = math.nan,
                    gain_high: float = math.nan, probe_low: float = math.nan, probe_high: float = math.nan) -> str:
    """How much of the distance from the baseline's zero-shot score to its linear probe (the ceiling the same frozen
    features reach with labels) the fine-tuned model closed, worded no further than the numbers allow: the share
    ``(tuned - zero_shot) / (probe - zero_shot)`` with the paired 95% interval of the gain (``gain_low``,
    ``gain_high``) as shares of that distance; "not distinguishable from none" when that interval holds 0; no share at
    all when the probe is not above zero-shot by half a point, and a warning when the probe's own 95% interval
    (``probe_low``, ``probe_high``) holds the zero-shot score. Accuracies as fractions, e.g.
    ``"zero-shot 42.0% → 58.1%; the baseline's linear probe reaches 81.5%, so fine-tuning closed 41% of the distance
    (the gain's paired 95% CI: 30% to 52% of it)"``."""
    ceiling = f"the baseline's linear probe reaches {probe:.1%}"
    if not (math.isnan(probe_low) or math.isnan(probe_high)):
        ceiling += f" (95% CI {probe_low:.1%} to {probe_high:.1%})"
    head = f"zero-shot {zero_shot:.1%} → {tuned:.1%}; {ceiling}"
    gap = probe - zero_shot
    if not gap > 0.005:
        return f"{head}, no more than half a point above zero-shot, so there is no distance to close on this benchmark"
    if probe_low <= zero_shot:  # (False when the interval is unknown)
        head += ", an interval that holds the zero-shot score, so the distance itself is uncertain"
    share = (tuned - zero_shot) / gap
    known = not (math.isnan(gain_low) or math.isnan(gain_high))
    interval = f" (the gain's paired 95% CI: {gain_low / gap:.0%} to {gain_high / gap:.0%} of it)" if known else ""
    if not known:
        return f"{head}; fine-tuning moved {share:.0%} of the distance, with no interval to say how reliably"
    if gain_low <= 0 <= gain_high:
        return f"{head}; fine-tuning moved {share:.0%} of the distance{interval}: not distinguishable from none"
    if share < 0:
        return (f"{head}; fine-tuning moved away from it, {(tuned - zero_shot) * 100:+.1f} points: {-share:.0%} of the "
                f"distance{interval}")
    if share > 1:
        return f"{head}, so fine-tuning went past the baseline's probe: {share:.0%} of the distance{interval}"
    return f"{head}, so fine-tuning closed {share:.0%} of the distance{interval}"
