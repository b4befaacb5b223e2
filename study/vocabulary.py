"""One vocabulary for the whole project: knob names, metric names, MLflow tags, run kinds and statuses.

The worker, tracking, the summary, the replicates and ``analysis/`` all import
their names from here, so a knob added to :class:`~study.settings.TrialSettings`
or a metric added to the worker reaches every reader at once.
"""

from __future__ import annotations

import typing

from .settings import TrialSettings

# ------------------------------------------------------------------- knobs
KNOBS: tuple[str, ...] = tuple(TrialSettings.model_fields)


def _numeric(annotation) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a in (int, float) for a in args)


#: knobs with a number as value: the ones a marginal plot or an importance can be drawn along
NUMERIC_KNOBS: tuple[str, ...] = tuple(k for k, f in TrialSettings.model_fields.items() if _numeric(f.annotation))

# ----------------------------------------------------------------- metrics
ROLES = ("specialized", "general")
SPECIALIZED_TOP1 = "specialized_top1"
GENERAL_TOP1 = "general_top1"
SPECIALIZED_GAIN = "specialized_top1_gain"      # fine-tuned minus baseline, accuracy units
GENERAL_CHANGE = "general_top1_change"
HEADLINE = (SPECIALIZED_TOP1, "specialized_balanced_accuracy", GENERAL_TOP1, "general_balanced_accuracy")
CHANGES = (SPECIALIZED_GAIN, GENERAL_CHANGE)
WISEFT_BEST = "wiseft_best_"                    # prefix: the metrics at a trial's chosen WiSE-FT alpha
WISEFT_BEST_ALPHA = "wiseft_best_alpha"
WISEFT_REPORTED = (SPECIALIZED_TOP1, GENERAL_TOP1, SPECIALIZED_GAIN, GENERAL_CHANGE, "mean_top1")
#: metrics a search objective (or ASHA) may optimise
OBJECTIVE_METRICS = HEADLINE + CHANGES + tuple(WISEFT_BEST + k for k in WISEFT_REPORTED)
#: training-side metrics every epoch reports
TRAIN_METRICS = ("train_loss", "train_pairs", "steps", "weight_change_norm", "eval_seconds", "epoch_seconds")
FINAL_PREFIX = "final/"                         # a trial's last-epoch metrics, logged once at step 0
#: metrics the replicates summarise as mean +/- sd
REPLICATED = (SPECIALIZED_TOP1, GENERAL_TOP1, SPECIALIZED_GAIN, GENERAL_CHANGE,
              WISEFT_BEST + SPECIALIZED_TOP1, WISEFT_BEST + GENERAL_TOP1)


def changes(values: dict, baseline: dict) -> dict:
    """Headline changes against the baseline, in accuracy units: ``specialized_top1_gain``, ``general_top1_change``."""
    out = {}
    for metric, change in ((SPECIALIZED_TOP1, SPECIALIZED_GAIN), (GENERAL_TOP1, GENERAL_CHANGE)):
        if metric in baseline and metric in values:
            out[change] = values[metric] - baseline[metric]
    return out


def wiseft_key(alpha: float, metric: str) -> str:
    """``wiseft/alpha_<a>/<metric>``: a metric of the model with its trained change scaled by ``alpha``."""
    return f"wiseft/alpha_{alpha:g}/{metric}"


def wiseft_curve(metrics: dict) -> list[tuple[float, float, float]]:
    """``[(alpha, specialized_top1, general_top1)]`` sorted by alpha, from a run's ``wiseft/alpha_*`` metrics."""
    out = []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "wiseft" and parts[1].startswith("alpha_") and parts[2] == SPECIALIZED_TOP1:
            alpha = float(parts[1].removeprefix("alpha_"))
            out.append((alpha, value, metrics.get(wiseft_key(alpha, GENERAL_TOP1), float("nan"))))
    return sorted(out)


# ------------------------------------------------------------- MLflow tags
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
KIND_TAG = "study.kind"
TRIAL_TAG = "study.trial_id"
STATUS_TAG = "study.status"
FAILURE_TAG = "study.failure_reason"
SWEEP_TAG = "study.sweep"
REPLICATE_OF_TAG = "study.replicate_of"

# run kinds (values of study.kind)
SWEEP, BASELINE, TRIAL, REPLICATE = "sweep", "baseline", "trial", "replicate"

# trial statuses (values of study.status)
RUNNING, FINISHED, FAILED = "RUNNING", "FINISHED", "FAILED"
ORPHANED = "ORPHANED"            # its driver died before Tune recorded the trial; kept, never fitted
EARLY_STOPPED = "EARLY_STOPPED"  # stopped by the scheduler (ASHA) before its last epoch
#: MLflow's own run status for each trial status
MLFLOW_STATUS = {RUNNING: "RUNNING", FINISHED: "FINISHED", FAILED: "FAILED", ORPHANED: "KILLED",
                 EARLY_STOPPED: "FINISHED"}

# outcome of a Tune trial as the sweep sees it
DONE, ERROR, UNFINISHED = "TERMINATED", "ERROR", "UNFINISHED"
