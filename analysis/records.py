"""Read a study back from MLflow as flat records: one row per trial, plus the baseline.

Only reads. Runs from older versions of the tool that lack a metric get NaN in
that column; nothing is recomputed and no run is modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

KNOBS = ["learning_rate", "lora_rank", "data_fraction", "tether_weight", "lora_blocks", "epochs", "batch_size",
         "lora_targets", "lora_towers", "train_projections", "train_logit_scale", "weight_decay", "seed"]
NUMERIC_KNOBS = ["learning_rate", "lora_rank", "data_fraction", "tether_weight", "lora_blocks", "epochs",
                 "batch_size", "weight_decay", "seed"]
METRICS = ["specialized_top1", "specialized_balanced_accuracy", "general_top1", "general_balanced_accuracy",
           "weight_change_norm", "steps", "train_pairs", "train_loss", "specialized_images", "general_images"]


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
    """The study's latest sweep (or ``parent_run_id``'s) as :class:`StudyRecords`."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"--experiment: no MLflow experiment named {experiment!r} at {tracking_uri}")
    if parent_run_id is None:
        sweeps = c.search_runs([exp.experiment_id], "tags.`study.kind` = 'sweep'", order_by=["start_time DESC"],
                               max_results=1)
        if not sweeps:
            raise LookupError(f"--experiment: {experiment!r} holds no sweep (parent) run")
        parent = sweeps[0]
    else:
        parent = c.get_run(parent_run_id)
    pid = parent.info.run_id
    children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'", max_results=50000)
    baseline = next((r.data.metrics for r in children if r.data.tags.get("study.kind") == "baseline"), {})
    rows, wiseft = [], {}
    for r in children:
        if r.data.tags.get("study.kind") != "trial":
            continue
        m = r.data.metrics
        row = {"trial_id": r.data.tags.get("study.trial_id", r.info.run_id[:8]), "run_id": r.info.run_id,
               "status": r.data.tags.get("study.status", r.info.status),
               "failure_reason": r.data.tags.get("study.failure_reason", "")}
        row.update({k: _num(r.data.params.get(k)) for k in KNOBS})
        row.update({k: m.get(f"final/{k}", m.get(k, math.nan)) for k in METRICS})
        for key, value in m.items():  # confidence intervals and paired tests, where the evaluator logged them
            if key.endswith(("_ci_low", "_ci_high", "_mcnemar_p")):
                row[key.removeprefix("final/")] = value
        rows.append(row)
        alphas = sorted((float(k.split("/")[1].removeprefix("alpha_")), k) for k in m if k.startswith("wiseft/alpha_")
                        and k.endswith("/specialized_top1"))
        if alphas:
            wiseft[row["trial_id"]] = [(a, m[k], m.get(k.replace("specialized", "general"), math.nan)) for a, k in alphas]
    fixed = ["trial_id", "run_id", "status", "failure_reason", *KNOBS, *METRICS]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=fixed + [c for c in df.columns if c not in fixed])  # intervals, where logged
    b_spec, b_gen = baseline.get("specialized_top1", math.nan), baseline.get("general_top1", math.nan)
    df["specialized_gain_pts"] = (df["specialized_top1"] - b_spec) * 100
    df["general_change_pts"] = (df["general_top1"] - b_gen) * 100
    df["lr_x_steps"] = pd.to_numeric(df["learning_rate"], errors="coerce") * df["steps"]
    for bench in ("specialized", "general"):
        # The trial's own bootstrap interval where it was logged; else a Wilson interval from the
        # accuracy and the number of images; else nothing.
        wilsons = [wilson(p, n) for p, n in zip(df[f"{bench}_top1"], df[f"{bench}_images"])]
        for side, i in (("low", 0), ("high", 1)):
            logged = df[f"{bench}_top1_ci_{side}"] if f"{bench}_top1_ci_{side}" in df else pd.Series(math.nan, df.index)
            df[f"{bench}_top1_ci_{side}_pct"] = logged.fillna(pd.Series([w[i] for w in wilsons], df.index)) * 100
        df[f"{bench}_ci_kind"] = [("bootstrap" if f"{bench}_top1_ci_low" in df and not math.isnan(b) else
                                   "Wilson" if not math.isnan(w[0]) else "") for b, w in
                                  zip(df.get(f"{bench}_top1_ci_low", pd.Series(math.nan, df.index)), wilsons)]
    done = df["status"].eq("FINISHED") & df["specialized_top1"].notna() & df["general_top1"].notna()
    return StudyRecords(experiment, pid, parent.info.status, baseline, df[done].reset_index(drop=True),
                        df[~done].reset_index(drop=True), wiseft)


def pareto_mask(df: pd.DataFrame, x: str = "specialized_gain_pts", y: str = "general_change_pts") -> pd.Series:
    """True for rows not dominated on (x, y), both maximised."""
    pts = list(zip(df[x], df[y]))
    return pd.Series([not any(a >= px and b >= py and (a, b) != (px, py) for a, b in pts) for px, py in pts],
                     index=df.index)
