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
# Every benchmark is split once into a validation part, which chooses (Optuna objectives, ASHA, the WiSE-FT
# alpha, the best trial), and a test part, which reports. Metric keys carry the part: "val/..." or "test/...".
VAL, TEST = "val", "test"
HEADLINES = ("balanced_accuracy", "top1")  # evaluation.headline: the metric the finding leads with
ROLES = ("specialized", "general")
SPECIALIZED_TOP1 = "specialized_top1"
GENERAL_TOP1 = "general_top1"
SPECIALIZED_GAIN = "specialized_top1_gain"      # fine-tuned minus baseline, accuracy units
GENERAL_CHANGE = "general_top1_change"
HEADLINE = (SPECIALIZED_TOP1, "specialized_balanced_accuracy", GENERAL_TOP1, "general_balanced_accuracy")
CHANGES = (SPECIALIZED_GAIN, "specialized_balanced_accuracy_gain", GENERAL_CHANGE, "general_balanced_accuracy_change")
WISEFT_BEST = "wiseft_best_"                    # prefix: the metrics at a trial's chosen WiSE-FT alpha
WISEFT_BEST_ALPHA = "wiseft_best_alpha"
WISEFT_REPORTED = HEADLINE + CHANGES + ("mean_top1", "mean_balanced_accuracy")
#: metrics a search objective (or ASHA) may optimise; the search reads them on the validation part
OBJECTIVE_METRICS = HEADLINE + CHANGES + tuple(WISEFT_BEST + k for k in WISEFT_REPORTED)
#: training-side metrics every epoch reports
TRAIN_METRICS = ("train_loss", "train_pairs", "steps", "weight_change_norm", "eval_seconds", "epoch_seconds")
#: every metric of a run's last epoch (a trial's) or of its one evaluation (the baseline's), as one JSON
#: artifact; the run's top level holds only :func:`top_level` of them, beside tables in ``metrics/``
FINAL_METRICS = "metrics/final.json"
FINAL_PREFIX = "final/"  # sweeps before metrics/final.json logged the last epoch's metrics as final/<key>
#: metrics a run holds at its top level every epoch, beside the headline metrics of each part (top_level)
EPOCH_LEVEL = TRAIN_METRICS + ("epoch", "setup_seconds", "process_start_time", "worker_start_time",
                               "resumed_from_epoch")
#: the linear-probe ceiling of each classification benchmark (test part, ``study.library.probe``): the headline keys
#: ``<role>_linear_probe_top1`` / ``_balanced_accuracy``; further benchmarks ``<role>/<name>/linear_probe_...``
LINEAR_PROBE = "linear_probe_"
PROBE_HEADLINE = tuple(f"{role}_{LINEAR_PROBE}{m}" for role in ROLES for m in HEADLINES[::-1])
#: metrics the replicates summarise as mean +/- sd
REPLICATED = HEADLINE + (SPECIALIZED_GAIN, GENERAL_CHANGE, WISEFT_BEST + SPECIALIZED_TOP1, WISEFT_BEST + GENERAL_TOP1)


def top_level(metrics: dict) -> dict:
    """The metrics a run shows at the top level of MLflow (about 40): training and timing, the headline
    metrics of both parts and their changes against the baseline, the specialized gain's 95% intervals and
    McNemar p on the test part, and the WiSE-FT alpha with the test metrics at it. The others (intervals,
    chance levels, per-class recall, the WiSE-FT curve, every further benchmark) go to the run's
    ``metrics/`` artifacts (:data:`FINAL_METRICS` and its tables)."""
    return {k: v for k, v in metrics.items() if k in TOP_LEVEL}


def key(split: str, metric: str) -> str:
    """``val/specialized_top1``: ``metric`` measured on the ``split`` part of the benchmarks."""
    return f"{split}/{metric}"


def headline(role: str, name: str) -> str:
    """``specialized_balanced_accuracy`` for role ``specialized`` and headline ``balanced_accuracy``."""
    return f"{role}_{name}"


#: The exchange rate of a fine-tuning method: general points lost per point of specialized gain, in the headline
#: metric on the test part. The least-squares slope through the baseline (every WiSE-FT curve starts there, at
#: alpha 0) of minus the general change against the specialized gain, over the method's trials and the points of
#: their WiSE-FT curves, with a bootstrap 95% interval over trials (analysis.exchange). IIMM (arXiv 2407.15731)
#: finds in-domain gain and out-of-domain loss rising together roughly linearly across methods.
EXCHANGE_RATE = "exchange_rate"
#: how the report and the figures name each fine-tuning method (``TrialSettings.method``)
METHOD_WORDS = {"lora": "LoRA", "full": "full fine-tuning", "bitfit": "BitFit", "attention": "attention-only tuning",
                "projections": "projection-only tuning"}


def metric_words(name: str) -> str:
    """How a metric is written in prose: ``top1`` -> ``top-1``, ``mean_balanced_accuracy`` -> ``mean balanced
    accuracy``."""
    return name.replace("_", " ").replace("top1", "top-1")


