"""A study's headline as one row: the report's headline table and each row of ``python -m analysis compare``.

Both build the row with :func:`headline_row` from the same :class:`~analysis.records.StudyRecords` (one read of the
sweep, :func:`study.tracking.read_sweep`), so a number in the comparison is the number in that sweep's own report.
Numbers stay unrounded in the row (CSV); :func:`cells` rounds them for Markdown and LaTeX.
"""

from __future__ import annotations

import math

import pandas as pd

from study.selection import verdict
from study.vocabulary import EXCHANGE_RATE, LINEAR_PROBE, METHOD_WORDS, NUMBER_PACKAGES, RUN_NAME_TAG, metric_words

from .records import StudyRecords, best_row


def headline_row(rec: StudyRecords) -> dict:
    """The study's row (test part, headline metric, points and percent): study and sweep, model and fine-tuning
    set, the baseline of both roles, the trial chosen on validation with its specialized gain and general change
    and their paired 95% intervals, and each method's exchange rate with its bootstrap interval and trials."""
    sweep, head = rec.sweep, rec.headline
    row = {"study": rec.experiment, "sweep": sweep.tags.get(RUN_NAME_TAG, "") if sweep else "",
           "parent_run": rec.parent_run_id, "tracking_uri": sweep.tracking_uri if sweep else "",
           "model": sweep.params.get("model.name", "") if sweep else "",
           "pretrained": (sweep.model_pretrained or "") if sweep else "",
           "finetune": sweep.params.get("data.finetune.source", "") if sweep else "", "headline": head,
           "trials": len(rec.trials)}
    for role in ("specialized", "general"):
        row[f"baseline_{role}_pct"] = 100 * rec.baseline.get(f"{role}_{head}", math.nan)
    best = best_row(rec) if len(rec.trials) else None
    row["best_trial"] = _console_label(rec, best["trial_id"]) if best is not None else ""
    row["best_method"] = best.get("method", "lora") if best is not None else ""
    for role, noun in (("specialized", "gain"), ("general", "change")):
        for suffix in ("", "_ci_low", "_ci_high"):
            row[f"{role}_{noun}{suffix}_pts"] = best[f"{role}_{noun}{suffix}_pts"] if best is not None else math.nan
        collapsed = best is not None and best.get(f"{role}_collapsed", 0) == 1
        row[f"{role}_verdict"] = verdict(row[f"{role}_{noun}_pts"], row[f"{role}_{noun}_ci_low_pts"],
                                         row[f"{role}_{noun}_ci_high_pts"], collapsed, noun) if best is not None else ""
    row.update(probe_distance(rec, best))
    for r in rec.rates:
        name = f"{EXCHANGE_RATE}[{r.method}]"
        row.update({name: r.rate, f"{name}_ci_low": r.ci_low, f"{name}_ci_high": r.ci_high, f"{name}_trials": r.trials})
    return row


def probe_distance(rec: StudyRecords, best) -> dict:
    """The specialized linear-probe ceiling (the baseline's probe, headline metric, percent) and the share of the
    distance from zero-shot to it that the chosen trial closed, with its paired 95% interval (fractions of the distance,
    computed as :func:`study.selection.distance_closed` computes them for the report's sentence). NaN where there is
    no probe or no distance (the probe not half a point above zero-shot)."""
    head = rec.headline
    probe = rec.baseline.get(f"specialized_{LINEAR_PROBE}{head}", math.nan)
    gap = probe - rec.baseline.get(f"specialized_{head}", math.nan)
    out = {"specialized_probe_pct": 100 * probe}
    for suffix in ("", "_ci_low", "_ci_high"):
        gain = best.get(f"specialized_gain{suffix}_pts", math.nan) / 100 if best is not None else math.nan
        out[f"probe_distance_closed{suffix}"] = gain / gap if gap > 0.005 else math.nan
    return out


def _closed(row: dict) -> str:
    v, low, high = (row.get(f"probe_distance_closed{s}", math.nan) for s in ("", "_ci_low", "_ci_high"))
    if math.isnan(v):
        return ""
    return f"{v:.0%} [{low:.0%}, {high:.0%}] of {row['specialized_probe_pct']:.1f}%" if not math.isnan(low) \
        else f"{v:.0%} of {row['specialized_probe_pct']:.1f}%"


