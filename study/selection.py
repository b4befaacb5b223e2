"""The one rule for "best trial" and the one Pareto front, used by the end-of-run summary and by ``analysis``.

Both take plain records: ``(trial_id, metrics)`` pairs, so the CLI (Tune results)
and the report (MLflow runs) rank the very same numbers the very same way.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from .vocabulary import GENERAL_TOP1, SPECIALIZED_TOP1

Record = tuple[str, Mapping[str, float]]


def _value(metrics: Mapping[str, float], key: str) -> float:
    v = metrics.get(key)
    return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def best_trial(records: Iterable[Record], metric: str = SPECIALIZED_TOP1, mode: str = "max") -> str | None:
    """The id of the best trial by ``metric`` (``mode`` ``max`` or ``min``), or None when none has it.

    Ties are broken deterministically, in this order: the higher ``general_top1`` (the same gain at a
    smaller general cost wins), then the smaller trial id (string order). Records lacking ``metric``
    (failed or unfinished trials) are never chosen.
    """
    sign = 1.0 if mode == "max" else -1.0
    ranked = [(sign * _value(m, metric), _value(m, GENERAL_TOP1), tid) for tid, m in records
              if _value(m, metric) != -math.inf]
    if not ranked:
        return None
    return min(ranked, key=lambda r: (-r[0], -r[1], r[2]))[2]


def pareto_front(records: Iterable[Record], x: str = SPECIALIZED_TOP1, y: str = GENERAL_TOP1) -> list[str]:
    """Ids of the trials not dominated on ``(x, y)``, both maximised, in input order.

    A trial is dominated when another is at least as good on both and strictly better on one; two
    trials with identical values are both on the front. Records lacking either metric are left out.
    """
    pts = [(tid, _value(m, x), _value(m, y)) for tid, m in records]
    pts = [p for p in pts if p[1] != -math.inf and p[2] != -math.inf]
    return [tid for tid, a, b in pts
            if not any(c >= a and d >= b and (c, d) != (a, b) for _, c, d in pts)]
