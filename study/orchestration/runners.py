"""Where a trial's training runs, chosen once per sweep by :func:`choose_runner`.

- :class:`TuneRunner`: a trial of one worker trains in its Tune trial's own process (Tune's Function Trainable
  API). There is no Train controller or worker group to start; Tune reuses the process for the next trial and
  retries a lost trial from its last checkpoint.
- :class:`TrainRunner`: a trial launches a Ray Train run of its DDP workers (a ``TorchTrainer``) named after the
  trial id, so that a retried or restored trial resumes from its own checkpoints; results reach Tune through
  ``TuneReportCallback`` (Ray's documented Train-in-Tune pattern, ``doc/source/train/doc_code/train_tune_interop.py``).

Each answers the same few questions: what a trial holds (:meth:`bundle`), whether Tune reuses its process, how many
times Tune retries it, and how it trains (:meth:`fit`). The worker loop's side of the choice is its session
(:class:`~study.orchestration.worker.TuneSession` or :class:`~study.orchestration.worker.TrainSession`).
"""

from __future__ import annotations

import os
import pickle
import time
from functools import partial
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, Field

from ..config import ResourcesSection
from .worker import TuneSession, WorkerJob, run_worker, train_fn_per_worker

# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), and only a poll
# passes a report on to Tune or notices that the run finished: at 2 s a trial's teardown waited 2-4 s for polls
# (measured: 4.3 s -> 1.0 s from the last report to the trial's end at 0.5 s). A poll is one small actor call per
# worker. Train propagates the variable to its controller and workers; a value the user set wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


class TuneRunner(BaseModel):
    """One worker, in the Tune trial's own process."""

    kind: Literal["tune"] = "tune"
    reuse_actors: ClassVar[bool] = True  # torch, open_clip and peft stay imported; the model files stay warm

    def bundle(self, resources: ResourcesSection) -> dict:
        """The trial holds its worker's CPUs (and GPU share) itself."""
        gpu = {"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}
        return {"CPU": resources.cpus_per_worker, **gpu}

    def retries(self, resources: ResourcesSection) -> int:
        """Tune's retries of a failed trial: a lost process or node, each time from its last checkpoint."""
        return resources.max_failures

    def fit(self, job: WorkerJob, resources: ResourcesSection, storage: str, trial_id: str) -> None:
        run_worker(job, TuneSession(), time.time())


class TrainRunner(BaseModel):
    """A Ray Train run of the trial's workers; the Tune trial only waits on it."""

    kind: Literal["train"] = "train"
    # A stopped trial's actor must be terminated, and with it the Train controller and the workers it owns; a
    # reused actor would keep them (and their CPUs/GPUs).
    reuse_actors: ClassVar[bool] = False

    def bundle(self, resources: ResourcesSection) -> dict:
        """No CPU (the workers hold them), pinned to the head node: losing a worker node then never kills a
        driver, and Train restarts the lost workers elsewhere."""
        return {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}

    def retries(self, resources: ResourcesSection) -> int:
        """None: the Train run already retried its lost workers (``resources.max_failures``)."""
        return 0

    def fit(self, job: WorkerJob, resources: ResourcesSection, storage: str, trial_id: str) -> None:
        """A Ray Train run of the trial's workers, named after the trial (``storage``: the sweep's Train folder)."""
        import ray.train
        from ray.tune.integration.ray_train import TuneReportCallback

        for name, value in TRAIN_ENV.items():  # this trial's own process
            os.environ.setdefault(name, value)
        trainer = trainer_class(resources)(
            train_fn_per_worker,
            # Pickled: the controller holds the config but never reads it, so it need not import this project
            # (nor torch) to unpickle it; the worker unpickles it (worker.job_of).
            train_loop_config={"job": pickle.dumps(job)},
            scaling_config=scaling_config(resources),
            run_config=ray.train.RunConfig(
                name=f"train-{trial_id}",  # deterministic: a retried driver resumes from its checkpoints
                storage_path=storage,
                callbacks=[TuneReportCallback()],
                # Lost workers or nodes: restart the worker group and resume from the last checkpoint. A
                # non-finite loss fails the same way on every retry, so it costs only those few restarts.
                failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
                # The controller's INFO lines ("Requesting resources…", "Started training worker group…") would
                # reach the study's console; its warnings and errors still do, and Train's log files keep all.
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        trainer.fit()


Runner = Annotated[Union[TuneRunner, TrainRunner], Field(discriminator="kind")]


def choose_runner(resources: ResourcesSection) -> Runner:
    """``resources.trial_runner``: ``auto`` trains a one-worker trial in its Tune trial and a multi-worker trial
    in a Ray Train run; ``ray_train`` always uses Ray Train."""
    if resources.trial_runner == "auto" and resources.workers_per_trial == 1:
        return TuneRunner()
    return TrainRunner()


def trainer_class(resources: ResourcesSection):
    """``TorchTrainer``, or for a trial of one CPU worker its base class ``DataParallelTrainer`` with the
    plain backend: one worker needs no torch process group (the worker loop uses ``torch.distributed`` only
    when it has peers), and without ``TorchConfig`` Train's controller never imports torch (about 1 s of CPU
    and 470 MB less per trial). The controller, the worker group, checkpoints and failure handling are the
    same. A GPU worker keeps ``TorchTrainer``, whose context sets each worker's CUDA device."""
    if resources.workers_per_trial == 1 and not resources.gpus_per_worker:
        from ray.train import BackendConfig
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return partial(DataParallelTrainer, backend_config=BackendConfig())
    from ray.train.torch import TorchTrainer

    return TorchTrainer


def scaling_config(resources: ResourcesSection):
    """Workers per trial and what each holds; a fractional ``gpus_per_worker`` (e.g. 0.25) packs several
    small trials onto one GPU."""
    import ray.train

    gpu = {"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}
    return ray.train.ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=resources.gpus_per_worker > 0,
                                   resources_per_worker={"CPU": resources.cpus_per_worker, **gpu})
