"""Seed replicates: rerun the sweep's best configurations with other seeds and report mean +/- sd.

A configuration's N seeds are the sweep trial itself (its own ``seed``) and N - 1 replicate trials
with ``seed + 1 ... seed + N - 1``. Only the training randomness changes (adapter initialisation, batch
order); the data-fraction subset stays the same nested subset, so the spread is the seed's alone.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..config import SearchSpace
from ..selection import ranked
from ..vocabulary import DONE, REPLICATED, TEST, key
from .trial import REPLICATE_OF, tune_config
from .tuner import TrialOutcome


def pick_best(rows: list[TrialOutcome], metric: str, mode: str, top: int | None) -> list[TrialOutcome]:
    """The ``top`` trials that ran to their last epoch by ``metric`` (all of them when ``top`` is None), best first
    (:func:`study.selection.ranked`, the one rule)."""
    return ranked([r for r in rows if r.status == DONE and key(TEST, "specialized_top1") in r.metrics], metric, mode,
                  top)


def replicate_configs(best: list[TrialOutcome], seeds: int, space: SearchSpace) -> list[dict]:
    """One Tune config per extra seed of each chosen trial (the space's fixed knobs left to the context), tagged
    with the trial it replicates."""
    out = []
    for r in best:
        config = tune_config(r.settings, space)
        out += [{**config, "seed": r.settings.seed + k, REPLICATE_OF: r.trial_id} for k in range(1, seeds)]
    return out


@dataclass
class Spread:
    trial_id: str
    n: int
    values: dict[str, list[float]]  # metric -> one value per seed (the sweep trial's first)

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values[key])

    def sd(self, key: str) -> float:
        return statistics.stdev(self.values[key]) if len(self.values[key]) > 1 else float("nan")


def spreads(best: list[TrialOutcome], replicate_rows: list[TrialOutcome]) -> list[Spread]:
    """Per chosen trial: its test metrics and those of its finished replicates (keys without the ``test/``)."""
    out = []
    for r in best:
        runs = [r] + [x for x in replicate_rows if x.status == DONE and x.replicate_of == r.trial_id]
        values = {k: [x.metrics[key(TEST, k)] for x in runs if key(TEST, k) in x.metrics] for k in REPLICATED}
        out.append(Spread(r.trial_id, len(runs), {k: v for k, v in values.items() if v}))
    return out


def format_spreads(items: list[Spread], baseline: dict) -> list[str]:
    """One line per replicated configuration: test top-1 mean +/- sd over its seeds."""
    lines = ["seed replicates (test top-1, mean +/- sd over seeds; sweep trial + replicates):"]
    for s in items:
        line = f"  {s.trial_id} (n={s.n}): specialized {s.mean('specialized_top1'):.1%} +/- {s.sd('specialized_top1'):.1%}"
        if "general_top1" in s.values:
            line += f", general {s.mean('general_top1'):.1%} +/- {s.sd('general_top1'):.1%}"
        if key(TEST, "specialized_top1") in baseline:
            line += f" (change {(s.mean('specialized_top1') - baseline[key(TEST, 'specialized_top1')]) * 100:+.1f} points)"
        lines.append(line)
    return lines


def spread_metrics(items: list[Spread]) -> dict[str, float]:
    """Flat metrics for the parent run: ``replicates/<trial>/<metric>_mean|_sd`` and ``_n``."""
    out = {}
    for s in items:
        out[f"replicates/{s.trial_id}/n"] = s.n
        for k in s.values:
            out[f"replicates/{s.trial_id}/{k}_mean"] = s.mean(k)
            if s.n > 1:
                out[f"replicates/{s.trial_id}/{k}_sd"] = s.sd(k)
    return out
