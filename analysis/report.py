"""The written finding: plain sentences that claim no more than the trials support."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pandas as pd

from study.selection import distance_closed, verdict
from study.tracking import SweepRecord, log_report
from study.vocabulary import LINEAR_PROBE, METHOD_WORDS, NUMBER_PACKAGES, ROLES, metric_words

from . import plots
from .exchange import rate_sentence
from .headline import COLUMNS, cells, headline_row, markdown_table
from .records import StudyRecords, best_row, pareto_mask, searched_knobs, study_records

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


def plural(n: int, word: str) -> str:
    """``1 trial``, ``3 trials``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def saturation(df: pd.DataFrame, knob: str) -> str:
    """Where the mean specialized gain stops rising along ``knob``, in words, with n per level."""
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
    after = levels[levels.index > levels.idxmax()]
    if len(after) and after.min() < best - 1.0:  # more than a point below the best level
        return (f"mean gain peaks at {knob} ≈ {levels.idxmax():.3g}, and larger values gave less ({listing}); "
                f"with these few trials per level, a trend, not a finding")
    return f"mean gain reaches 90% of its best by {knob} ≈ {first:.3g} and stays there at larger values ({listing})"


def finding(rec: StudyRecords, imps: dict) -> list[str]:
    """The finding as plain sentences, each backed by the trial table (``rec``) and the importances."""
    df, ex = rec.trials, rec.excluded
    n, seeds = len(df), pd.to_numeric(df["seed"], errors="coerce").nunique() if len(df) else 0
    lines = [f"This rests on {plural(n, 'finished trial')} with {plural(seeds, 'seed')} each"
             + (f"; {len(ex)} more were failed, orphaned or unfinished and are left out "
                f"({', '.join(f'{s}: {c}' for s, c in ex['status'].value_counts().items())})." if len(ex) else ".")]
    if rec.transfer:
        lines.append(f"This is {rec.transfer[0].lower()}{rec.transfer[1:]}, so the gains below measure transfer to "
                     f"seen class names, not zero-shot accuracy.")
    if rec.parent_status == "RUNNING":
        lines.append("The sweep was still running (or was interrupted) when this was written; numbers may change.")
    lines += mixed_versions_sentences(rec.versions)
    if n == 0:
        lines.append("No trial has finished, so there is nothing to conclude yet.")
        return lines
    best = best_row(rec)
    lines += best_sentences(rec, best)
    if rates := rate_sentence(rec.rates, rec.headline):
        lines.append(rates)
    lines += retention_sentences(df)
    lines += reliability_sentences(rec, best)
    lines += importance_sentences(imps, n)
    kshot = pd.to_numeric(df.get("shots_per_class", pd.Series(dtype=float)), errors="coerce").notna().any()
    for knob in ("shots_per_class" if kshot else "data_fraction", "lora_rank"):
        if pd.to_numeric(df.get(knob, pd.Series(dtype=float)), errors="coerce").nunique() < 2:
            continue  # fixed in this study (methods.yaml fixes both): there is no trend along it to speak of
        text = saturation(df, knob)
        lines.append(text[0].upper() + text[1:] + ".")
    if n < MIN_TRIALS_FOR_TRENDS:
        lines.append(f"With only {plural(n, 'trial')}, treat every trend here as anecdotal.")
    return lines


def mixed_versions_sentences(versions: dict[str, dict[str, int]]) -> list[str]:
    """A warning for each package of :data:`NUMBER_PACKAGES` whose version differs between the sweep's runs (a sweep
    resumed or extended after an upgrade, or nodes installed apart)."""
    lines = []
    for package in NUMBER_PACKAGES:
        seen = versions.get(package, {})
        if len(seen) > 1:
            each = ", ".join(f"{v} in {plural(n, 'run')}" for v, n in sorted(seen.items()))
            lines.append(f"Its runs did not all use the same {package} ({each}), so part of any difference between "
                         f"trials may come from the software, not the knobs.")
    return lines


def software_line(versions: dict[str, dict[str, int]]) -> str:
    """``torch 2.14.1, open_clip_torch 3.3.0, ...`` as the sweep's runs recorded them (several versions joined by
    ``/``), or ``""`` for a sweep that predates the tags."""
    names = [*NUMBER_PACKAGES, *sorted(set(versions) - set(NUMBER_PACKAGES))]
    return ", ".join(f"{n} {'/'.join(sorted(versions[n]))}" for n in names if n in versions)


def model_line(rec: StudyRecords) -> str:
    """The sweep's base model and where its weights came from (as the summary says it), or "" when unrecorded."""
    return rec.sweep.base_model if rec.sweep is not None else ""