def _console_label(rec: StudyRecords, trial_id: str) -> str:
    trial = next((t for t in rec.sweep.trials if t.trial_id == trial_id), None) if rec.sweep else None
    return trial.label if trial is not None else trial_id


def _pct(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.1f}%"


def _change(row: dict, stem: str) -> str:
    v, low, high = row[f"{stem}_pts"], row[f"{stem}_ci_low_pts"], row[f"{stem}_ci_high_pts"]
    if math.isnan(v):
        return ""
    return f"{v:+.1f} [{low:+.1f}, {high:+.1f}]" if not math.isnan(low) else f"{v:+.1f} (no interval)"


def exchange_words(row: dict) -> str:
    """The row's exchange rates in words, as the report writes them: ``LoRA 0.81 [0.60, 1.02]; BitFit: too few
    trials (3)``."""
    from .exchange import ExchangeRate

    methods = dict.fromkeys(k[len(EXCHANGE_RATE) + 1:].split("]")[0] for k in row if k.startswith(EXCHANGE_RATE + "["))
    return "; ".join(ExchangeRate(m, *(row[f"{EXCHANGE_RATE}[{m}]{s}"] for s in ("", "_ci_low", "_ci_high")),
                                  int(row[f"{EXCHANGE_RATE}[{m}]_trials"]), 0).words() for m in methods)


#: the rounded table's columns: (header, how a row's cell is written)
COLUMNS = [
    ("study", lambda r: r["study"] + (f" ({r['sweep']})" if r["sweep"] else "")),
    ("model", lambda r: r["model"] + (f" {r['pretrained']}" if r["pretrained"] and "/" not in r["pretrained"] else "")),
    ("fine-tuning set", lambda r: r["finetune"]),
    ("headline", lambda r: metric_words(r["headline"])),
    ("trials", lambda r: str(r["trials"])),
    ("baseline specialized", lambda r: _pct(r["baseline_specialized_pct"])),
    ("baseline general", lambda r: _pct(r["baseline_general_pct"])),
    ("best trial", lambda r: r["best_trial"] + (f" ({METHOD_WORDS.get(r['best_method'], r['best_method'])})"
                                                if r["best_method"] else "")),
    ("specialized gain, points [95% CI]", lambda r: _change(r, "specialized_gain")),
    ("general change, points [95% CI]", lambda r: _change(r, "general_change")),
    ("exchange rate, general points per specialized point [95% CI]", exchange_words),
    ("distance to the linear probe closed [95% CI] of the probe's score", _closed),
]


def cells(row: dict) -> list[str]:
    """A row's cells as the Markdown and LaTeX tables write them (rounded: one decimal, rates two)."""
    return [write(row) for _, write in COLUMNS]


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table (headers from :data:`COLUMNS`)."""
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def latex_table(rows: list[dict]) -> str:
    """The rows as one LaTeX ``tabular`` (booktabs rules; pandas escapes ``%``, ``_`` and the rest)."""
    df = pd.DataFrame([cells(r) for r in rows], columns=[h for h, _ in COLUMNS])
    return df.to_latex(index=False, escape=True, column_format="l" * 4 + "r" * 3 + "l" * 5)


def version_notes(rows: list[tuple[str, dict]]) -> list[str]:
    """A note for each package of :data:`~study.vocabulary.NUMBER_PACKAGES` on which the sweeps differ (``rows``:
    ``(study label, its SweepRecord.versions)``), naming each sweep's version(s); sweeps whose runs predate the
    ``version.*`` tags count as unknown and are named too."""
    notes = []
    for package in NUMBER_PACKAGES:
        seen = {label: sorted(versions.get(package, {})) for label, versions in rows}
        known = {v for vs in seen.values() for v in vs}
        if len(known) > 1:
            each = "; ".join(f"{label} {'/'.join(vs) if vs else 'unknown (its runs predate the version tags)'}"
                             for label, vs in seen.items())
            notes.append(f"The sweeps ran under different {package} versions ({each}), so part of any difference "
                         f"between them may come from the software, not the studies.")
    return notes
