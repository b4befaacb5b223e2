"""The plain answer printed at the end of a sweep, from Tune's results (the report reads MLflow instead;
both choose, correct and word with :mod:`study.selection`).

The best trial is chosen on the validation part of the benchmarks; every number
printed for it is measured on the test part.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ..config import StudyConfig
from ..selection import best_trial, pareto_front, verdict
from ..settings import TrialSettings
from ..vocabulary import (DONE, ERROR, GENERAL_TOP1, SPECIALIZED_TOP1, TEST, VAL, WISEFT_BEST, WISEFT_BEST_ALPHA,
                          headline, key, metric_words, wiseft_curve)


@dataclass
class TrialOutcome:
    """A Tune trial as the study sees it once the sweep returns."""

    trial_id: str
    status: str  # vocabulary.DONE, ERROR or UNFINISHED
    settings: Optional[TrialSettings]
    metrics: dict
    error: str = ""
    replicate_of: Optional[str] = None  # for a seed replicate: the sweep trial it reruns
    config: dict = field(default_factory=dict)  # the knob values Tune sampled for it (searched knobs only)
    number: Optional[int] = None  # its number in the sweep, as its MLflow run's name starts (t03)

    @property
    def label(self) -> str:
        return trial_label(self.number, self.trial_id, self.replicate_of is not None)


def trial_label(number: Optional[int], trial_id: str, replicate: bool = False) -> str:
    """How the console names a trial, after its MLflow run: ``t03 5d43d97f`` (``rep 5d43d97f`` for a seed
    replicate; the bare id when Tune gave no count)."""
    return f"rep {trial_id}" if replicate else f"t{number:02d} {trial_id}" if number is not None else trial_id


def records(rows: list[TrialOutcome]) -> list[tuple[str, dict]]:
    """The trials that ran to their last epoch (so have test numbers) as ``(trial_id, metrics)`` records for
    :mod:`study.selection`; trials the scheduler stopped early are not candidates."""
    return [(r.trial_id, r.metrics) for r in rows if r.status == DONE and key(TEST, SPECIALIZED_TOP1) in r.metrics]


def choose(rows: list[TrialOutcome], cfg: StudyConfig) -> Optional[TrialOutcome]:
    """The best finished trial by the first objective on the validation part (the one rule)."""
    first = cfg.search.objective[0]
    tid = best_trial(records(rows), key(VAL, first.metric), first.mode)
    return next((r for r in rows if r.trial_id == tid), None)


def failure_counts(failed: list[TrialOutcome]) -> str:
    """``"2 x NonFiniteLossError: loss became nan; 1 x OutOfMemoryError: ..."``, most frequent first."""
    return "; ".join(f"{n} x {reason or 'unknown'}" for reason, n in Counter(r.error for r in failed).most_common())


def format_summary(rows: list[TrialOutcome], baseline: dict, cfg: StudyConfig, tracking_uri: str,
                   parent_run_id: str, extra: list[str] = (), adjusted: dict | None = None, transfer: str = "",
                   experiment_id: str | None = None) -> str:
    """The end-of-run answer; ``adjusted``: Holm-adjusted p-values by trial id; ``extra`` lines (e.g. the seed
    replicates) go before the MLflow pointers; ``transfer``: why the study is in-distribution transfer, if it is;
    ``experiment_id``: for the link to the experiment's runs in the MLflow UI."""
    done = [r for r in rows if r.status == DONE]
    failed = [r for r in rows if r.status == ERROR]
    first = cfg.search.objective[0]
    lines = ["", "=" * 72, "Study summary", "=" * 72,
             f"trials: {len(done)} finished, {len(failed)} failed, {len(rows) - len(done) - len(failed)} unfinished",
             f"chosen on validation ({first.metric}, {first.mode}); every number below is on the test part"]
    lines += [f"  failed {r.label}: {r.error}" for r in failed]
    lines += [f"failure reasons: {failure_counts(failed)}"] if failed else []
    lines += [f"NOTE: {transfer}"] if transfer else []
    lines += baseline_lines(baseline)
    collapsed = [r.trial_id for r in done if r.metrics.get(key(TEST, "specialized_collapsed"), 0) >= 1]
    if collapsed:
        lines.append(f"COLLAPSED ({len(collapsed)} of {len(done)}): one class for >= {cfg.evaluation.collapse_share:.0%} "
                     f"of the specialized test images: {', '.join(collapsed)}")
    best = choose(rows, cfg)
    if best is None:
        lines.append("no trial finished, so there is no fine-tuned result to compare.")
    else:
        lines += best_lines(best, baseline, cfg.evaluation.headline, (adjusted or {}).get(best.trial_id),
                            len(adjusted or {}))
        if cfg.multi_objective:
            lines += front_lines(rows, baseline, cfg)
    local = tracking_uri.startswith("sqlite:")
    page = runs_page("http://127.0.0.1:5000" if local else tracking_uri, experiment_id)
    ui = f"mlflow ui --backend-store-uri {tracking_uri}, then open {page}" if local else f"open {page}"
    lines += [*extra, f"MLflow experiment {cfg.name!r}, parent run {parent_run_id}", f"  to browse: {ui}", "=" * 72]
    return "\n".join(lines)