def baseline_sentence(rec: StudyRecords) -> str:
    """The baseline on the test part with the chance level of each metric."""
    b = rec.baseline
    parts = []
    for role in ("specialized", "general"):
        parts.append(f"{role} balanced accuracy {b.get(f'{role}_balanced_accuracy', math.nan):.1%} (chance "
                     f"{b.get(f'{role}_chance_balanced_accuracy', math.nan):.1%}, one over the classes) and top-1 "
                     f"{b.get(f'{role}_top1', math.nan):.1%} (chance {b.get(f'{role}_chance_top1', math.nan):.1%}, "
                     f"always answering the majority class)")
    return "The zero-shot baseline scored " + "; ".join(parts) + " on the test part."


def change_sentence(rec: StudyRecords, best: pd.Series, role: str) -> str:
    """The chosen trial's test change of the headline metric, with its paired interval and the verdict."""
    head, noun = rec.headline, "gain" if role == "specialized" else "change"
    metric = f"{role}_{head}"
    base, value = rec.baseline.get(metric, math.nan), best[metric]
    low, high = best[f"{role}_{noun}_ci_low_pts"], best[f"{role}_{noun}_ci_high_pts"]
    collapsed = best.get(f"{role}_collapsed", 0) == 1
    word = verdict((value - base), low / 100, high / 100, collapsed, noun)
    ci = f"paired 95% CI {low:+.1f} to {high:+.1f} points" if not math.isnan(low) else "no paired interval logged"
    text = (f"{role.capitalize()} {metric_words(head)}: {value:.1%} against the baseline's {base:.1%}, "
            f"{(value - base) * 100:+.1f} points ({ci}): {word}")
    if role == "specialized" and not math.isnan(best.get("specialized_mcnemar_p", math.nan)):
        adjusted = rec.adjusted.get(best["trial_id"], math.nan)
        text += (f"; McNemar p = {best['specialized_mcnemar_p']:.2g} on the top-1 errors, Holm-adjusted over "
                 f"{plural(len(rec.trials), 'trial')} p = {adjusted:.2g}")
    if collapsed:
        text += (f". It answers one class for {best.get(f'{role}_pred_majority_share', math.nan):.0%} of the "
                 f"{role} test images: a collapse, not a gain")
    other = "balanced_accuracy" if head == "top1" else "top1"  # the other metric, always beside the headline
    return text + (f" ({metric_words(other)} {best[f'{role}_{other}']:.1%} vs "
                   f"{rec.baseline.get(f'{role}_{other}', math.nan):.1%}).")


def best_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """The trial chosen on validation: its test changes, and the best point of its WiSE-FT curve."""
    metric, mode = rec.objective
    method = best.get("method") if isinstance(best.get("method"), str) else "lora"  # runs before the knob: LoRA
    rank, blocks = (pd.to_numeric(best.get(k), errors="coerce") for k in ("lora_rank", "lora_blocks"))
    how = (f" of rank {int(rank)}" if method == "lora" and rank == rank else "") + (
        f" on the last {plural(int(blocks), 'block')}" if method != "projections" and blocks == blocks else "")
    shots = pd.to_numeric(pd.Series([best.get("shots_per_class")]), errors="coerce").iloc[0]
    budget = (f"{int(shots)} shot{'' if shots == 1 else 's'} per class" if not math.isnan(shots)
              else f"data fraction {float(best['data_fraction']):.3g}")
    lines = [baseline_sentence(rec),
             f"The trial chosen on the validation part ({metric}, {mode}) was {best['trial_id']} ("
             f"{METHOD_WORDS.get(method, method)}{how}, learning rate {float(best['learning_rate']):.3g}, "
             f"{budget}, tether weight λ {float(best['tether_weight']):.3g}, the "
             f"weight of the MoCLIP term that pulls embeddings toward the frozen model's). On the test part:",
             change_sentence(rec, best, "specialized"), change_sentence(rec, best, "general"),
             *probe_sentences(rec, best)]
    lines += wiseft_sentences(rec, best)
    collapsed = rec.trials[rec.trials.get("specialized_collapsed", pd.Series(0, rec.trials.index)) == 1]
    if len(collapsed):
        lines.append(f"{plural(len(collapsed), 'trial')} collapsed, answering one class for nearly every specialized "
                     f"test image ({', '.join(collapsed['trial_id'])}): no difference of theirs is a gain.")
    return lines


