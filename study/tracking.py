"""Every MLflow write and read of a study: one experiment, a parent run per sweep, a child run per trial.

Writes: :class:`SweepRecorder` (the parent run and the baseline, the sweep's annotations and headline, its
close) and :class:`TrialLogger` (a trial's epochs and final records, from rank 0). Reads: :func:`read_sweep`,
which analysis, export and the end-of-run summary use, typed (:class:`SweepRecord`, :class:`TrialRecord`).

Every call names its run id explicitly (``MlflowClient``), so the driver, the Tune trial actors and rank 0 of
each Train run can all log without sharing MLflow's process-global "active run". The trial -> run map lives in
MLflow itself (the ``study.trial_id`` tag under the sweep's parent run), so a resumed sweep finds the run it
opened before instead of opening a duplicate.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

from .config import Objective
from .selection import best
from .settings import TrialSettings
from .vocabulary import (BASELINE, COLLAPSED_TAG, EARLY_STOPPED, FAILED, FAILURE_TAG, FINAL_METRICS, FINAL_PREFIX,
                         FINISHED, GIT_COMMIT_TAG, INTERRUPTED, KIND_TAG, MLFLOW_STATUS, NUMBER_TAG, ORPHANED,
                         OVERLAP_METRIC, PARENT_TAG, REPLICATE, REPLICATE_OF_TAG, RUN_NAME_TAG, RUNNING, SMOKE_TAG,
                         SOURCE_TAGS, SPECIALIZED_TOP1, STATUS_TAG, SWEEP, SWEEP_TAG, TEST, TRANSFER_NOTE_TAG,
                         TRANSFER_TAG, TRIAL, TRIAL_TAG, VAL, VERSION_TAG, key, top_level)

PACKAGES = ("torch", "torchvision", "open_clip_torch", "peft", "ray", "optuna", "mlflow", "datasets", "numpy",
            "pydantic")
PROJECT_DIR = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance_tags() -> dict[str, str]:
    tags = {GIT_COMMIT_TAG: git_commit(), **SOURCE_TAGS}
    tags.update({VERSION_TAG + k: v for k, v in package_versions().items()})
    return tags


def client(tracking_uri: str):
    import logging

    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3 UIs before the global "GenAI | Model training" switch open an experiment on the view its kind names;
# 3.17's follows the switch (GenAI unless chosen), so the summary links to ?workflowType=machine_learning too.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WEIGHTS_PARAM = "model.weights"  # the sweep's and the baseline's: where the base model's weights came from, in words


def ensure_experiment(c, name: str, tracking_uri: str) -> str:
    """The experiment's id, created (or restored) if needed, tagged to open on its training runs."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        for k, v in EXPERIMENT_KIND.items():
            if k not in exp.tags:  # a user's choice of view stays
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):  # keep artifacts beside the local store, wherever workers run
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def dataset_inputs(data, context_of: dict[str, str]) -> list:
    """The fine-tuning set and every benchmark of ``data`` (a ``DataSection``) as MLflow dataset inputs
    (what ``mlflow.log_input`` records): named after the spec and split, with its source (a local path, a
    Hugging Face id, or the offline generator) and a digest of its spec, ``data.seed`` and the local files'
    names, sizes and times. ``context_of`` maps ``finetune``/``specialized``/``general`` to the input's
    ``mlflow.data.context`` tag; roles left out are skipped."""
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .library import webdataset
    from .library.cache import fingerprint, source_stamp
    from .library.sources import OFFLINE_PREFIX

    def source(spec) -> tuple[str, str]:
        if spec.source.startswith(OFFLINE_PREFIX):
            return "code", json.dumps({"tags": {"generator": "study.library.synthetic",
                                                "domain": spec.source[len(OFFLINE_PREFIX):]}})
        path = Path(spec.source).expanduser()
        path = path.parent if spec.source.endswith(".tar") and not path.exists() else path  # a shard pattern's folder
        if path.exists():
            return "local", json.dumps({"uri": path.resolve().as_uri()})
        hub = webdataset.repo_id(spec.source) if spec.source.startswith(webdataset.PREFIX) else spec.source
        return "hugging_face", HuggingFaceDatasetSource(path=hub, split=spec.split,
                                                        revision=getattr(spec, "revision", None)).to_json()

    specs = [("finetune", "finetune", data.finetune)] if "finetune" in context_of else []
    specs += [(role, spec.name, spec) for role in ("specialized", "general") if role in context_of
              for spec in data.specs(role)]
    out = []
    for role, name, spec in specs:
        kind, where = source(spec)
        digest = fingerprint(spec.model_dump_json(), data.seed, source_stamp(spec.source))
        out.append(DatasetInput(Dataset(f"{name} ({spec.split})", digest, kind, where),
                                tags=[InputTag("mlflow.data.context", context_of[role])]))
    return out