def runs_page(server: str, experiment_id: str | None) -> str:
    """The MLflow UI's page of an experiment's runs. MLflow 3's UI opens an experiment on its GenAI traces
    unless the browser chose "Model training" before; ``workflowType=machine_learning`` makes that choice."""
    if experiment_id is None:
        return server
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def headline_metrics(rows: list[TrialOutcome], baseline: dict, cfg: StudyConfig) -> dict[str, float]:
    """The sweep's headline numbers for its parent run (test part, fractions): trials finished, failed and
    unfinished; the baseline's and the best trial's headline metric per role, and the best trial's change
    against the baseline with its paired 95% CI (``best/test/specialized_balanced_accuracy_gain_ci_low`` ...)."""
    done = [r for r in rows if r.status == DONE]
    failed = sum(r.status == ERROR for r in rows)
    out = {"trials_finished": len(done), "trials_failed": failed, "trials_unfinished": len(rows) - len(done) - failed}
    best = choose(rows, cfg)
    for role in ("specialized", "general"):
        metric = key(TEST, headline(role, cfg.evaluation.headline))
        if metric in baseline:
            out[f"baseline/{metric}"] = baseline[metric]
        if best is not None and metric in best.metrics:
            out[f"best/{metric}"] = best.metrics[metric]
            if metric in baseline:
                out[f"best/{metric}_gain"] = best.metrics[metric] - baseline[metric]
            for side in ("low", "high"):
                if f"{metric}_gain_ci_{side}" in best.metrics:
                    out[f"best/{metric}_gain_ci_{side}"] = best.metrics[f"{metric}_gain_ci_{side}"]
    return out


def baseline_lines(baseline: dict) -> list[str]:
    """The zero-shot baseline on the test part, with the chance level of each metric."""
    lines = []
    for role in ("specialized", "general"):
        b = {m: baseline.get(key(TEST, f"{role}_{m}"), float("nan"))
             for m in ("balanced_accuracy", "top1", "chance_balanced_accuracy", "chance_top1")}
        lines.append(f"baseline zero-shot, {role}: balanced accuracy {b['balanced_accuracy']:.1%} (chance "
                     f"{b['chance_balanced_accuracy']:.1%}), top-1 {b['top1']:.1%} (chance {b['chance_top1']:.1%}, "
                     f"the majority class)")
    return lines