def change_name(metric: str) -> str:
    """``specialized_top1`` -> ``specialized_top1_gain``; ``general_top1`` -> ``general_top1_change``."""
    return metric + ("_gain" if metric.startswith("specialized") else "_change")


def changes(values: dict, baseline: dict) -> dict:
    """Changes of the headline metrics (top-1 and balanced accuracy, each role, each part) against the
    baseline, in accuracy units: ``val/specialized_top1_gain``, ``test/general_balanced_accuracy_change``..."""
    out = {}
    for k, v in values.items():
        split, _, metric = k.rpartition("/")
        if split in (VAL, TEST) and metric in HEADLINE and k in baseline:
            out[key(split, change_name(metric))] = v - baseline[k]
    return out


#: the names :func:`top_level` keeps
TOP_LEVEL = frozenset({*EPOCH_LEVEL, WISEFT_BEST_ALPHA, *(key(s, m) for s in (VAL, TEST) for m in HEADLINE + CHANGES),
                       *(key(TEST, WISEFT_BEST + m) for m in HEADLINE), key(TEST, "specialized_mcnemar_p"),
                       *(key(TEST, m) for m in PROBE_HEADLINE),
                       *(key(TEST, f"{m}_gain_ci_{side}") for m in HEADLINE[:2] for side in ("low", "high"))})


def wiseft_key(alpha: float, metric: str) -> str:
    """``val/wiseft/alpha_<a>/specialized_top1`` for ``metric`` ``val/specialized_top1``: a metric of the model
    with its trained change scaled by ``alpha``."""
    split, _, name = metric.rpartition("/")
    return f"{split}/wiseft/alpha_{alpha:g}/{name}" if split else f"wiseft/alpha_{alpha:g}/{name}"


def wiseft_curve(metrics: dict, split: str = VAL, name: str = SPECIALIZED_TOP1,
                 other: str = GENERAL_TOP1) -> list[tuple[float, float, float]]:
    """``[(alpha, specialized, general)]`` sorted by alpha, from a run's ``<split>/wiseft/alpha_*`` metrics
    (``name`` and ``other``: the two metrics read, top-1 by default)."""
    out = []
    prefix = f"{split}/wiseft/alpha_"
    for k, value in metrics.items():
        if k.startswith(prefix) and k.endswith("/" + name):
            alpha = float(k.removeprefix(prefix).split("/")[0])
            out.append((alpha, value, metrics.get(wiseft_key(alpha, key(split, other)), float("nan"))))
    return sorted(out)


# ------------------------------------------------------------- MLflow tags
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
#: with these two, MLflow's UI shows "Source: python -m study.run" and the commit on every run's page
SOURCE_TAGS = {"mlflow.source.name": "python -m study.run", "mlflow.source.type": "LOCAL"}
KIND_TAG = "study.kind"
TRIAL_TAG = "study.trial_id"
NUMBER_TAG = "study.trial_number"  # its number in the sweep, as its run name starts (t03)
STATUS_TAG = "study.status"
FAILURE_TAG = "study.failure_reason"
SWEEP_TAG = "study.sweep"
SMOKE_TAG = "study.smoke_test"  # "true" on a --smoke-test sweep: an experiment's latest sweep is another, if any
TRANSFER_TAG = "study.transfer"      # "zero-shot", or "in-distribution" (fine-tuning captions name the classes)
TRANSFER_NOTE_TAG = "study.transfer_note"  # why a study is in-distribution transfer, in one sentence
OVERLAP_METRIC = "data_overlap"      # data_overlap/<role>/<benchmark>: its images also in the fine-tuning set
COLLAPSED_TAG = "study.collapsed"    # benchmarks on which a trial's test predictions collapsed to one class
REPLICATE_OF_TAG = "study.replicate_of"
VERSION_TAG = "version."            # + a package name: the version a run ran under (version.torch: 2.14.1)
# The packages whose version can move a study's numbers: analysis says when a sweep's runs disagree on one.
NUMBER_PACKAGES = ("torch", "open_clip_torch", "peft", "optuna")

# run kinds (values of study.kind)
SWEEP, BASELINE, TRIAL, REPLICATE = "sweep", "baseline", "trial", "replicate"

# trial statuses (values of study.status)
RUNNING, FINISHED, FAILED = "RUNNING", "FINISHED", "FAILED"
ORPHANED = "ORPHANED"            # its driver died before Tune recorded the trial; kept, never fitted
EARLY_STOPPED = "EARLY_STOPPED"  # stopped by the scheduler (ASHA) before its last epoch
INTERRUPTED = "INTERRUPTED"      # cut off by Ctrl-C or SIGTERM; --resume continues it in the same run
#: MLflow's own run status for each trial status
MLFLOW_STATUS = {RUNNING: "RUNNING", FINISHED: "FINISHED", FAILED: "FAILED", ORPHANED: "KILLED",
                 EARLY_STOPPED: "FINISHED", INTERRUPTED: "KILLED"}

# outcome of a Tune trial as the sweep sees it
DONE, ERROR, UNFINISHED = "TERMINATED", "ERROR", "UNFINISHED"