def training_input(c, parent_run_id: str) -> dict | None:
    """The fine-tuning set's dataset input of a sweep's parent run (``name``, ``digest``, ``source_type``,
    ``source``), to stamp each trial's subset with (:func:`subset_input`); None if the parent has none."""
    for d in c.get_run(parent_run_id).inputs.dataset_inputs:
        if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags):
            return {k: getattr(d.dataset, k) for k in ("name", "digest", "source_type", "source")}
    return None


def subset_input(training: dict, fraction: float, shots: Optional[int] = None):
    """A trial's fine-tuning data as an MLflow dataset input: the sweep's ``training`` set (its
    :func:`training_input`) at ``data_fraction`` ``fraction`` or ``shots`` per class, a nested subset drawn with
    ``data.seed``, so its digest follows from the set's and the fraction or k."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from .library.cache import fingerprint

    name = training["name"] if fraction == 1 else f"{training['name']} f={fraction:.3g}"
    name = f"{training['name']} k={shots}" if shots is not None else name
    digest = fingerprint(training["digest"], fraction) if shots is None else fingerprint(training["digest"], "k", shots)
    return DatasetInput(Dataset(name, digest, training["source_type"],
                                training["source"]), tags=[InputTag("mlflow.data.context", "training")])


def log_dict_artifact(c, run_id: str, data, filename: str, text: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(text if text is not None else json.dumps(data, indent=2, sort_keys=True, default=str))
        c.log_artifact(run_id, str(path))


def log_metric_artifacts(c, run_id: str, metrics: dict, confusions: dict | None = None) -> None:
    """Every metric of an evaluation as ``metrics/final.json`` and its tables (per-class recall with class
    names, the intervals, the WiSE-FT curve: :func:`~study.library.zeroshot.metric_tables`) beside it. The
    JSON goes last, so a run that holds it holds the tables too (:func:`has_final_metrics`)."""
    from .library.zeroshot import metric_tables

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "metrics"
        folder.mkdir()
        for name, text in metric_tables(metrics, confusions).items():
            (folder / name).write_text(text)
        c.log_artifacts(run_id, str(folder), "metrics")
        final = Path(tmp) / Path(FINAL_METRICS).name
        final.write_text(json.dumps(metrics, indent=1, sort_keys=True, default=float))
        c.log_artifact(run_id, str(final), str(Path(FINAL_METRICS).parent))


def has_final_metrics(c, run_id: str) -> bool:
    """Whether the run holds its final records (``metrics/final.json``)."""
    return any(a.path == FINAL_METRICS for a in c.list_artifacts(run_id, str(Path(FINAL_METRICS).parent)))


def flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = ("+".join(map(str, v)) if isinstance(v, list) else str(v))[:6000]
    return out


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = c.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    for i in range(0, len(new), 100):
        c.log_batch(run_id, params=new[i:i + 100])


def find_trial_run(c, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                          f"and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=5)
    return runs[0] if runs else None


def ensure_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str,
                     params: dict, config_text: str, extra_tags: dict | None = None,
                     run_name: str | None = None, inputs: list | None = None, number: int | None = None) -> str:
    """The child run of ``trial_id``: found by tag if it exists (resume), created otherwise, named ``run_name``
    (default: the trial id), with dataset ``inputs`` (its fine-tuning subset) and its ``number`` in the sweep.

    ``extra_tags`` may mark it, e.g. a seed replicate's ``{KIND_TAG: REPLICATE, REPLICATE_OF_TAG: <trial id>}``.
    """
    c = client(tracking_uri)
    run = find_trial_run(c, experiment_id, parent_run_id, trial_id)
    if run is None:
        name = run_name or trial_id
        tags = {PARENT_TAG: parent_run_id, KIND_TAG: TRIAL, TRIAL_TAG: trial_id, RUN_NAME_TAG: name,
                STATUS_TAG: RUNNING, **provenance_tags(), **({NUMBER_TAG: str(number)} if number else {}),
                **(extra_tags or {})}
        run = c.create_run(experiment_id, tags=tags, run_name=name)
        log_params(c, run.info.run_id, flat_params(params))
        log_dict_artifact(c, run.info.run_id, None, "trial_config.json", config_text)
        if inputs:
            c.log_inputs(run.info.run_id, inputs)
    else:
        c.update_run(run.info.run_id, status=MLFLOW_STATUS[RUNNING])
        c.set_tag(run.info.run_id, STATUS_TAG, RUNNING)
    return run.info.run_id


def mark_orphans(c, experiment_id: str, parent_run_id: str, known_trials: set[str]) -> list[str]:
    """Close runs of trials the restored sweep does not know (their driver died before Tune saved them).

    They are kept, never deleted, but tagged ``study.status=ORPHANED`` so analysis skips them.
    """
    runs = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' "
                                          f"and tags.`{KIND_TAG}` = '{TRIAL}'", max_results=10000)
    orphans = [r for r in runs if r.data.tags.get(TRIAL_TAG) not in known_trials
               and r.data.tags.get(STATUS_TAG) != ORPHANED]
    for r in orphans:
        end_trial_run(c, r.info.run_id, ORPHANED,
                      reason="the sweep was killed before Tune recorded this trial; resumed without it")
    return [r.data.tags.get(TRIAL_TAG, "?") for r in orphans]


def close_stopped_runs(c, experiment_id: str, parent_run_id: str, stopped_trials: set[str]) -> list[str]:
    """Close the runs of trials the scheduler stopped (their driver was stopped mid-fit): FINISHED when the
    trial had written its final records, else ``study.status=EARLY_STOPPED``; returns the early-stopped ids."""
    runs = c.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10000)
    closed = []
    for r in runs:
        tid = r.data.tags.get(TRIAL_TAG)
        # RUNNING: killed mid-fit; FAILED: its driver saw the Train run aborted before Tune killed it.
        if tid in stopped_trials and r.data.tags.get(STATUS_TAG) in (RUNNING, FAILED):
            if FAILURE_TAG in r.data.tags:
                c.delete_tag(r.info.run_id, FAILURE_TAG)
            # A trial whose final records are all in (logged before its last report) did finish.
            complete = (has_final_metrics(c, r.info.run_id)  # or, for a sweep started by an older version:
                        or any(k.startswith(FINAL_PREFIX) for k in r.data.metrics))
            status = FINISHED if complete else EARLY_STOPPED
            c.set_tag(r.info.run_id, STATUS_TAG, status)
            c.set_terminated(r.info.run_id, status=MLFLOW_STATUS[status])
            if not complete:
                closed.append(tid)
    return closed


def end_trial_run(c, run_id: str, status: str, reason: str | None = None) -> None:
    """Close a trial's run with a study status (``vocabulary.FINISHED``, ``FAILED``, ``ORPHANED``...) and,
    for failures, the reason."""
    c.set_tag(run_id, STATUS_TAG, status)
    if reason:
        c.set_tag(run_id, FAILURE_TAG, reason[:5000])
    c.set_terminated(run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


def log_confusion(c, run_id: str, bench: str, matrix, classnames: list[str]) -> None:
    """The confusion matrix (rows: true class, columns: predicted) as ``eval/<bench>_confusion.csv``."""
    header = "true\\predicted," + ",".join(classnames)
    rows = [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(classnames, matrix)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{bench}_confusion.csv"
        path.write_text("\n".join([header, *rows]) + "\n")
        c.log_artifact(run_id, str(path), "eval")


def retrying(fn, *, what: str, timeout: float = 900.0, first_wait: float = 1.0):
    """Call ``fn`` until it succeeds or ``timeout`` seconds pass (then re-raise): rides out a tracking
    server that is restarting or briefly unreachable."""
    deadline, wait = time.monotonic() + timeout, first_wait
    while True:
        try:
            return fn()
        except Exception as exc:
            if time.monotonic() + wait > deadline:
                raise
            print(f"[mlflow] {what} failed ({type(exc).__name__}); retrying in {wait:.0f}s", flush=True)
            time.sleep(wait)
            wait = min(wait * 2, 15.0)


class TrialLogger:
    """Rank 0's view of its trial's run: per-epoch metrics, confusion matrices, final metrics, adapter.

    Writes go through a queue drained by a background thread that retries until the server answers,
    so training never waits on MLflow, and an outage of the tracking server only delays the records.
    :meth:`close` waits for the queue to drain. Steps an earlier attempt of the trial already
    recorded are never logged twice.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_timeout: float = 1800.0):
        import queue
        import threading

        self.c = client(tracking_uri)
        self.run_id = run_id
        self.flush_timeout = flush_timeout
        self.logged_steps: set[int] | None = None  # read from the run by the writer thread, before its first write
        self.error: BaseException | None = None
        self.closed = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="mlflow-trial-logger", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                retrying(item, what="MLflow logging", timeout=self.flush_timeout)
            except BaseException as exc:  # surfaced by close(); later items still get their chance
                self.error = exc
            finally:
                self._queue.task_done()

    def _recorded_steps(self) -> set[int]:
        if self.logged_steps is None:
            self.logged_steps = {m.step for m in self.c.get_metric_history(self.run_id, "train_loss")}
        return self.logged_steps

    def log_epoch(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in top_level(metrics).items()]

        def write():
            if step in self._recorded_steps():
                return
            for i in range(0, len(batch), 500):  # MLflow's per-request limit is 1000 metrics
                self.c.log_batch(self.run_id, metrics=batch[i:i + 500])
            self.logged_steps.add(step)

        self._queue.put(write)

    def log_resume(self, epoch: int) -> None:
        """A retried attempt resumed from the checkpoint of ``epoch``: metric ``resumed_from_epoch``."""
        from mlflow.entities import Metric

        metric = Metric("resumed_from_epoch", float(epoch), int(time.time() * 1000), epoch)
        self._queue.put(lambda: self.c.log_batch(self.run_id, metrics=[metric]))

    def log_confusion(self, bench: str, matrix, classnames: list[str]) -> None:
        self._queue.put(lambda: log_confusion(self.c, self.run_id, bench, matrix, classnames))

    def log_final(self, model, metrics: dict, confusions: dict | None = None, only_if_missing: bool = False) -> None:
        """The last epoch's metrics, all of them, under ``metrics/`` (:func:`log_metric_artifacts`; the top-level
        ones came with the epoch) and the adapter under ``adapter/``; ``only_if_missing``: unless the run
        already holds its final records (a resumed attempt's)."""
        from .library.alignment import save_adapter

        tmp = tempfile.mkdtemp(prefix="adapter-")
        folder = save_adapter(model, Path(tmp) / "adapter")  # now, while the weights are the final ones

        def write():
            if not (only_if_missing and has_final_metrics(self.c, self.run_id)):
                self.c.log_artifacts(self.run_id, str(folder), "adapter")
                log_metric_artifacts(self.c, self.run_id, metrics, confusions)
            shutil.rmtree(tmp, ignore_errors=True)

        self._queue.put(write)

    def close(self, raise_errors: bool = True, timeout: float | None = None) -> None:
        """Wait until every queued record reached MLflow; raise if one never did."""
        if self.closed:
            return
        self.closed = True
        self._queue.put(None)
        wait = self.flush_timeout if timeout is None else timeout
        self._thread.join(wait)
        if not raise_errors:
            return
        if self._thread.is_alive():
            raise TimeoutError(f"MLflow records of run {self.run_id} not written after {wait:.0f}s")
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------------ the sweep's own records
def sweep_label(sweep_name: str) -> str:
    """The parent run's name: ``sweep-20261129-093105`` -> ``sweep 09:31:05 2026-11-29``, the part that tells
    sweeps apart first (the runs table cuts long names)."""
    m = re.fullmatch(r"sweep-(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})(\d{2})", sweep_name)
    return f"sweep {m[4]}:{m[5]}:{m[6]} {m[1]}-{m[2]}-{m[3]}" if m else sweep_name