def wiseft_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """The chosen trial's WiSE-FT alpha: what chose it on validation, and the test headline metric there."""
    alpha, head = best.get("wiseft_best_alpha", math.nan), rec.headline
    spec, gen = (best.get(f"wiseft_best_{role}_{head}", math.nan) for role in ("specialized", "general"))
    if math.isnan(alpha) or math.isnan(spec):
        return []
    evaluation = (rec.sweep.config.get("evaluation", {}) if rec.sweep else {})
    select = evaluation.get("wiseft_select") or f"mean_{head}"
    return [f"Scaling that trial's trained change by α (WiSE-FT; α = 0 is the baseline exactly, α = 1 the trial "
            f"above), validation chose α = {alpha:g} by {select.replace('_', ' ').replace('top1', 'top-1')}; there, test "
            f"{metric_words(head)} was specialized {spec:.1%} and general {gen:.1%}."]


def probe_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """Against the linear-probe ceiling (the baseline's probe, headline metric): how much of the distance from
    zero-shot to it the chosen trial closed, in words no stronger than its paired interval allows."""
    head, lines = rec.headline, []
    for role, noun in zip(ROLES, ("gain", "change")):
        metric, probe = f"{role}_{head}", f"{role}_{LINEAR_PROBE}{head}"
        if probe not in rec.baseline or math.isnan(best.get(metric, math.nan)):
            continue
        gain = [best.get(f"{role}_{noun}_ci_{side}_pts", math.nan) / 100 for side in ("low", "high")]
        ceiling = [rec.baseline.get(f"{probe}_ci_{side}", math.nan) for side in ("low", "high")]
        text = distance_closed(rec.baseline.get(metric, math.nan), best[metric], rec.baseline[probe], *gain, *ceiling)
        own = best.get(probe, math.nan)
        lines.append(f"Against the linear-probe ceiling ({role} {metric_words(head)}, CLIP_benchmark's protocol on "
                     f"the same frozen features): {text}"
                     + (f"; the fine-tuned model's own probe reaches {own:.1%}." if not math.isnan(own) else "."))
    return lines


def retention_sentences(df: pd.DataFrame) -> list[str]:
    """The best gain that kept the general headline metric within 2 points of the baseline, if any did."""
    front = df[pareto_mask(df)]
    keep = front[front["general_change_pts"] >= -2]
    if len(keep) and keep["specialized_gain_pts"].max() > 0:
        k = keep.loc[keep["specialized_gain_pts"].idxmax()]
        return [f"Keeping general accuracy within 2 points of the baseline, the largest specialized change was "
                f"{k['specialized_gain_pts']:+.1f} points (trial {k['trial_id']}, test part)."]
    return ["No trial raised specialized accuracy while keeping general accuracy within 2 points of the baseline."]


