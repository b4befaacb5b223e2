"""The plain answer printed at the end of a sweep, from the sweep as MLflow holds it (:func:`study.tracking.read_sweep`,
the same read the report makes), so the summary and the report choose, correct and word the same numbers.

The best trial is chosen on the validation part of the benchmarks; every number printed for it is measured on
the test part.
"""

from __future__ import annotations

from collections import Counter

from ..config import StudyConfig
from ..selection import distance_closed, pareto_front, verdict
from ..tracking import SweepRecord, TrialRecord
from ..vocabulary import (EARLY_STOPPED, FAILED, FINISHED, LINEAR_PROBE, ORPHANED, ROLES,
                          TEST, TRANSFER_NOTE_TAG, VAL, WISEFT_BEST, WISEFT_BEST_ALPHA, headline,
                          key, metric_words, wiseft_curve)


def failure_counts(failed) -> str:
    """``"2 x NonFiniteLossError: loss became nan; 1 x OutOfMemoryError: ..."``, most frequent first (``failed``:
    objects with an ``error``)."""
    return "; ".join(f"{n} x {reason or 'unknown'}" for reason, n in Counter(r.error for r in failed).most_common())


def counts(sweep: SweepRecord) -> tuple[list[TrialRecord], list[TrialRecord], int]:
    """The sweep's trials that ended (finished, or stopped early by the scheduler), those that failed, and how many
    are neither (cut off); orphaned runs (trials Tune never recorded) are not the sweep's trials."""
    trials = [t for t in sweep.trials if t.status != ORPHANED]
    done = [t for t in trials if t.status in (FINISHED, EARLY_STOPPED)]
    failed = [t for t in trials if t.status == FAILED]
    return done, failed, len(trials) - len(done) - len(failed)


def format_summary(sweep: SweepRecord, cfg: StudyConfig, tracking_uri: str, extra: list[str] = ()) -> str:
    """The end-of-run answer for ``sweep`` (``cfg``: its config, for the objectives and thresholds); ``extra``
    lines (e.g. the seed replicates) go before the MLflow pointers."""
    done, failed, unfinished = counts(sweep)
    first, baseline = cfg.search.objective[0], sweep.baseline
    lines = ["", "=" * 72, "Study summary", "=" * 72,
             f"trials: {len(done)} finished, {len(failed)} failed, {unfinished} unfinished",
             f"chosen on validation ({first.metric}, {first.mode}); every number below is on the test part"]
    lines += [f"base model: {sweep.base_model}"] if sweep.base_model else []
    lines += [f"  failed {r.label}: {r.error}" for r in failed]
    lines += [f"failure reasons: {failure_counts(failed)}"] if failed else []
    transfer = sweep.tags.get(TRANSFER_NOTE_TAG, "")
    lines += [f"NOTE: {transfer}"] if transfer else []
    lines += baseline_lines(baseline)
    collapsed = [r.trial_id for r in done if r.metrics.get(key(TEST, "specialized_collapsed"), 0) >= 1]
    if collapsed:
        lines.append(f"COLLAPSED ({len(collapsed)} of {len(done)}): one class for >= {cfg.evaluation.collapse_share:.0%} "
                     f"of the specialized test images: {', '.join(collapsed)}")
    best = sweep.best()
    if best is None:
        lines.append("no trial finished, so there is no fine-tuned result to compare.")
    else:
        holm = key(TEST, "specialized_mcnemar_p_holm")
        lines += best_lines(best, baseline, cfg.evaluation.headline, best.metrics.get(holm),
                            sum(holm in t.metrics for t in done), cfg.evaluation.wiseft_metric)
        lines += probe_lines(best.metrics, baseline, cfg.evaluation.headline)
        if cfg.multi_objective:
            lines += front_lines(sweep, cfg)
    local = tracking_uri.startswith("sqlite:")
    page = runs_page("http://127.0.0.1:5000" if local else tracking_uri, sweep.experiment_id)
    ui = f"mlflow ui --backend-store-uri {tracking_uri}, then open {page}" if local else f"open {page}"
    lines += [*extra, f"MLflow experiment {cfg.name!r}, parent run {sweep.parent_run_id}", f"  to browse: {ui}",
              "=" * 72]
    return "\n".join(lines)


def runs_page(server: str, experiment_id: str | None) -> str:
    """The MLflow UI's page of an experiment's runs. MLflow 3's UI opens an experiment on its GenAI traces
    unless the browser chose "Model training" before; ``workflowType=machine_learning`` makes that choice."""
    if experiment_id is None:
        return server
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def headline_metrics(sweep: SweepRecord, cfg: StudyConfig) -> dict[str, float]:
    """The sweep's headline numbers for its parent run (test part, fractions): trials finished, failed and
    unfinished; the baseline's and the best trial's headline metric per role, and the best trial's change
    against the baseline with its paired 95% CI (``best/test/specialized_balanced_accuracy_gain_ci_low`` ...)."""
    done, failed, unfinished = counts(sweep)
    out = {"trials_finished": len(done), "trials_failed": len(failed), "trials_unfinished": unfinished}
    best, baseline = sweep.best(), sweep.baseline
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
    """The zero-shot baseline on the test part, with the chance level of each metric, and its linear probe."""
    lines = []
    for role in ("specialized", "general"):
        b = {m: baseline.get(key(TEST, f"{role}_{m}"), float("nan"))
             for m in ("balanced_accuracy", "top1", "chance_balanced_accuracy", "chance_top1")}
        lines.append(f"baseline zero-shot, {role}: balanced accuracy {b['balanced_accuracy']:.1%} (chance "
                     f"{b['chance_balanced_accuracy']:.1%}), top-1 {b['top1']:.1%} (chance {b['chance_top1']:.1%}, "
                     f"the majority class)")
        p = {m: baseline.get(key(TEST, f"{role}_{LINEAR_PROBE}{m}")) for m in ("balanced_accuracy", "top1",
                                                                               "train_images")}
        if p["balanced_accuracy"] is not None:
            lines.append(f"baseline linear probe (the ceiling; CLIP_benchmark's protocol, fit on "
                         f"{p['train_images'] or float('nan'):.0f} labelled images), {role}: balanced accuracy "
                         f"{p['balanced_accuracy']:.1%}, top-1 {p['top1']:.1%}")
    return lines