class SweepRecorder:
    """The sweep's own MLflow writes, beside its trials' (:class:`TrialLogger`): the parent run and the baseline at
    the start, the closing of stray trial runs, the annotations, the headline and the replicates' spread at the
    end, and the parent's close."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.c = client(tracking_uri)

    @classmethod
    def start(cls, cfg, prepared, tracking_uri: str, sweep_name: str,
              smoke: bool = False) -> tuple["SweepRecorder", str]:
        """Create the experiment, the sweep's parent run (``cfg``: the ``StudyConfig``; ``prepared``: what
        :func:`~study.orchestration.prepare.prepare` found; ``smoke``: a ``--smoke-test`` sweep, tagged
        :data:`SMOKE_TAG`) and its baseline run; returns the recorder and the baseline's run id. A failure on the
        way closes what was opened, then raises."""
        c = client(tracking_uri)
        exp_id = ensure_experiment(c, cfg.name, tracking_uri)
        tags = {KIND_TAG: SWEEP, SWEEP_TAG: sweep_name,
                TRANSFER_TAG: "in-distribution" if prepared.transfer else "zero-shot",
                **({TRANSFER_NOTE_TAG: prepared.transfer} if prepared.transfer else {}), **provenance_tags(),
                **({SMOKE_TAG: "true"} if smoke else {})}
        rec = cls(tracking_uri, exp_id, c.create_run(exp_id, tags=tags, run_name=sweep_label(sweep_name)).info.run_id)
        try:
            return rec, rec._record_start(cfg, prepared, sweep_label(sweep_name))
        except BaseException as exc:  # the sweep never started: close what was opened, then fail as before
            rec.close(130 if isinstance(exc, KeyboardInterrupt) else 1, f"{type(exc).__name__}: {exc}")
            raise

    def _record_start(self, cfg, prepared, label: str) -> str:
        """The parent run's params and artifacts, and the baseline run (closed); returns the baseline's run id."""
        import yaml
        from mlflow.entities import Metric

        from .library.models import weights_source

        c, parent = self.c, self.parent_run_id
        weights = {"model.pretrained": prepared.model_pretrained} if prepared.model_pretrained else {}
        weights[WEIGHTS_PARAM] = weights_source(cfg.model.name, cfg.model.pretrained)  # in words: where they came from
        log_params(c, parent, {"search.trials": str(cfg.search.trials), "evaluation.headline": cfg.evaluation.headline,
                               "search.objective": ",".join(f"{o.metric}:{o.mode}" for o in cfg.search.objective),
                               "search.sampler": cfg.search.sampler, "model.name": cfg.model.name, **weights,
                               "data.finetune.source": cfg.data.finetune.source,
                               "data.finetune.pairs": str(prepared.finetune_pairs)})
        log_dict_artifact(c, parent, None, CONFIG_ARTIFACT, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        log_dict_artifact(c, parent, package_versions(), "package_versions.json")
        baseline = c.create_run(self.experiment_id, tags={PARENT_TAG: parent, KIND_TAG: BASELINE, **provenance_tags()},
                                run_name=f"{BASELINE} · {label}").info.run_id
        log_params(c, baseline, {"model.name": cfg.model.name, **weights})
        inputs = dataset_inputs(cfg.data, {"finetune": "training", "specialized": "evaluation",
                                           "general": "evaluation"})  # each local source stamped once
        c.log_inputs(parent, inputs)
        c.log_inputs(baseline, [i for i in inputs if i.tags[0].value == "evaluation"])
        now = int(time.time() * 1000)
        c.log_batch(parent, metrics=[Metric(f"{OVERLAP_METRIC}/{name}", v["images"], now, 0)
                                     for name, v in prepared.overlap.items()])
        c.log_batch(baseline, metrics=[Metric(k, v, now, 0) for k, v in top_level(prepared.baseline).items()])
        log_metric_artifacts(c, baseline, prepared.baseline, prepared.baseline_confusions)
        for bench, (matrix, classnames) in prepared.baseline_confusions.items():
            log_confusion(c, baseline, bench, matrix, classnames)
        c.set_terminated(baseline)
        return baseline

    def reopen(self) -> None:
        """Mark a resumed sweep's parent run RUNNING again (an interruption closed it as KILLED)."""
        parent = self.c.get_run(self.parent_run_id)
        if parent.info.status != "RUNNING":
            self.c.update_run(self.parent_run_id, status="RUNNING")
        if FAILURE_TAG in parent.data.tags:
            self.c.delete_tag(self.parent_run_id, FAILURE_TAG)

    def training_input(self) -> dict | None:
        """The fine-tuning set's dataset input of the parent run (see :func:`training_input`)."""
        return training_input(self.c, self.parent_run_id)

    def close_strays(self, known: set[str], done: set[str]) -> tuple[list[str], list[str]]:
        """Close the runs of trials Tune never recorded (ORPHANED, ``known``: the trials it did) and of trials the
        scheduler stopped (``done``: Tune's ended trials); returns the ids of both (those early-stopped)."""
        return (mark_orphans(self.c, self.experiment_id, self.parent_run_id, known),
                close_stopped_runs(self.c, self.experiment_id, self.parent_run_id, done))

    def annotate(self, adjusted: dict[str, float], collapsed: dict[str, list[str]]) -> None:
        """Beside each trial's raw McNemar p, its Holm-adjusted one (``adjusted`` by trial id); a tag on the trials
        whose test predictions collapsed (``collapsed``: trial id -> benchmark roles)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for trial_id in adjusted.keys() | collapsed.keys():
            run = find_trial_run(self.c, self.experiment_id, self.parent_run_id, trial_id)
            if run is None:
                continue
            if trial_id in adjusted:
                self.c.log_batch(run.info.run_id, metrics=[
                    Metric(key(TEST, "specialized_mcnemar_p_holm"), adjusted[trial_id], now, 0)])
            if collapsed.get(trial_id):
                self.c.set_tag(run.info.run_id, COLLAPSED_TAG, ",".join(collapsed[trial_id]))

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics of the sweep itself on its parent run (the headline numbers, the replicates' spread), so that
        the runs table shows them on the sweep's row."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.c.log_batch(self.parent_run_id, metrics=batch[i:i + 500])

    def log_table(self, filename: str, text: str) -> None:
        """A table (CSV text) on the parent run, e.g. ``replicates.csv``."""
        log_dict_artifact(self.c, self.parent_run_id, None, filename, text)

    def close(self, code: int, reason: str) -> None:
        """Close the parent run: FINISHED for exit 0, KILLED for an interruption (130), else FAILED, with the reason
        in ``study.failure_reason``; and any child run still open (the baseline; trials cut off mid-way, as
        ``study.status=INTERRUPTED``, which ``--resume`` reopens). A tracking store that is down now only costs a
        warning: ``--resume`` closes the runs later."""
        status = {0: "FINISHED", 130: "KILLED"}.get(code, "FAILED")
        try:
            c = self.c
            children = c.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' "
                                     f"and attributes.status = 'RUNNING'", max_results=10000)
            for run in children:  # the baseline, or trials cut off mid-way (their drivers were stopped with Ray)
                if run.data.tags.get(KIND_TAG) != BASELINE:
                    end_trial_run(c, run.info.run_id, INTERRUPTED if code == 130 else FAILED)
                else:
                    c.set_terminated(run.info.run_id, status=status)
            if c.get_run(self.parent_run_id).info.status == "RUNNING":
                if reason:
                    c.set_tag(self.parent_run_id, FAILURE_TAG, reason[:5000])
                c.set_terminated(self.parent_run_id, status=status)
        except Exception as exc:  # noqa: BLE001 - closing must never hide the sweep's own outcome
            print(f"[study] warning: could not close the parent run {self.parent_run_id} as {status} "
                  f"({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------- reading a sweep
CONFIG_ARTIFACT = "study_config.yaml"  # the sweep's validated config, on its parent run


@dataclass
class TrialRecord:
    """One trial's run as recorded: its final metrics as numbers, its settings typed."""

    trial_id: str
    run_id: str
    status: str                          # study.status: FINISHED, FAILED, EARLY_STOPPED, ORPHANED, ...
    metrics: dict                        # every metric of its last epoch (run_metrics)
    settings: Optional[TrialSettings]    # from trial_config.json; None where it cannot be read
    params: dict = field(default_factory=dict)  # as logged (strings), for runs whose settings no longer validate
    number: Optional[int] = None         # its number in the sweep (t03); None before runs carried it
    replicate_of: Optional[str] = None   # a seed replicate: the trial it reruns
    error: str = ""                      # study.failure_reason
    collapsed: str = ""                  # study.collapsed

    @property
    def label(self) -> str:
        """How the console names it: ``t03 5d43d97f`` (``rep 5d43d97f`` for a seed replicate)."""
        return trial_label(self.number, self.trial_id, self.replicate_of is not None)

    @property
    def complete(self) -> bool:
        """Ran to its last epoch: finished, with test numbers (a trial stopped early has none)."""
        return self.status == FINISHED and key(TEST, SPECIALIZED_TOP1) in self.metrics


