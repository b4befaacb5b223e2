"""The plain answer printed at the end of a sweep, from Tune's results (the report reads MLflow instead;
both rank trials with :mod:`study.selection`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..selection import best_trial, pareto_front
from ..settings import TrialSettings
from ..vocabulary import DONE, ERROR, GENERAL_TOP1, SPECIALIZED_TOP1, WISEFT_BEST, WISEFT_BEST_ALPHA, wiseft_curve


@dataclass
class TrialOutcome:
    """A Tune trial as the study sees it once the sweep returns."""

    trial_id: str
    status: str  # vocabulary.DONE, ERROR or UNFINISHED
    settings: Optional[TrialSettings]
    metrics: dict
    error: str = ""
    replicate_of: Optional[str] = None  # for a seed replicate: the sweep trial it reruns


def records(rows: list[TrialOutcome]) -> list[tuple[str, dict]]:
    """The finished trials as ``(trial_id, metrics)`` records for :mod:`study.selection`."""
    return [(r.trial_id, r.metrics) for r in rows if r.status == DONE]


def format_summary(rows: list[TrialOutcome], baseline: dict, experiment: str, tracking_uri: str,
                   parent_run_id: str, multi_objective: bool, extra: list[str] = ()) -> str:
    """The end-of-run answer; ``extra`` lines (e.g. the seed replicates) go before the MLflow pointers."""
    done = [r for r in rows if r.status == DONE]
    failed = [r for r in rows if r.status == ERROR]
    lines = ["", "=" * 72, "Study summary", "=" * 72,
             f"trials: {len(done)} finished, {len(failed)} failed, {len(rows) - len(done) - len(failed)} unfinished"]
    lines += [f"  failed {r.trial_id}: {r.error}" for r in failed]
    lines.append(f"baseline zero-shot top-1: specialized {baseline[SPECIALIZED_TOP1]:.1%} (chance "
                 f"{baseline.get('specialized_chance', 0):.1%}), general {baseline[GENERAL_TOP1]:.1%}")
    best_id = best_trial(records(rows))
    if best_id is None:
        lines.append("no trial finished, so there is no fine-tuned result to compare.")
    else:
        lines += best_lines(next(r for r in done if r.trial_id == best_id), baseline)
        if multi_objective:
            lines += front_lines(rows, baseline)
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)"
          if tracking_uri.startswith("sqlite:") else f"open {tracking_uri} in a browser")
    lines += [*extra, f"MLflow experiment {experiment!r}, parent run {parent_run_id}", f"  to browse: {ui}", "=" * 72]
    return "\n".join(lines)


def best_lines(best: TrialOutcome, baseline: dict) -> list[str]:
    """The best trial's accuracies, intervals, paired tests, knobs and WiSE-FT curve."""
    m = best.metrics
    d_spec = (m[SPECIALIZED_TOP1] - baseline[SPECIALIZED_TOP1]) * 100
    d_gen = (m[GENERAL_TOP1] - baseline[GENERAL_TOP1]) * 100
    lines = [f"best specialized trial {best.trial_id}: specialized {m[SPECIALIZED_TOP1]:.1%} "
             f"({d_spec:+.1f} points vs baseline), general {m[GENERAL_TOP1]:.1%} ({d_gen:+.1f} points)"]
    lines += [f"  {bench} top-1 95% CI [{m[f'{bench}_top1_ci_low']:.1%}, {m[f'{bench}_top1_ci_high']:.1%}] "
              f"(bootstrap over images)" for bench in ("specialized", "general") if f"{bench}_top1_ci_low" in m]
    lines += [f"  {bench} gain 95% CI [{m[f'{bench}_top1_gain_ci_low'] * 100:+.1f}, "
              f"{m[f'{bench}_top1_gain_ci_high'] * 100:+.1f}] points (paired bootstrap), "
              f"McNemar p = {m[f'{bench}_mcnemar_p']:.2g}"
              for bench in ("specialized", "general") if f"{bench}_top1_gain_ci_low" in m]
    if best.settings is not None:
        lines.append("  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best.settings.model_dump().items())))
    if WISEFT_BEST_ALPHA in m:
        curve = wiseft_curve(m)
        lines.append(f"  WiSE-FT (trained change x alpha): best alpha {m[WISEFT_BEST_ALPHA]:g} gives specialized "
                     f"{m[WISEFT_BEST + SPECIALIZED_TOP1]:.1%}, general {m[WISEFT_BEST + GENERAL_TOP1]:.1%}; "
                     "specialized by alpha: " + ", ".join(f"{a:g}: {s:.1%}" for a, s, _ in curve))
    return lines


def front_lines(rows: list[TrialOutcome], baseline: dict) -> list[str]:
    """The Pareto front of specialized vs general top-1, best specialized first."""
    by_id = {r.trial_id: r for r in rows}
    front = sorted((by_id[t] for t in pareto_front(records(rows))), key=lambda r: -r.metrics[SPECIALIZED_TOP1])
    lines = [f"Pareto front (specialized vs general top-1): {len(front)} trial(s)"]
    for r in front:
        lines.append(f"  {r.trial_id}: specialized {(r.metrics[SPECIALIZED_TOP1] - baseline[SPECIALIZED_TOP1]) * 100:+.1f}"
                     f" pts, general {(r.metrics[GENERAL_TOP1] - baseline[GENERAL_TOP1]) * 100:+.1f} pts")
    return lines


def _fmt(v):
    if isinstance(v, list):
        return "+".join(map(str, v))
    return f"{v:.3g}" if isinstance(v, float) else str(v)
