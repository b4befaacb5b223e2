"""Read a study back from MLflow as flat records: one row per trial, plus the baseline.

Only reads. Runs from older versions of the tool that lack a metric get NaN in
that column; nothing is recomputed and no run is modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from study.selection import best_trial, pareto_front
from study.vocabulary import (BASELINE, FAILURE_TAG, FINAL_PREFIX, FINISHED, GENERAL_TOP1, KIND_TAG, KNOBS,
                              NUMERIC_KNOBS, PARENT_TAG, SPECIALIZED_TOP1, STATUS_TAG, SWEEP, TRAIN_METRICS, TRIAL,
                              TRIAL_TAG, wiseft_curve)

METRICS = [SPECIALIZED_TOP1, "specialized_balanced_accuracy", GENERAL_TOP1, "general_balanced_accuracy",
           *TRAIN_METRICS[:4], "specialized_images", "general_images"]


@dataclass
class StudyRecords:
    experiment: str
    parent_run_id: str
    parent_status: str
    baseline: dict
    trials: pd.DataFrame          # finished trials: the rows every fit and plot uses
    excluded: pd.DataFrame        # failed, orphaned, still running: counted and listed, never fitted
    wiseft: dict = field(default_factory=dict)  # trial_id -> [(alpha, spec, gen)] where logged


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def wilson(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy ``p`` measured on ``n`` images."""
    if not n or math.isnan(n) or math.isnan(p):
        return (math.nan, math.nan)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def load_study(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> StudyRecords:
    """The study's latest sweep (or ``parent_run_id``'s) as :class:`StudyRecords`. Raises ``LookupError``."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"--experiment: no MLflow experiment named {experiment!r} at {tracking_uri}")
    if parent_run_id is None:
        sweeps = c.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = '{SWEEP}'", order_by=["start_time DESC"],
                               max_results=1)
        if not sweeps:
            raise LookupError(f"--experiment: {experiment!r} holds no sweep (parent) run")
        parent = sweeps[0]
    else:
        parent = c.get_run(parent_run_id)
    pid = parent.info.run_id
    children = c.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{pid}'", max_results=50000)
    baseline = next((r.data.metrics for r in children if r.data.tags.get(KIND_TAG) == BASELINE), {})
    trials = [r for r in children if r.data.tags.get(KIND_TAG) == TRIAL]
    rows = [trial_row(r) for r in trials]
    wiseft = {row["trial_id"]: curve for row, r in zip(rows, trials) if (curve := wiseft_curve(r.data.metrics))}
    df = with_derived_columns(pd.DataFrame(rows), baseline)
    done = df["status"].eq(FINISHED) & df[SPECIALIZED_TOP1].notna() & df[GENERAL_TOP1].notna()
    return StudyRecords(experiment, pid, parent.info.status, baseline, df[done].reset_index(drop=True),
                        df[~done].reset_index(drop=True), wiseft)


def trial_row(run) -> dict:
    """One flat record of a trial's run: ids, status, every knob, the final metrics and their intervals."""
    m = run.data.metrics
    row = {"trial_id": run.data.tags.get(TRIAL_TAG, run.info.run_id[:8]), "run_id": run.info.run_id,
           "status": run.data.tags.get(STATUS_TAG, run.info.status),
           "failure_reason": run.data.tags.get(FAILURE_TAG, "")}
    row.update({k: _num(run.data.params.get(k)) for k in KNOBS})
    row.update({k: m.get(f"{FINAL_PREFIX}{k}", m.get(k, math.nan)) for k in METRICS})
    for key, value in m.items():  # confidence intervals and paired tests, where the evaluator logged them
        if key.endswith(("_ci_low", "_ci_high", "_mcnemar_p")):
            row[key.removeprefix(FINAL_PREFIX)] = value
    return row


def with_derived_columns(df: pd.DataFrame, baseline: dict) -> pd.DataFrame:
    """Fixed column order, changes in points against the baseline, lr x steps, and a 95% interval per trial:
    its own bootstrap interval where logged, else a Wilson interval from the accuracy and image count."""
    fixed = ["trial_id", "run_id", "status", "failure_reason", *KNOBS, *METRICS]
    df = df.reindex(columns=fixed + [c for c in df.columns if c not in fixed])  # intervals, where logged
    df["specialized_gain_pts"] = (df[SPECIALIZED_TOP1] - baseline.get(SPECIALIZED_TOP1, math.nan)) * 100
    df["general_change_pts"] = (df[GENERAL_TOP1] - baseline.get(GENERAL_TOP1, math.nan)) * 100
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


def _records(df: pd.DataFrame) -> list[tuple[str, dict]]:
    return [(row["trial_id"], {SPECIALIZED_TOP1: row[SPECIALIZED_TOP1], GENERAL_TOP1: row[GENERAL_TOP1]})
            for _, row in df.iterrows()]


def best_row(df: pd.DataFrame) -> pd.Series:
    """The best trial's row, by the one rule the CLI summary uses (:func:`study.selection.best_trial`)."""
    tid = best_trial(_records(df))
    return df.loc[df["trial_id"] == tid].iloc[0]


def pareto_mask(df: pd.DataFrame) -> pd.Series:
    """True for the trials on the Pareto front of specialized vs general top-1 (:func:`study.selection.pareto_front`)."""
    front = set(pareto_front(_records(df)))
    return df["trial_id"].isin(front)
