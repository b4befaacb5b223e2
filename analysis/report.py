"""The written finding: plain sentences that claim no more than the trials support."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pandas as pd

from . import plots
from .records import StudyRecords, best_row, load_study, pareto_mask, searched_knobs

MIN_TRIALS_FOR_IMPORTANCE = 4
MIN_TRIALS_FOR_TRENDS = 6


def importances(df: pd.DataFrame) -> dict[str, dict[str, float]]:
    """fANOVA importances of the knobs that varied, for the gain and for the cost (Optuna's evaluator)."""
    import optuna
    from optuna.distributions import FloatDistribution

    knobs = searched_knobs(df)
    if len(df) < MIN_TRIALS_FOR_IMPORTANCE or not knobs:
        return {}
    out = {}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for target, label in (("specialized_gain_pts", "specialized gain"), ("general_change_pts", "general change")):
        if df[target].nunique() < 2:  # nothing to explain; fANOVA would divide by zero variance
            continue
        study = optuna.create_study(direction="maximize")
        for _, row in df.iterrows():
            values = {k: float(row[k]) for k in knobs}
            dists = {k: FloatDistribution(float(df[k].min()), float(df[k].max())) for k in knobs}
            study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, value=float(row[target])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        out[label] = dict(imp)
    return out


def saturation(df: pd.DataFrame, knob: str) -> str:
    """Where the mean specialized gain stops rising along ``knob``, in words."""
    x = pd.to_numeric(df[knob], errors="coerce")
    levels = plots.level_means(x, df["specialized_gain_pts"])
    counts = plots.level_means(x, df["specialized_gain_pts"], agg="count")
    if len(levels) < 2 or len(df) < MIN_TRIALS_FOR_TRENDS:
        return f"too few trials to say where gains saturate along {knob}"
    best = levels.max()
    first = next(x for x, v in levels.items() if v >= 0.9 * best) if best > 0 else None
    listing = ", ".join(f"{x:.3g}: {v:+.1f} (n={int(counts[x])})" for x, v in levels.items()) + " points"
    if first is None:
        return f"no level of {knob} gave a positive mean gain ({listing})"
    if first == levels.index.max():
        return f"mean gain still rises at the largest {knob} tried ({listing}): no saturation seen"
    return (f"mean gain reaches 90% of its best by {knob} ≈ {first:.3g} ({listing}); "
            f"larger values add little")


def finding(rec: StudyRecords, imps: dict) -> list[str]:
    """The finding as plain sentences, each backed by the trial table (``rec``) and the importances."""
    df, ex = rec.trials, rec.excluded
    n, seeds = len(df), pd.to_numeric(df["seed"], errors="coerce").nunique() if len(df) else 0
    lines = [f"This rests on {n} finished trial(s) with {seeds} seed(s) each"
             + (f"; {len(ex)} more were failed, orphaned or unfinished and are left out "
                f"({', '.join(f'{s}: {c}' for s, c in ex['status'].value_counts().items())})." if len(ex) else ".")]
    if rec.parent_status == "RUNNING":
        lines.append("The sweep was still running (or was interrupted) when this was written; numbers may change.")
    if n == 0:
        lines.append("No trial has finished, so there is nothing to conclude yet.")
        return lines
    best = best_row(df)
    lines += best_sentences(rec, best)
    lines += retention_sentences(df)
    lines += reliability_sentences(rec, best)
    lines += importance_sentences(imps, n)
    for knob in ("data_fraction", "lora_rank"):
        text = saturation(df, knob)
        lines.append(text[0].upper() + text[1:] + ".")
    if n < MIN_TRIALS_FOR_TRENDS:
        lines.append(f"With only {n} trial(s), treat every trend here as anecdotal.")
    return lines


def interval_text(best: pd.Series) -> str:
    """The best trial's interval, as logged (bootstrap, with the paired gain interval and McNemar) or Wilson."""
    lo, hi = best["specialized_top1_ci_low_pct"], best["specialized_top1_ci_high_pct"]
    if math.isnan(lo):
        return " (no confidence interval logged)"
    if best["specialized_ci_kind"] != "bootstrap":
        return (f" (95% CI of its accuracy {lo:.1f}–{hi:.1f}%, Wilson interval on "
                f"{int(best['specialized_images'])} images)")
    ci = f" (95% bootstrap CI of its accuracy {lo:.1f}–{hi:.1f}%"
    if not math.isnan(best.get("specialized_top1_gain_ci_low", math.nan)):
        ci += (f"; of the gain {best['specialized_top1_gain_ci_low'] * 100:+.1f} to "
               f"{best['specialized_top1_gain_ci_high'] * 100:+.1f} points, paired; McNemar p = "
               f"{best['specialized_mcnemar_p']:.2g}")
    return ci + ")"


def best_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """The best trial's gain and cost, and the best point of its WiSE-FT curve."""
    b_spec, b_gen = rec.baseline.get("specialized_top1", math.nan), rec.baseline.get("general_top1", math.nan)
    lines = [f"The best specialized zero-shot top-1 was {best['specialized_top1']:.1%}, "
             f"{best['specialized_gain_pts']:+.1f} points over the zero-shot baseline of {b_spec:.1%}"
             f"{interval_text(best)}, in trial {best['trial_id']} (learning rate {float(best['learning_rate']):.2g}, "
             f"rank {int(best['lora_rank'])}, data fraction {float(best['data_fraction']):.2f}, tether λ "
             f"{float(best['tether_weight']):.2f}).",
             f"That configuration changed general zero-shot top-1 by {best['general_change_pts']:+.1f} points "
             f"(from {b_gen:.1%} to {best['general_top1']:.1%})."]
    curve = rec.wiseft.get(best["trial_id"])
    pts = [(a, (sp - b_spec) * 100, (ge - b_gen) * 100) for a, sp, ge in curve or [] if 0 < a < 1]
    if pts:  # the trained change scaled by alpha
        a, g, c = max(pts, key=lambda t: t[1] + t[2])
        lines.append(f"Scaling that trial's trained change by α (WiSE-FT), the largest sum of gain and general "
                     f"change among 0 < α < 1 was at α = {a:g}: specialized {g:+.1f} points, general {c:+.1f} "
                     f"points (α = 0 is the baseline exactly, α = 1 the trial above).")
    return lines


def retention_sentences(df: pd.DataFrame) -> list[str]:
    """The best gain that kept general accuracy within 2 points of the baseline, if any trial did."""
    front = df[pareto_mask(df)]
    keep = front[front["general_change_pts"] >= -2]
    if len(keep) and keep["specialized_gain_pts"].max() > 0:
        k = keep.loc[keep["specialized_gain_pts"].idxmax()]
        return [f"Keeping general accuracy within 2 points of the baseline, the best gain was "
                f"{k['specialized_gain_pts']:+.1f} points (trial {k['trial_id']})."]
    return ["No trial raised specialized accuracy while keeping general accuracy within 2 points of the baseline."]


def reliability_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """Whether the best trial's interval holds the baseline, and whether it overlaps the runner-up's."""
    df, lo = rec.trials, best["specialized_top1_ci_low_pct"]
    if math.isnan(lo):
        return []
    lines = []
    if rec.baseline.get("specialized_top1", math.nan) * 100 >= lo:
        lines.append("The best trial's interval includes the baseline accuracy: the gain is not distinguishable "
                     "from evaluation noise.")
    if len(df) > 1:
        runner_up = df.drop(index=best.name).sort_values("specialized_gain_pts").iloc[-1]
        if runner_up["specialized_top1_ci_high_pct"] >= lo:
            lines.append(f"The best trial's interval overlaps that of the runner-up ({runner_up['trial_id']}, "
                         f"{runner_up['specialized_gain_pts']:+.1f} points): their order is not reliable.")
    return lines


def importance_sentences(imps: dict, n: int) -> list[str]:
    """The most important knob for each target, with how much the ranking can be trusted."""
    if not imps:
        return [f"Too few finished trials (fewer than {MIN_TRIALS_FOR_IMPORTANCE}) to rank the knobs."]
    lines = []
    for target, imp in imps.items():
        top, share = next(iter(imp.items()))
        lines.append(f"The knob that mattered most for the {target} was {top} "
                     f"({share:.0%} of the explained variance, fANOVA on {n} trials"
                     f"{'; a rough ranking with fewer than 20' if n < 20 else ''}).")
    return lines


def write_report(rec: StudyRecords, out: Path) -> tuple[Path, list[str]]:
    """Write the table, the plots and ``report.md`` under ``out``; returns its path and the finding."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat([rec.trials.assign(included=True), rec.excluded.assign(included=False)], ignore_index=True)
    table.to_csv(out / "trials.csv", index=False)
    imps = importances(rec.trials)
    figures = [plots.tradeoff_map(rec, out), plots.accuracy_vs_intensity(rec, out), plots.marginals(rec, out),
               plots.importances_plot(imps, out)]
    front_ids = list(rec.trials[pareto_mask(rec.trials)]["trial_id"]) if len(rec.trials) else []
    figures.append(plots.wiseft_curves(rec, front_ids, out))
    lines = finding(rec, imps)
    md = [f"# Finding: {rec.experiment}", "", f"Sweep (MLflow parent run) `{rec.parent_run_id}`.", ""]
    md += [f"- {s}" for s in lines]
    md += ["", "## Figures", ""]
    md += [f"![{p.stem}]({p.name})" for p in figures if p is not None]
    if rec.wiseft == {}:
        md += ["", "_No WiSE-FT α curves were logged for this study._"]
    md += ["", "## Trials", "", _markdown_table(rec.trials), ""]
    if len(rec.excluded):
        md += ["## Left out of the fits", "", _markdown_table(rec.excluded[["trial_id", "status", "failure_reason"]]), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path, lines


def _markdown_table(df: pd.DataFrame) -> str:
    cols = [c for c in ["trial_id", "status", "learning_rate", "lora_rank", "data_fraction", "tether_weight",
                        "lora_blocks", "steps", "weight_change_norm", "specialized_top1", "general_top1",
                        "specialized_gain_pts", "general_change_pts", "failure_reason"] if c in df]
    if not len(df):
        return "_none_"

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(rows)


def run_analysis(tracking_uri: str, experiment: str, parent_run_id: str | None, out_root: Path) -> tuple[Path, list[str]]:
    """Analyse a study, write everything under ``out_root/<experiment>/<parent run>``, and attach it to the
    parent run as artifacts under ``analysis/``. Returns the report path and the finding's sentences."""
    from mlflow.tracking import MlflowClient

    rec = load_study(tracking_uri, experiment, parent_run_id)
    out = out_root / experiment / rec.parent_run_id
    report, lines = write_report(rec, out)
    MlflowClient(tracking_uri=tracking_uri).log_artifacts(rec.parent_run_id, str(out), "analysis")
    return report, lines
