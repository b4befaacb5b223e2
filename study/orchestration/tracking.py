"""MLflow layout of a study: one experiment, a parent run per sweep, a child run per trial.

Every call names its run id explicitly (``MlflowClient``), so the driver, the
Tune trial actors and rank 0 of each Train run can all log without sharing
MLflow's process-global "active run". The trial -> run map lives in MLflow
itself (the ``study.trial_id`` tag under the sweep's parent run), so a resumed
sweep finds the run it opened before instead of opening a duplicate.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

from ..vocabulary import (FAILURE_TAG, FINAL_METRICS, FINAL_PREFIX, FINISHED, GIT_COMMIT_TAG, KIND_TAG, MLFLOW_STATUS,
                          ORPHANED, PARENT_TAG, RUN_NAME_TAG, RUNNING, SOURCE_TAGS, STATUS_TAG, TRIAL, TRIAL_TAG,
                          VERSION_TAG, EARLY_STOPPED, FAILED, top_level)

PACKAGES = ("torch", "torchvision", "open_clip_torch", "peft", "ray", "optuna", "mlflow", "datasets", "numpy",
            "pydantic")
PROJECT_DIR = Path(__file__).resolve().parent.parent.parent


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

    from ..library.cache import fingerprint, source_stamp
    from ..library.sources import OFFLINE_PREFIX

    def source(spec) -> tuple[str, str]:
        if spec.source.startswith(OFFLINE_PREFIX):
            return "code", json.dumps({"tags": {"generator": "study.library.synthetic",
                                                "domain": spec.source[len(OFFLINE_PREFIX):]}})
        path = Path(spec.source).expanduser()
        if path.exists():
            return "local", json.dumps({"uri": path.resolve().as_uri()})
        return "hugging_face", HuggingFaceDatasetSource(path=spec.source, split=spec.split,
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


def subset_input(training: dict, fraction: float):
    """A trial's fine-tuning data as an MLflow dataset input: the sweep's ``training`` set (its
    :func:`training_input`) at ``data_fraction`` ``fraction``, a nested subset drawn with ``data.seed``, so
    its digest follows from the set's and the fraction."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from ..library.cache import fingerprint

    name = training["name"] if fraction == 1 else f"{training['name']} f={fraction:.3g}"
    return DatasetInput(Dataset(name, fingerprint(training["digest"], fraction), training["source_type"],
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
    from ..library.zeroshot import metric_tables

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
                     run_name: str | None = None, inputs: list | None = None) -> str:
    """The child run of ``trial_id``: found by tag if it exists (resume), created otherwise, named ``run_name``
    (default: the trial id), with dataset ``inputs`` (its fine-tuning subset).

    ``extra_tags`` may mark it, e.g. a seed replicate's ``{KIND_TAG: REPLICATE, REPLICATE_OF_TAG: <trial id>}``.
    """
    c = client(tracking_uri)
    run = find_trial_run(c, experiment_id, parent_run_id, trial_id)
    if run is None:
        name = run_name or trial_id
        tags = {PARENT_TAG: parent_run_id, KIND_TAG: TRIAL, TRIAL_TAG: trial_id, RUN_NAME_TAG: name,
                STATUS_TAG: RUNNING, **provenance_tags(), **(extra_tags or {})}
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
        from ..library.alignment import save_adapter

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
