"""A sweep as flat records for the report: one row per trial, plus the baseline, from
:func:`study.tracking.read_sweep` (the one read of MLflow, which the end-of-run summary makes too).

Only reads. Runs from older versions of the tool that lack a metric get NaN in
that column; nothing is recomputed and no run is modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from study.selection import holm, pareto_front, ranked
from study.tracking import SweepRecord, TrialRecord, read_sweep
from study.vocabulary import (FINISHED, GENERAL_TOP1, KNOBS, LINEAR_PROBE, NUMERIC_KNOBS, OBJECTIVE_METRICS,
                              SPECIALIZED_TOP1, TEST, TRAIN_METRICS, TRANSFER_NOTE_TAG, VAL, headline, key, wiseft_curve)

from .exchange import method_rates

# Test-part metrics, in columns without the "test/" prefix (the report speaks of test numbers only).
METRICS = [SPECIALIZED_TOP1, "specialized_balanced_accuracy", GENERAL_TOP1, "general_balanced_accuracy",
           *TRAIN_METRICS[:4], "specialized_images", "general_images"]
DETAIL_SUFFIXES = ("_ci_low", "_ci_high", "_mcnemar_p", "_mcnemar_p_holm", "_collapsed", "_pred_majority_share")


@dataclass
class StudyRecords:
    experiment: str
    parent_run_id: str
    parent_status: str
    baseline: dict
    trials: pd.DataFrame          # finished trials: the rows every fit and plot uses
    excluded: pd.DataFrame        # failed, orphaned, still running: counted and listed, never fitted
    # trial_id -> [(alpha, specialized gain, general change)]: the WiSE-FT curve in points of the headline metric
    # against the baseline, on the test part (on validation for sweeps that scored only the chosen alpha on test)
    wiseft: dict = field(default_factory=dict)
    headline: str = "top1"        # evaluation.headline of the sweep ("top1" for sweeps that predate it)
    objective: tuple[str, str] = (SPECIALIZED_TOP1, "max")  # the first search objective: chooses the best trial
    adjusted: dict = field(default_factory=dict)  # trial_id -> Holm-adjusted specialized McNemar p
    transfer: str = ""            # why the sweep is in-distribution transfer (its parent's note), or ""
    versions: dict = field(default_factory=dict)  # package -> {version: runs}, over the sweep's runs' version tags
    ranking: list = field(default_factory=list)   # the finished trials' ids, best first by the one rule
    sweep: SweepRecord | None = None              # what they were read from
    wiseft_part: str = TEST                       # the part rec.wiseft's curves were scored on
    rates: list = field(default_factory=list)     # each method's exchange rate (analysis.exchange.ExchangeRate)


def wilson(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if not n or math.isnan(n) or math.isnan(p):
        return (math.nan, math.nan)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def load_study(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> StudyRecords:
    """The study's latest sweep (or ``parent_run_id``'s) as :class:`StudyRecords`. Raises ``LookupError``."""
    return study_records(read_sweep(tracking_uri, experiment, parent_run_id))


def study_records(sweep: SweepRecord) -> StudyRecords:
    """``sweep`` as flat records: a row per trial, the finished ones apart from the rest."""
    baseline = test_part(sweep.baseline)
    rows = [trial_row(t) for t in sweep.trials]
    wiseft, part = wiseft_curves(sweep.trials, sweep.baseline, sweep.headline)
    df = with_derived_columns(pd.DataFrame(rows), baseline, sweep.headline)
    done = df["status"].eq(FINISHED) & df[SPECIALIZED_TOP1].notna() & df[GENERAL_TOP1].notna()
    finished = df[done].reset_index(drop=True)
    adjusted = holm(dict(zip(finished["trial_id"], finished.get("specialized_mcnemar_p", pd.Series(dtype=float)))))
    candidates = [t for t in sweep.trials if t.trial_id in set(finished["trial_id"])]
    objective = sweep.objective
    # The one rule (study.selection), on validation: val/ metrics; sweeps before the split logged plain names.
    metric = key(VAL, objective.metric) if any(key(VAL, objective.metric) in t.metrics for t in candidates) \
        else objective.metric
    order = [t.trial_id for t in ranked(candidates, metric, objective.mode)]
    rates = method_rates(finished, {t.trial_id: t.metrics for t in candidates}, sweep.headline) if len(finished) else []
    return StudyRecords(sweep.experiment, sweep.parent_run_id, sweep.status, baseline, finished,
                        df[~done].reset_index(drop=True), wiseft, sweep.headline, (objective.metric, objective.mode),
                        adjusted, sweep.tags.get(TRANSFER_NOTE_TAG, ""), sweep.versions, order, sweep, part, rates)


def wiseft_curves(trials: list[TrialRecord], baseline: dict, head: str) -> tuple[dict, str]:
    """Each trial's WiSE-FT curve as ``[(alpha, specialized gain, general change)]`` in points of the ``head``
    metric against the ``baseline`` (its metrics by part), and the part they were scored on: the test part where
    the curves were scored there, else validation (sweeps that scored only the chosen alpha on test)."""
    spec, gen = headline("specialized", head), headline("general", head)
    for split in (TEST, VAL):
        base = [baseline.get(key(split, m), math.nan) for m in (spec, gen)]
        curves = {t.trial_id: [(a, 100 * (x - base[0]), 100 * (y - base[1])) for a, x, y in curve] for t in trials
                  if (curve := wiseft_curve(t.metrics, split, spec, gen))}
        if curves:
            return curves, split
    return {}, TEST


def short_label(t: TrialRecord) -> str:
    """How figures name a trial, as the console's and MLflow's run names start: ``t04`` (``rep 5d43d97f`` for a seed
    replicate; the id when Tune gave no count)."""
    return t.label.split(" ")[0] if t.number is not None and t.replicate_of is None else t.label


def test_part(metrics: dict) -> dict:
    """A run's test-part metrics without the ``test/`` prefix, with the metrics of no part (``steps``,
    ``weight_change_norm``, ``train_loss``...); runs that predate the split keep all theirs."""
    out = {k: v for k, v in metrics.items() if not k.startswith((f"{VAL}/", f"{TEST}/"))}
    out.update({k.removeprefix(f"{TEST}/"): v for k, v in metrics.items() if k.startswith(f"{TEST}/")})
    return out


def trial_row(t: TrialRecord) -> dict:
    """One flat record of a trial: ids, status, every knob, the final metrics and their intervals."""
    row = {"trial_id": t.trial_id, "label": short_label(t), "run_id": t.run_id, "status": t.status,
           "failure_reason": t.error}
    knobs = t.settings.model_dump() if t.settings is not None else {k: _num(t.params.get(k)) for k in KNOBS}
    row.update({k: "+".join(v) if isinstance(v, list) else v for k, v in knobs.items() if k in KNOBS})
    last, test = t.metrics, test_part(t.metrics)
    row.update({k: test.get(k, math.nan) for k in METRICS})
    row.update({f"val_{k}": last.get(key(VAL, k), last.get(k, math.nan)) for k in OBJECTIVE_METRICS})
    for name, value in test.items():  # intervals, paired tests, collapse, linear probes, where they were logged
        if "wiseft/" not in name and (name.endswith(DETAIL_SUFFIXES) or name.startswith("wiseft_best_")
                                      or LINEAR_PROBE in name):
            row[name] = value
    row["collapsed"] = t.collapsed
    row["wiseft_best_alpha"] = last.get("wiseft_best_alpha", math.nan)
    return row


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def with_derived_columns(df: pd.DataFrame, baseline: dict, head: str = "top1") -> pd.DataFrame:
    """Fixed column order; changes of the ``head`` metric in points against the baseline, with their paired
    intervals where logged; lr x steps; and a 95% top-1 interval per trial: its own bootstrap interval where
    logged, else a Wilson interval from the accuracy and image count."""
    fixed = ["trial_id", "label", "run_id", "status", "failure_reason", *KNOBS, *METRICS]
    df = df.reindex(columns=fixed + [c for c in df.columns if c not in fixed])  # intervals, where logged
    for role, name in (("specialized", "gain"), ("general", "change")):
        metric = headline(role, head)
        df[f"{role}_{name}_pts"] = (df[metric] - baseline.get(metric, math.nan)) * 100
        for side in ("low", "high"):
            logged = df.get(f"{metric}_gain_ci_{side}", pd.Series(math.nan, df.index))
            df[f"{role}_{name}_ci_{side}_pts"] = logged * 100
    df["lr_x_steps"] = pd.to_numeric(df["learning_rate"], errors="coerce") * df["steps"]
    for bench in ("specialized", "general"):
        wilsons = [wilson(p, n) for p, n in zip(df[f"{bench}_top1"], df[f"{bench}_images"])]
        logged_low = df.get(f"{bench}_top1_ci_low", pd.Series(math.nan, df.index))
        for side, i in (("low", 0), ("high", 1)):
            logged = df.get(f"{bench}_top1_ci_{side}", pd.Series(math.nan, df.index))
            df[f"{bench}_top1_ci_{side}_pct"] = logged.fillna(pd.Series([w[i] for w in wilsons], df.index)) * 100
        df[f"{bench}_ci_kind"] = [("bootstrap" if not math.isnan(b) else "Wilson" if not math.isnan(w[0]) else "")
                                  for b, w in zip(logged_low, wilsons)]
    return df


def searched_knobs(df: pd.DataFrame) -> list[str]:
    """The numeric knobs that took more than one value across ``df``'s trials: the ones the sweep searched."""
    return [k for k in NUMERIC_KNOBS if k in df and pd.to_numeric(df[k], errors="coerce").nunique() > 1]


def best_row(rec: StudyRecords, rank: int = 0) -> pd.Series:
    """The best trial's row (``rank`` 1: the runner-up), chosen on validation by the first objective with the one
    rule the summary uses (:attr:`StudyRecords.ranking`)."""
    return rec.trials.loc[rec.trials["trial_id"] == rec.ranking[rank]].iloc[0]


def pareto_mask(df: pd.DataFrame, x: str = "specialized_gain_pts", y: str = "general_change_pts") -> pd.Series:
    """True for the trials on the Pareto front of ``x`` vs ``y`` (test changes of the headline metric by
    default), both maximised (:func:`study.selection.pareto_front`)."""
    front = set(pareto_front([(r["trial_id"], {x: r[x], y: r[y]}) for _, r in df.iterrows()], x, y))
    return df["trial_id"].isin(front)