def reliability_sentences(rec: StudyRecords, best: pd.Series) -> list[str]:
    """Whether the chosen trial's gain interval overlaps that of the runner-up (by the same validation rule)."""
    df = rec.trials
    if len(df) < 2 or math.isnan(best["specialized_gain_ci_low_pts"]):
        return []
    runner_up = best_row(rec, rank=1)
    if runner_up["specialized_gain_ci_high_pts"] >= best["specialized_gain_ci_low_pts"]:
        return [f"The chosen trial's gain interval overlaps that of the runner-up ({runner_up['trial_id']}, "
                f"{runner_up['specialized_gain_pts']:+.1f} points): their order is not reliable."]
    return []


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
    md = [f"# Finding: {rec.experiment}", "", f"Sweep (MLflow parent run) `{rec.parent_run_id}`. Trials are chosen on "
          f"the validation part of each benchmark; every number reported is on the held-out test part. Headline "
          f"metric: {metric_words(rec.headline)}.", ""]
    if model := model_line(rec):
        md += [f"Base model: {model}.", ""]
    if software := software_line(rec.versions):
        md += [f"Software (the runs' `version.*` tags): {software}.", ""]
    md += [f"- {s}" for s in lines]
    row = headline_row(rec)
    pd.DataFrame([row]).to_csv(out / "headline.csv", index=False)
    md += ["", "## Headline", "", "The study in one row, as `python -m analysis compare` writes it beside other "
           "studies (test part, headline metric; the trial chosen on validation):", "", markdown_table([row])]
    md += ["", "## Figures", ""]
    md += [f"![{p.stem}]({p.name})\n\n*Figure {i}. {CAPTIONS.get(p.stem, p.stem)}*\n"
           for i, p in enumerate([p for p in figures if p is not None], 1)]
    if rec.wiseft == {}:
        md += ["", "_No WiSE-FT α curves were logged for this study._"]
    md += ["", "## Trials", "", _markdown_table(rec.trials), ""]
    if len(rec.excluded):
        md += ["## Left out of the fits", "", _markdown_table(rec.excluded[["trial_id", "status", "failure_reason"]]), ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    (out / "report.html").write_text(html_report(rec, lines, [p for p in figures if p is not None]))
    return path, lines


# What each figure shows, in the words of its caption (report.md and report.html)
CAPTIONS = {
    "tradeoff_map": "Trade-off map: each trial's specialized gain against its general change (test part, headline "
                    "metric, paired 95% intervals), the Pareto front marked, the baseline at the origin, and each "
                    "method's exchange rate as a line through it.",
    "accuracy_vs_intensity": "Each benchmark's accuracy against fine-tuning intensity ‖ΔW‖ (test part).",
    "marginals": "Marginal effect of each searched knob on the specialized gain and the general change.",
    "importances": "fANOVA hyperparameter importances for the specialized gain and the general change.",
    "wiseft_curves": "WiSE-FT: the Pareto-optimal trials' trained change scaled by α, in the trade-off map's "
                     "metric and units (the test part; validation for sweeps that scored only the chosen α on test).",
}


def html_report(rec: StudyRecords, lines: list[str], figures: list[Path]) -> str:
    """``report.md`` as one self-contained HTML page: the figures inline (base64 PNG), the tables scrollable,
    so that MLflow's artifact viewer shows it as it is (it renders HTML, but shows Markdown as raw text)."""
    import base64
    import html

    def table(df: pd.DataFrame) -> str:
        cols = [c for c in TABLE_COLUMNS if c in df]
        if not len(df):
            return "<p><em>none</em></p>"
        return ('<div style="overflow-x:auto">'
                + df[cols].to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="") + "</div>")

    imgs = [f'<figure><img alt="{html.escape(p.stem)}" style="max-width:100%" src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>Figure {i}. '
            f'{html.escape(CAPTIONS.get(p.stem, p.stem))}</figcaption></figure>' for i, p in enumerate(figures, 1)]
    parts = [f"<h1>Finding: {html.escape(rec.experiment)}</h1>",
             f"<p>Sweep (MLflow parent run) <code>{rec.parent_run_id}</code>. Trials are chosen on the validation part "
             f"of each benchmark; every number reported is on the held-out test part. Headline metric: "
             f"{html.escape(metric_words(rec.headline))}.</p>",
             f"<p>Base model: {html.escape(model_line(rec))}.</p>" if model_line(rec) else "",
             f"<p>Software (the runs' <code>version.*</code> tags): {html.escape(software_line(rec.versions))}.</p>"
             if rec.versions else "",
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>", "<h2>Headline</h2>",
             pd.DataFrame([cells(headline_row(rec))], columns=[h for h, _ in COLUMNS]).to_html(index=False, border=0),
             "<h2>Figures</h2>", *imgs,
             "<h2>Trials</h2>", table(rec.trials)]
    if len(rec.excluded):
        parts += ["<h2>Left out of the fits</h2>", table(rec.excluded)]
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:0.85em}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
             "figure{margin:0 0 2.5em 0;padding-bottom:1em;border-bottom:1px solid #eee}"
             "figcaption{font-style:italic;color:#555;margin-top:0.3em}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(rec.experiment)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


# The report's trial table: knobs, then the test numbers (the rest is in trials.csv).
TABLE_COLUMNS = ["trial_id", "status", "method", "learning_rate", "lora_rank", "data_fraction", "shots_per_class",
                 "tether_weight", "lora_blocks",
                 "steps", "weight_change_norm", "specialized_balanced_accuracy", "specialized_top1",
                 "general_balanced_accuracy", "general_top1", "specialized_gain_pts", "general_change_pts",
                 "collapsed", "failure_reason"]


def _markdown_table(df: pd.DataFrame) -> str:
    kshot = "shots_per_class" in df and df["shots_per_class"].notna().any()
    methods = set(df["method"].fillna("lora")) if "method" in df else {"lora"}
    shown = {"shots_per_class": kshot, "data_fraction": not kshot, "method": methods != {"lora"}}
    cols = [c for c in TABLE_COLUMNS if c in df and shown.get(c, True)]
    if not len(df):
        return "_none_"

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(rows)


def run_analysis(sweep: SweepRecord, out_root: Path, sweep_done: bool = False) -> tuple[Path, list[str]]:
    """Analyse a sweep (as :func:`study.tracking.read_sweep` read it), write everything under
    ``out_root/<experiment>/<parent run>``, and attach it to the parent run as artifacts under ``analysis/``.
    Returns the report path and the finding's sentences. ``sweep_done``: the caller knows the sweep has ended
    (``study.run`` reports before it closes the parent run), so the report does not warn that numbers may change."""
    rec = study_records(sweep)
    if sweep_done:
        rec = dataclasses.replace(rec, parent_status="FINISHED")
    out = out_root / sweep.experiment / sweep.parent_run_id
    report, lines = write_report(rec, out)
    log_report(sweep, out)
    return report, lines