def trial_label(number: Optional[int], trial_id: str, replicate: bool = False) -> str:
    """How the console names a trial, after its MLflow run: ``t03 5d43d97f`` (``rep 5d43d97f`` for a seed
    replicate; the bare id when Tune gave no count)."""
    return f"rep {trial_id}" if replicate else f"t{number:02d} {trial_id}" if number is not None else trial_id


@dataclass
class SweepRecord:
    """A sweep as MLflow holds it: the parent run, its logged config, the baseline, its trials and replicates."""

    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    status: str                  # the parent run's MLflow status
    tags: dict
    params: dict                 # the parent run's (model.name, model.pretrained, ...)
    config: dict                 # the logged study_config.yaml ({} for sweeps that predate it)
    baseline: dict               # the baseline run's metrics (val/ and test/), {} if it has none
    trials: list[TrialRecord]    # the sweep's trials, by number
    replicates: list[TrialRecord] = field(default_factory=list)
    versions: dict = field(default_factory=dict)  # package -> {version: runs}, over the sweep's runs

    @property
    def objective(self) -> Objective:
        """The search's first objective: what chooses the best trial (on validation)."""
        objectives = self.config.get("search", {}).get("objective") or [{"metric": SPECIALIZED_TOP1}]
        return Objective.model_validate(objectives[0])

    @property
    def model_name(self) -> str:
        return self.params["model.name"]

    @property
    def model_pretrained(self) -> Optional[str]:
        """The base model's weights as the sweep resolved them (tag, file, Hub id), or None for random ones."""
        return weights_of(self.params)

    @property
    def model_weights(self) -> str:
        """Where the base model's weights came from, in words (``model.weights``; for sweeps that predate it, said
        from the resolved ``model.pretrained``)."""
        from .library.models import weights_source

        return self.params.get(WEIGHTS_PARAM) or weights_source(self.model_name, self.model_pretrained)

    @property
    def base_model(self) -> str:
        """``ViT-B-32, weights from open_clip tag laion2b_s34b_b79k: Hugging Face Hub repo laion/...``, as the summary
        and the report name the base model ("" when the sweep recorded none)."""
        return f"{self.model_name}, weights from {self.model_weights}" if "model.name" in self.params else ""

    @property
    def headline(self) -> str:
        """``evaluation.headline`` (top-1 for sweeps that predate it)."""
        return self.config.get("evaluation", {}).get("headline", "top1")

    def best(self) -> Optional[TrialRecord]:
        """The best trial that ran to its last epoch, by the first objective on validation (the one rule,
        :func:`study.selection.best`)."""
        return best([t for t in self.trials if t.complete], key(VAL, self.objective.metric), self.objective.mode)