def best_lines(best: TrialOutcome, baseline: dict, head: str, p_adjusted: float | None, n_trials: int) -> list[str]:
    """The chosen trial's test numbers: headline with its paired interval and verdict, top-1 beside it,
    the collapse flag, the corrected p-value, knobs and the WiSE-FT choice."""
    m = best.metrics
    lines = [f"best trial {best.label} (chosen on validation):"]
    for role in ("specialized", "general"):
        lines.append("  " + change_line(m, baseline, role, head))
    collapsed = [r for r in ("specialized", "general") if m.get(key(TEST, f"{r}_collapsed"), 0) >= 1]
    for role in collapsed:
        lines.append(f"  COLLAPSED on {role}: {m[key(TEST, f'{role}_pred_majority_share')]:.0%} of the test images "
                     f"get one class; no difference on it is called a gain")
    p = m.get(key(TEST, "specialized_mcnemar_p"))
    if p is not None:
        adj = f", Holm-adjusted over {n_trials} trial{'s' if n_trials != 1 else ''} p = {p_adjusted:.2g}" if p_adjusted is not None else ""
        lines.append(f"  specialized McNemar p = {p:.2g} (top-1 errors, against the baseline on the same images){adj}")
    if best.settings is not None:
        lines.append("  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(best.settings.model_dump().items())))
    if WISEFT_BEST_ALPHA in m:
        curve = wiseft_curve(m)
        lines.append(f"  WiSE-FT (trained change x alpha): alpha {m[WISEFT_BEST_ALPHA]:g} chosen on validation gives "
                     f"test top-1 specialized {m.get(key(TEST, WISEFT_BEST + SPECIALIZED_TOP1), float('nan')):.1%}, "
                     f"general {m.get(key(TEST, WISEFT_BEST + GENERAL_TOP1), float('nan')):.1%}; validation "
                     "specialized top-1 by alpha: " + ", ".join(f"{a:g}: {s:.1%}" for a, s, _ in curve))
    return lines


def change_line(m: dict, baseline: dict, role: str, head: str) -> str:
    """``specialized balanced accuracy 50.0% (+8.3 points, 95% CI [..]: gain); top-1 ...`` on test; the other
    metric (top-1, or balanced accuracy when top-1 leads) is printed beside the headline."""
    metric, other = headline(role, head), headline(role, "balanced_accuracy" if head == "top1" else "top1")
    value, base = m[key(TEST, metric)], baseline.get(key(TEST, metric), float("nan"))
    low, high = (m.get(key(TEST, f"{metric}_gain_ci_{side}"), float("nan")) for side in ("low", "high"))
    collapsed = m.get(key(TEST, f"{role}_collapsed"), 0) >= 1
    word = verdict(value - base, low, high, collapsed, "gain" if role == "specialized" else "change")
    return (f"{role} {metric_words(head)} {value:.1%} ({(value - base) * 100:+.1f} points vs baseline, paired 95% "
            f"CI [{low * 100:+.1f}, {high * 100:+.1f}]: {word}); {metric_words(other.removeprefix(role + '_'))} "
            f"{m[key(TEST, other)]:.1%} ({(m[key(TEST, other)] - baseline.get(key(TEST, other), float('nan'))) * 100:+.1f}"
            f" points)")


def front_lines(rows: list[TrialOutcome], baseline: dict, cfg: StudyConfig) -> list[str]:
    """The Pareto front of the search's first two objectives on validation (what Optuna's multi-objective
    sampler searched), best first objective first; then each metric on test, and its change against the
    baseline where the baseline has it."""
    objectives = cfg.search.objective[:2]
    sign = {o.metric: 1.0 if o.mode == "max" else -1.0 for o in objectives}  # pareto_front maximises both
    recs = [(t, {k: sign[k] * m[key(VAL, k)] for k in sign if key(VAL, k) in m}) for t, m in records(rows)]
    x, y = (o.metric for o in objectives)
    by_id = {r.trial_id: r for r in rows}
    front = sorted((by_id[t] for t in pareto_front(recs, x, y)), key=lambda r: -sign[x] * r.metrics[key(VAL, x)])
    lines = [f"Pareto front (validation, {x} {objectives[0].mode} vs {y} {objectives[1].mode}: the search's "
             f"objectives): {len(front)} trials; on test:"]
    for r in front:
        parts = []
        for metric in (x, y):
            value, base = r.metrics.get(key(TEST, metric), float("nan")), baseline.get(key(TEST, metric))
            parts.append(f"{metric} {value:.3g}" + (f" ({(value - base) * 100:+.1f} pts)" if base is not None else ""))
        lines.append(f"  {r.label}: " + ", ".join(parts))
    return lines


def _fmt(v):
    if isinstance(v, list):
        return "+".join(map(str, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)
