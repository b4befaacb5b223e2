"""Read a study back from MLflow as flat records: one row per trial, plus the baseline.

Only reads. Runs from older versions of the tool that lack a metric get NaN in
that column; nothing is recomputed and no run is modified.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd

from study.selection import best_trial, holm, pareto_front
from study.vocabulary import (BASELINE, COLLAPSED_TAG, FAILURE_TAG, FINAL_METRICS, FINAL_PREFIX, FINISHED,
                              GENERAL_TOP1, KIND_TAG, KNOBS, NUMERIC_KNOBS, OBJECTIVE_METRICS, PARENT_TAG,
                              SPECIALIZED_TOP1, STATUS_TAG, SWEEP, TEST, TRAIN_METRICS, TRANSFER_NOTE_TAG, TRIAL,
                              TRIAL_TAG, VAL, VERSION_TAG, headline, key, wiseft_curve)

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
    wiseft: dict = field(default_factory=dict)  # trial_id -> [(alpha, spec, gen)] validation top-1, where logged
    headline: str = "top1"        # evaluation.headline of the sweep ("top1" for sweeps that predate it)
    objective: tuple[str, str] = (SPECIALIZED_TOP1, "max")  # the first search objective: chooses the best trial
    adjusted: dict = field(default_factory=dict)  # trial_id -> Holm-adjusted specialized McNemar p
    transfer: str = ""            # why the sweep is in-distribution transfer (its parent's note), or ""
    versions: dict = field(default_factory=dict)  # package -> {version: runs}, over the sweep's runs' version tags


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
        from mlflow.exceptions import MlflowException

        try:
            parent = c.get_run(parent_run_id)
        except MlflowException:
            raise LookupError(f"--parent-run: no run {parent_run_id!r} at {tracking_uri}") from None
        if parent.info.experiment_id != exp.experiment_id or parent.data.tags.get(KIND_TAG) != SWEEP:
            raise LookupError(f"--parent-run: run {parent_run_id!r} is not a sweep (parent) run of experiment "
                              f"{experiment!r}")
    pid = parent.info.run_id
    children = c.search_runs([exp.experiment_id], f"tags.`{PARENT_TAG}` = '{pid}'", max_results=50000)
    base_run = next((r for r in children if r.data.tags.get(KIND_TAG) == BASELINE), None)
    trials = [r for r in children if r.data.tags.get(KIND_TAG) == TRIAL]
    with ThreadPoolExecutor(8) as pool:  # one artifact read per run: overlap them for a remote server
        finals = list(pool.map(lambda r: run_metrics(c, r), [base_run, *trials] if base_run else trials))
    baseline = test_part(finals.pop(0)) if base_run else {}
    rows = [trial_row(r, m) for r, m in zip(trials, finals)]
    wiseft = {row["trial_id"]: curve for row, m in zip(rows, finals)
              if (curve := wiseft_curve(m) or wiseft_curve(m, split=""))}
    head = parent.data.params.get("evaluation.headline", "top1")
    metric, _, mode = parent.data.params.get("search.objective", f"{SPECIALIZED_TOP1}:max").split(",")[0].partition(":")
    df = with_derived_columns(pd.DataFrame(rows), baseline, head)
    done = df["status"].eq(FINISHED) & df[SPECIALIZED_TOP1].notna() & df[GENERAL_TOP1].notna()
    finished = df[done].reset_index(drop=True)
    adjusted = holm(dict(zip(finished["trial_id"], finished.get("specialized_mcnemar_p", pd.Series(dtype=float)))))
    return StudyRecords(experiment, pid, parent.info.status, baseline, finished, df[~done].reset_index(drop=True),
                        wiseft, head, (metric, mode or "max"), adjusted, parent.data.tags.get(TRANSFER_NOTE_TAG, ""),
                        run_versions([parent, *children]))


def run_versions(runs) -> dict[str, dict[str, int]]:
    """``{package: {version: number of runs}}`` from the runs' ``version.<package>`` tags (the sweep, its baseline and
    trials each record the versions they ran under); runs that predate the tags add nothing."""
    out: dict[str, dict[str, int]] = {}
    for run in runs:
        for tag, version in run.data.tags.items():
            if tag.startswith(VERSION_TAG):
                counts = out.setdefault(tag.removeprefix(VERSION_TAG), {})
                counts[version] = counts.get(version, 0) + 1
    return out


def test_part(metrics: dict) -> dict:
    """A run's test-part metrics without the ``test/`` prefix, with the metrics of no part (``steps``,
    ``weight_change_norm``, ``train_loss``...); runs that predate the split keep all theirs."""
    out = {k: v for k, v in metrics.items() if not k.startswith((f"{VAL}/", f"{TEST}/"))}
    out.update({k.removeprefix(f"{TEST}/"): v for k, v in metrics.items() if k.startswith(f"{TEST}/")})
    return out


def run_metrics(c, run) -> dict:
    """Every metric of a run's last epoch (a trial's) or its evaluation (the baseline's): its
    ``metrics/final.json`` artifact over its top-level metrics at their last step (which add what the sweep
    logged afterwards, the Holm-adjusted p-value). Sweeps that predate the artifact logged everything at the
    top level, the last epoch as ``final/<key>``: read as such. A run without final records (failed, still
    running) gives its top-level metrics."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    m = run.data.metrics
    out = {**m, **{k.removeprefix(FINAL_PREFIX): v for k, v in m.items() if k.startswith(FINAL_PREFIX)}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = c.download_artifacts(run.info.run_id, FINAL_METRICS, tmp)
            with open(path) as f:
                return {**out, **json.load(f)}
    except (MlflowException, OSError):  # no final records
        return out


def trial_row(run, last: dict) -> dict:
    """One flat record of a trial's run (``last``: its :func:`run_metrics`): ids, status, every knob, the final
    metrics and their intervals."""
    row = {"trial_id": run.data.tags.get(TRIAL_TAG, run.info.run_id[:8]), "run_id": run.info.run_id,
           "status": run.data.tags.get(STATUS_TAG, run.info.status),
           "failure_reason": run.data.tags.get(FAILURE_TAG, "")}
    row.update({k: _num(run.data.params.get(k)) for k in KNOBS})
    test = test_part(last)
    row.update({k: test.get(k, math.nan) for k in METRICS})
    row.update({f"val_{k}": last.get(key(VAL, k), last.get(k, math.nan)) for k in OBJECTIVE_METRICS})
    for name, value in test.items():  # intervals, paired tests, collapse, where the evaluator logged them
        if name.endswith(DETAIL_SUFFIXES) or name.startswith("wiseft_best_"):
            row[name] = value
    row["collapsed"] = run.data.tags.get(COLLAPSED_TAG, "")
    row["wiseft_best_alpha"] = last.get("wiseft_best_alpha", math.nan)
    return row


def with_derived_columns(df: pd.DataFrame, baseline: dict, head: str = "top1") -> pd.DataFrame:
    """Fixed column order; changes of the ``head`` metric in points against the baseline, with their paired
    intervals where logged; lr x steps; and a 95% top-1 interval per trial: its own bootstrap interval where
    logged, else a Wilson interval from the accuracy and image count."""
    fixed = ["trial_id", "run_id", "status", "failure_reason", *KNOBS, *METRICS]
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


def _records(df: pd.DataFrame) -> list[tuple[str, dict]]:
    """Rows as ``(trial_id, validation metrics)`` records for :mod:`study.selection`."""
    return [(row["trial_id"], {k: row.get(f"val_{k}", math.nan) for k in OBJECTIVE_METRICS}) for _, row in df.iterrows()]


def best_row(rec_or_df, metric: str = SPECIALIZED_TOP1, mode: str = "max") -> pd.Series:
    """The best trial's row, chosen on validation by the first objective, with the one rule the CLI summary
    uses (:func:`study.selection.best_trial`). Takes :class:`StudyRecords` (its objective) or a table."""
    if isinstance(rec_or_df, StudyRecords):
        df, (metric, mode) = rec_or_df.trials, rec_or_df.objective
    else:
        df = rec_or_df
    tid = best_trial(_records(df), metric, mode)  # val_ columns fall back to plain names for older sweeps
    return df.loc[df["trial_id"] == tid].iloc[0]


def pareto_mask(df: pd.DataFrame, x: str = "specialized_gain_pts", y: str = "general_change_pts") -> pd.Series:
    """True for the trials on the Pareto front of ``x`` vs ``y`` (test changes of the headline metric by
    default), both maximised (:func:`study.selection.pareto_front`)."""
    front = set(pareto_front([(r["trial_id"], {x: r[x], y: r[y]}) for _, r in df.iterrows()], x, y))
    return df["trial_id"].isin(front)