def run_metrics(c, run) -> dict:
    """Every metric of a run's last epoch (a trial's) or its evaluation (the baseline's): its
    ``metrics/final.json`` artifact over its top-level metrics at their last step (which add what the sweep
    logged afterwards, the Holm-adjusted p-value). Sweeps that predate the artifact logged everything at the
    top level, the last epoch as ``final/<key>``: read as such. A run without final records (failed, still
    running) gives its top-level metrics."""
    m = run.data.metrics
    out = {**m, **{k.removeprefix(FINAL_PREFIX): v for k, v in m.items() if k.startswith(FINAL_PREFIX)}}
    return {**out, **(_json_artifact(c, run.info.run_id, FINAL_METRICS) or {})}


def _text_artifact(c, run_id: str, path: str) -> Optional[str]:
    """A run's text artifact, or None when the run has none."""
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(c.download_artifacts(run_id, path, tmp)).read_text()
    except (MlflowException, OSError):
        return None


def _json_artifact(c, run_id: str, path: str):
    """A run's JSON artifact, parsed, or None when the run has none (or it is not JSON)."""
    text = _text_artifact(c, run_id, path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def read_trial(c, run) -> TrialRecord:
    """A trial's (or seed replicate's) run as a :class:`TrialRecord`."""
    from pydantic import ValidationError

    tags = run.data.tags
    try:
        settings = TrialSettings.model_validate(_json_artifact(c, run.info.run_id, "trial_config.json"))
    except ValidationError:  # no config artifact, or one whose knobs this version no longer knows
        settings = None
    number = tags.get(NUMBER_TAG)
    return TrialRecord(tags.get(TRIAL_TAG, run.info.run_id[:8]), run.info.run_id, tags.get(STATUS_TAG, run.info.status),
                       run_metrics(c, run), settings, dict(run.data.params), int(number) if number else None,
                       tags.get(REPLICATE_OF_TAG), tags.get(FAILURE_TAG, ""), tags.get(COLLAPSED_TAG, ""))


def weights_of(params: dict) -> Optional[str]:
    """A sweep's (or baseline's) ``model.pretrained`` param: the resolved base weights, or None where there were
    none (absent; sweeps before 2026-12 wrote the string 'None')."""
    value = params.get("model.pretrained")
    return None if value in (None, "None") else value


def read_trial_run(tracking_uri: str, run_id: str) -> tuple[TrialRecord, str, Optional[str]]:
    """A trial's (or seed replicate's) run by id, with its sweep's model: ``(record, model name, base weights)``.
    Raises ``LookupError`` naming ``--run-id``."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise LookupError(f"--run-id: no run {run_id!r} at {tracking_uri}") from None
    if run.data.tags.get(KIND_TAG) not in (TRIAL, REPLICATE):
        raise LookupError(f"--run-id: run {run_id!r} is not a trial run (study.kind {run.data.tags.get(KIND_TAG)!r})")
    params = c.get_run(run.data.tags[PARENT_TAG]).data.params
    return read_trial(c, run), params["model.name"], weights_of(params)


def download(tracking_uri: str, run_id: str, path: str, dest: Path) -> Path:
    """A run's artifact (file or folder) ``path``, downloaded into ``dest``; returns where it landed."""
    return Path(client(tracking_uri).download_artifacts(run_id, path, str(dest)))


def log_trial_model(tracking_uri: str, run_id: str, model, register: Optional[str], pip_requirements: list[str]) -> str:
    """``model`` (a torch module) logged to the trial's run as an ``mlflow.pytorch`` model (the run's status and end
    time kept) and, with ``register``, registered under that name; returns the URI to load it by
    (``models:/NAME/<version>`` when registered)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    c = client(tracking_uri)
    run = c.get_run(run_id)
    with mlflow.start_run(run_id=run_id):
        # pickle: MLflow 3's default (pt2) traces the forward with an example input; CLIP's takes two.
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=register,
                                        serialization_format="pickle", pip_requirements=pip_requirements)
    c.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    return f"models:/{register}/{info.registered_model_version}" if register else info.model_uri


def find_sweep(c, experiment: str, parent_run_id: str | None = None):
    """The sweep's parent run: ``parent_run_id``'s, else the experiment's latest that is not a ``--smoke-test``'s
    (:data:`SMOKE_TAG`; the latest smoke test when the experiment holds nothing else). Raises ``LookupError`` naming
    the flag at fault (``--experiment``, ``--parent-run``)."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"--experiment: no MLflow experiment named {experiment!r} at {c.tracking_uri}")
    if parent_run_id is None:
        sweeps = c.search_runs([exp.experiment_id], f"tags.`{KIND_TAG}` = '{SWEEP}'", order_by=["start_time DESC"],
                               max_results=1000)
        if not sweeps:
            raise LookupError(f"--experiment: {experiment!r} holds no sweep (parent) run")
        return next((r for r in sweeps if r.data.tags.get(SMOKE_TAG) != "true"), sweeps[0])
    try:
        parent = c.get_run(parent_run_id)
    except MlflowException:
        raise LookupError(f"--parent-run: no run {parent_run_id!r} at {c.tracking_uri}") from None
    if parent.info.experiment_id != exp.experiment_id or parent.data.tags.get(KIND_TAG) != SWEEP:
        raise LookupError(f"--parent-run: run {parent_run_id!r} is not a sweep (parent) run of experiment "
                          f"{experiment!r}")
    return parent


def sweep_experiment(tracking_uri: str, parent_run_id: str) -> str:
    """The name of the experiment that holds sweep (parent) run ``parent_run_id``, for :func:`read_sweep`. Raises
    ``LookupError`` when the store has no such run, or the run is not a sweep's."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        run = c.get_run(parent_run_id)
    except MlflowException:
        raise LookupError(f"--parent-run: no run {parent_run_id!r} at {tracking_uri}") from None
    if run.data.tags.get(KIND_TAG) != SWEEP:
        raise LookupError(f"--parent-run: run {parent_run_id!r} is not a sweep (parent) run")
    return c.get_experiment(run.info.experiment_id).name


def read_sweep(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> SweepRecord:
    """The sweep (``parent_run_id``'s, else the experiment's latest) as a :class:`SweepRecord`: one read of its
    parent, baseline, trials and replicates. Only reads. Raises ``LookupError`` (see :func:`find_sweep`)."""
    import yaml

    c = client(tracking_uri)
    parent = find_sweep(c, experiment, parent_run_id)
    pid = parent.info.run_id
    children = c.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{pid}'", max_results=50000)
    base_run = next((r for r in children if r.data.tags.get(KIND_TAG) == BASELINE), None)
    runs = [r for r in children if r.data.tags.get(KIND_TAG) in (TRIAL, REPLICATE)]
    with ThreadPoolExecutor(8) as pool:  # a few small artifact reads per run: overlap them for a remote server
        trials = list(pool.map(lambda r: read_trial(c, r), runs))
        baseline = pool.submit(run_metrics, c, base_run).result() if base_run else {}
    config = _text_artifact(c, pid, CONFIG_ARTIFACT)
    by_number = sorted(trials, key=lambda t: (t.number is None, t.number or 0, t.trial_id))
    return SweepRecord(tracking_uri, experiment, parent.info.experiment_id, pid, parent.info.status, dict(parent.data.tags),
                       dict(parent.data.params), yaml.safe_load(config) if config else {}, baseline,
                       [t for t in by_number if t.replicate_of is None], [t for t in by_number if t.replicate_of],
                       run_versions([parent, *children]))


def log_report(record: SweepRecord, folder: Path) -> None:
    """The report written in ``folder`` onto the sweep's parent run under ``analysis/`` (a rerun replaces it)."""
    client(record.tracking_uri).log_artifacts(record.parent_run_id, str(folder), "analysis")


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