def probe_lines(m: dict, baseline: dict, head: str) -> list[str]:
    """Against the linear-probe ceiling, per role whose baseline has one: how much of the distance from zero-shot to
    the baseline's probe the chosen trial closed (:func:`~study.selection.distance_closed`, headline metric, test
    part), and the trial's own probe where it fitted one (``evaluation.linear_probe``)."""
    lines = []
    for role in ROLES:
        metric, probe = headline(role, head), f"{role}_{LINEAR_PROBE}{head}"
        if key(TEST, probe) not in baseline or key(TEST, metric) not in m:
            continue
        ceiling = [baseline.get(key(TEST, f"{probe}_ci_{side}"), float("nan")) for side in ("low", "high")]
        gain = [m.get(key(TEST, f"{metric}_gain_ci_{side}"), float("nan")) for side in ("low", "high")]
        text = distance_closed(baseline.get(key(TEST, metric), float("nan")), m[key(TEST, metric)],
                               baseline[key(TEST, probe)], *gain, *ceiling)
        own = m.get(key(TEST, probe))
        lines.append(f"  linear-probe ceiling, {role} {metric_words(head)}: {text}"
                     + (f"; the fine-tuned model's own linear probe: {own:.1%}" if own is not None else ""))
    return lines


def best_lines(best: TrialRecord, baseline: dict, head: str, p_adjusted: float | None, n_trials: int,
               select: str) -> list[str]:
    """The chosen trial's test numbers: headline with its paired interval and verdict, top-1 beside it,
    the collapse flag, the corrected p-value, knobs and the WiSE-FT choice (``select``: what chose alpha,
    ``evaluation.wiseft_metric``)."""
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
        lines.append("  knobs: " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(knobs(best.settings).items())))
    if WISEFT_BEST_ALPHA in m:
        lines.append(wiseft_line(m, head, select))
    return lines


def wiseft_line(m: dict, head: str, select: str) -> str:
    """The WiSE-FT choice: ``alpha`` chosen on validation by ``select`` (``evaluation.wiseft_metric``), the test
    headline of both roles there, and the validation ``select`` at every alpha (what chose it)."""
    curve = wiseft_curve(m, VAL, select, select)
    test = {role: m.get(key(TEST, WISEFT_BEST + headline(role, head)), float("nan")) for role in ROLES}
    return (f"  WiSE-FT (trained change x alpha): alpha {m[WISEFT_BEST_ALPHA]:g} chosen on validation by "
            f"{metric_words(select)} gives test {metric_words(head)} specialized {test['specialized']:.1%}, general "
            f"{test['general']:.1%}; validation {metric_words(select)} by alpha: "
            + ", ".join(f"{a:g}: {v:.1%}" for a, v, _ in curve))


def knobs(settings) -> dict:
    """The knobs a trial's method used, for its summary line: none left unset (``None``), no LoRA knob for another
    method (no block knob for ``projections``), no ``data_fraction`` beside ``shots_per_class``."""
    values = {k: v for k, v in settings.model_dump().items() if v is not None}
    unused = {"lora": (), "projections": ("lora_rank", "lora_alpha", "lora_targets", "lora_blocks", "lora_towers")}
    for k in unused.get(settings.method, ("lora_rank", "lora_alpha", "lora_targets")):
        values.pop(k, None)
    if settings.shots_per_class is not None:
        values.pop("data_fraction", None)
    return values


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


def front_lines(sweep: SweepRecord, cfg: StudyConfig) -> list[str]:
    """The Pareto front of the search's first two objectives on validation (what Optuna's multi-objective
    sampler searched), best first objective first; then each metric on test, and its change against the
    baseline where the baseline has it."""
    objectives, baseline = cfg.search.objective[:2], sweep.baseline
    sign = {o.metric: 1.0 if o.mode == "max" else -1.0 for o in objectives}  # pareto_front maximises both
    done = [t for t in sweep.trials if t.complete]
    recs = [(t.trial_id, {k: sign[k] * t.metrics[key(VAL, k)] for k in sign if key(VAL, k) in t.metrics})
            for t in done]
    x, y = (o.metric for o in objectives)
    by_id = {t.trial_id: t for t in done}
    front = sorted((by_id[t] for t in pareto_front(recs, x, y)), key=lambda r: -sign[x] * r.metrics[key(VAL, x)])
    lines = [f"Pareto front (validation, {x} {objectives[0].mode} vs {y} {objectives[1].mode}: the search's "
             f"objectives): {len(front)} trials; on test:"]
    for r in front:
        parts = []
        for metric in (x, y):
            value, base = r.metrics.get(key(TEST, metric), float("nan")), baseline.get(key(TEST, metric))
            if metric.endswith(("_gain", "_change")):  # already a difference against the baseline
                parts.append(f"{metric} {value * 100:+.1f} points")
            else:
                parts.append(f"{metric} {value:.1%}" + (f" ({(value - base) * 100:+.1f} points)" if base is not None
                                                        else ""))
        lines.append(f"  {r.label}: " + ", ".join(parts))
    return lines


def _fmt(v):
    if isinstance(v, list):
        return "+".join(map(str, v))
    return f"{v:.4g}" if isinstance(v, float) else str(v)
