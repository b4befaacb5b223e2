"""The per-worker fine-tuning loop, in named steps, run by each Ray Train worker or by the Tune trial itself.

:func:`run_worker` reads as the story of a trial: :func:`setup` (base model, data, tether targets, the
alignment module, optimizer), :func:`restore` (from the last checkpoint, after a lost worker or node), then
per epoch :func:`train_epoch`, :func:`evaluate` (rank 0) and :func:`checkpoint_and_report` (MLflow, then the
checkpoint and the report to the session: :class:`TrainSession` or :class:`TuneSession`). A run restored
from its last epoch's checkpoint has nothing left to train and :func:`report_restored` passes that epoch's
result on again.

Data order is global: each step takes one global batch from a seeded
permutation and worker ``r`` of ``W`` takes rows ``r::W`` of it. Features are
gathered across workers with gradients (open_clip's ``ClipLoss``), so a run on
W workers computes the same loss and the same updates as a run on one.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict

from ..config import DataSection, EvaluationSection
from ..library.alignment import (apply_alignment_module, load_trainable_state, tower_is_frozen, trainable_state,
                                 unwrap, weight_change_norm)
from ..library.benchmarks import eval_sets, probe_pairs
from ..library.cache import feature_cache
from ..library.finetune import Pairs, finetune_subset
from ..library.models import load_base_model
from ..library.objective import (NonFiniteLossError, alignment_loss, autocast_for, clamp_logit_scale, lr_lambda,
                                 tether_targets)
from ..library.prefix import SuffixCLIP, SuffixEncoder, finetune_features, prefix_sets, unsupported
from ..library.probe import ProbeSettings, probe_metrics
from ..library.wiseft import wiseft_curve
from ..library.zeroshot import evaluate_sets
from ..settings import TrialSettings
from ..vocabulary import VAL, changes

__all__ = ["WorkerJob", "NonFiniteLossError", "train_fn_per_worker", "run_worker", "TrainSession", "TuneSession"]


class WorkerJob(BaseModel):
    """What a trial hands its workers: the knobs plus the study context."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    settings: TrialSettings = TrialSettings()  # the sweep's shared job holds defaults; each trial sets its own
    data: DataSection
    model_name: str
    model_pretrained: Optional[str]
    precision: str = "fp32"
    cache_dir: str
    cpus_per_worker: float = 1
    tracking_uri: Optional[str] = None
    run_id: Optional[str] = None
    baseline: dict[str, float] = {}
    baseline_predictions: dict[str, list[int]] = {}  # per benchmark, for the paired test
    evaluation: EvaluationSection = EvaluationSection()
    # Blocks per tower that no trial trains, served from the study's frozen-prefix feature stores
    # (study.library.prefix); None runs every trial on images.
    prefix_depths: Optional[dict[str, int]] = None


@dataclass
class Worker:
    """Everything one worker holds during a trial (built by :func:`setup`)."""

    job: WorkerJob
    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    pairs: Pairs                  # the trial's nested data-fraction subset, with the tether's targets
    model: torch.nn.Module        # peft-wrapped (never DDP-wrapped: its parameter names are the checkpoint's)
    initial: dict                 # trainable tensors before training (WiSE-FT, ‖ΔW‖)
    opt: torch.optim.Optimizer
    sched: Any
    steps_per_epoch: int
    global_batch: int
    autocast: Any = None          # decided once per device and precision
    scaler: Any = None
    loss_fn: Any = None
    sets: list = field(default_factory=list)  # benchmarks (rank 0 only)
    probes: list = field(default_factory=list)  # (fit, test) parts of the linear probe (rank 0, evaluation.linear_probe)
    start_epoch: int = 0
    restored_metrics: dict = field(default_factory=dict)  # what the restored checkpoint's epoch reported
    # Every epoch's result so far, by step (rank 0), kept in each checkpoint: a resumed attempt writes to MLflow
    # what the lost one had queued but not yet written when it died.
    history: dict = field(default_factory=dict)
    logger: Any = None            # rank 0's TrialLogger, when the trial has an MLflow run
    depths: Optional[dict] = None  # frozen-prefix blocks per tower, when the cache serves this trial
    net: Any = None               # what a training step calls: model, or SuffixCLIP(model); DDP-wrapped if world > 1
    memo: dict = field(default_factory=dict)  # class-prompt text prefixes, shared by every evaluation
    session: Any = None           # where it reports (a TrainSession or TuneSession)
    confusions: dict = field(default_factory=dict)  # the latest detailed evaluation's, by benchmark part

    @property
    def clip(self) -> torch.nn.Module:
        return unwrap(self.model)


def train_fn_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config["job"]`` is the trial's :class:`WorkerJob`. Fine-tunes the alignment
    module, evaluating, recording, checkpointing and reporting after every epoch (see :func:`run_worker`)."""
    run_worker(job_of(config), TrainSession(), time.time())


def run_worker(job: WorkerJob, session, started: float) -> None:
    """The worker loop, in a Ray Train worker or in the Tune trial itself (one worker), as ``session`` (a
    :class:`TrainSession` or :class:`TuneSession`) reports: setup, resume from the last checkpoint, then per
    epoch train, evaluate (rank 0), record in MLflow and report with a checkpoint.

    The first epoch this worker runs also reports ``worker_start_time`` (``started``, unix seconds),
    ``setup_seconds`` (from then until that epoch: setup, restore, distribute, open_logger) and
    ``process_start_time`` (when its process started: a Tune trial's actor, perhaps reused from an earlier
    trial, or a Train worker), so that ``bench/speed.py`` can split a trial's overhead."""
    session.quiet()
    w = setup(job, session)
    restore(w, session.checkpoint())
    distribute(w)
    w.logger = open_logger(w)
    import psutil  # a dependency of peft

    timing = {"worker_start_time": started, "setup_seconds": time.time() - started,  # first epoch only
              "process_start_time": psutil.Process().create_time()}
    try:
        for epoch in range(w.start_epoch, job.settings.epochs):
            t0 = time.time()
            metrics = train_epoch(w, epoch)
            if w.rank == 0:
                metrics.update(evaluate(w, final=epoch + 1 == job.settings.epochs))
                metrics["epoch_seconds"] = time.time() - t0
                metrics.update(timing)
                timing = {}
            checkpoint_and_report(w, epoch, metrics)
        if w.start_epoch == job.settings.epochs:
            report_restored(w)
    except BaseException:
        if w.logger:  # keep what was recorded before the failure
            w.logger.close(raise_errors=False, timeout=120)
        raise
    if w.logger and not w.logger.closed:  # e.g. a retried attempt that found every epoch already done
        w.logger.close()


class TrainSession:
    """The worker loop's session in a Ray Train worker: ``ray.train``'s context, checkpoint and report."""

    def quiet(self) -> None:
        """Ray Train logs every report with all its metrics at INFO (about 8 KB a line, through a logger named
        after its file, so ``ray.train``'s level misses it); the study prints its own progress."""
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        try:
            from ray.train.v2._internal.execution import context as train_context
        except ImportError:  # another Ray layout: its lines stay
            return
        train_context.logger.setLevel(logging.WARNING)

    def place(self) -> tuple[int, int, torch.device]:
        """(rank, world size, device) from Ray Train's context."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()

    def checkpoint(self):
        """The last reported checkpoint of this run (a retried or restored attempt), or None."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, directory: Optional[str]) -> None:
        """Report ``metrics``, with the checkpoint in ``directory`` (copied to the run's storage) if given."""
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)


class TuneSession:
    """The worker loop's session when a trial's one worker runs in the Tune trial's own process (Ray Tune's
    Function Trainable API, ``ray.tune.report``/``get_checkpoint``, ``doc/source/tune/api/trainable.rst``)."""

    def quiet(self) -> None:
        logging.getLogger("ray.train").setLevel(logging.WARNING)  # Tune's "Checkpoint successfully created"

    def place(self) -> tuple[int, int, torch.device]:
        """Rank 0 of 1, on the GPU Ray assigned (``CUDA_VISIBLE_DEVICES`` holds only it) or the CPU."""
        import ray

        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        return 0, 1, torch.device("cuda", 0) if gpu else torch.device("cpu")

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, directory: Optional[str]) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(directory) if directory else None)


def job_of(config: dict) -> WorkerJob:
    """``config["job"]``: a :class:`WorkerJob`, or one pickled by the trial driver (Train's controller, which
    holds the config, then needs none of this project's modules to unpickle it)."""
    job = config["job"]
    return WorkerJob.model_validate(pickle.loads(job) if isinstance(job, bytes) else job)


def setup(job: WorkerJob, session) -> Worker:
    """Base model, the nested data subset, the tether targets, the alignment module and its optimizer."""
    from open_clip.loss import ClipLoss

    s = job.settings
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    torch.manual_seed(s.seed)
    rank, world, device = session.place()
    lm = load_base_model(job.model_name, job.model_pretrained)
    lm.model.to(device)
    depths = cached_depths(job, lm.model)
    pairs = training_pairs(job, lm, depths, device)
    sets = eval_sets(job.data, Path(job.cache_dir), lm.preprocess,
                     validation_share=job.evaluation.validation_share) if rank == 0 else []
    probes = [x for pair in probe_pairs(sets, Path(job.cache_dir), lm.preprocess, job.data.seed,
                                        job.data.offline_scale) for x in pair] if job.evaluation.linear_probe else []
    if depths and sets:  # before LoRA is injected: the stores hold the base model's prefix
        sets, probes = (prefix_sets(lm, job.model_name, job.model_pretrained, depths, x, Path(job.cache_dir), device)
                        for x in (sets, probes))
    model = apply_alignment_module(lm.model, s)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate,
                            weight_decay=s.weight_decay)
    global_batch = min(s.batch_size, len(pairs))
    steps_per_epoch = max(1, len(pairs) // global_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup_steps, steps_per_epoch * s.epochs))
    autocast, scaler = autocast_for(device, job.precision)
    return Worker(job, rank, world, device, lm.tokenizer, pairs, model, trainable_state(model), opt, sched,
                  steps_per_epoch, global_batch, autocast, scaler,
                  ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world), sets=sets,
                  probes=list(zip(probes[::2], probes[1::2])), depths=depths, session=session)


def cached_depths(job: WorkerJob, clip: torch.nn.Module) -> Optional[dict]:
    """The frozen-prefix blocks per tower when the study's cache can serve this trial, else None: the study
    turned it off, the model does not qualify, or the trial trains a block inside the cached prefix."""
    d = job.prefix_depths
    if not d or unsupported(clip):
        return None
    from ..library.prefix import tower_depths

    s, total = job.settings, tower_depths(clip)
    return d if all(total[t] - d[t] >= s.trained_blocks for t in s.lora_towers) else None


def training_pairs(job: WorkerJob, lm, depths: Optional[dict], device) -> Pairs:
    """The trial's nested subset: prefix features and stored tether targets from the study's feature store
    (built by the driver; built here if this node lacks it), or decoded images with targets computed now."""
    from ..library.cache import model_id

    s, cache_dir = job.settings, Path(job.cache_dir)
    d, keep = finetune_subset(job.data.finetune, job.data, cache_dir, s.data_fraction, lm.preprocess, s.shots_per_class)
    if depths:
        tokens = lm.tokenizer(d["captions"])
        feats = finetune_features(lm, model_id(job.model_name, job.model_pretrained), depths, d["store"], tokens,
                                  cache_dir, device)
        return Pairs(tokens[keep], features=feats.subset(keep))
    images, tokens = d["store"].subset(keep), lm.tokenizer([d["captions"][i] for i in keep])
    teacher = tether_targets(lm.model, images, tokens, device) if s.tether_weight > 0 else (None, None)
    return Pairs(tokens, images=images, teacher=teacher)


def restore(w: Worker, checkpoint) -> None:
    """Resume from Ray Train's last checkpoint (a retried attempt after a lost worker or node), if any."""
    if not checkpoint:
        return
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True)
    load_trainable_state(w.model, state["trainable"])
    w.opt.load_state_dict(state["optimizer"])
    w.sched.load_state_dict(state["scheduler"])
    w.start_epoch = state["epoch"]  # w.initial stays setup's: the base model's tensors (checkpoints hold no copy)
    if (Path(d) / "metrics.json").exists():  # rank 0's result of that epoch (older checkpoints lack it)
        w.restored_metrics = json.loads((Path(d) / "metrics.json").read_text())
    if (Path(d) / "history.json").exists():
        w.history = {int(step): m for step, m in json.loads((Path(d) / "history.json").read_text()).items()}


def distribute(w: Worker) -> None:
    """DDP across the trial's workers (gloo on CPU, nccl on GPU); one worker just moves to its device."""
    w.model = w.model.to(w.device)
    net = SuffixCLIP(w.model, w.depths) if w.depths else w.model
    if w.world > 1:
        import ray.train.torch

        net = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": False})
    w.net = net


def open_logger(w: Worker):
    """Rank 0's MLflow logger of the trial's run (None elsewhere); a resumed attempt says where it resumed."""
    from ..tracking import TrialLogger

    if w.rank != 0 or not w.job.run_id:
        return None
    logger = TrialLogger(w.job.tracking_uri, w.job.run_id)
    if w.start_epoch:
        logger.log_resume(w.start_epoch)
        for step, metrics in sorted(w.history.items()):  # steps MLflow already holds are skipped
            logger.log_epoch(metrics, step)
    return logger


def train_epoch(w: Worker, epoch: int) -> dict:
    """One epoch of contrastive (+ tether) steps; returns the epoch's training metrics."""
    s = w.job.settings
    w.net.train()
    perm = torch.randperm(len(w.pairs), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
    total = 0.0
    for step in range(w.steps_per_epoch):
        idx = perm[step * w.global_batch:(step + 1) * w.global_batch][w.rank::w.world]
        inputs, teacher_img, teacher_txt = w.pairs.batch(idx, w.device)
        with w.autocast:
            img_f, txt_f, scale = w.net(*inputs)
            loss = alignment_loss(w.loss_fn, img_f, txt_f, scale, s.tether_weight, teacher_img, teacher_txt)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        w.opt.zero_grad(set_to_none=True)
        w.scaler.scale(loss).backward()
        w.scaler.step(w.opt)
        w.scaler.update()
        w.sched.step()
        clamp_logit_scale(w.clip.logit_scale)
        total += loss.item()
    if w.world > 1:  # each rank's tether term covers its shard only: average to the global loss
        summed = torch.tensor([total], dtype=torch.float64, device=w.device)
        torch.distributed.all_reduce(summed)
        total = summed.item() / w.world
    return {"epoch": epoch + 1, "train_loss": total / w.steps_per_epoch, "train_pairs": len(w.pairs),
            "steps": (epoch + 1) * w.steps_per_epoch}


def evaluate(w: Worker, final: bool) -> dict:
    """Zero-shot metrics (rank 0) on the validation part of every benchmark each epoch, their changes against
    the baseline and ‖ΔW‖; at the last epoch also the test part (scored once), intervals, per-class recall,
    the paired tests, and the WiSE-FT curve (alpha chosen on validation). Confusion matrices go straight to
    the trial's run."""
    job, s = w.job, w.job.settings
    t0 = time.time()
    frozen = {"frozen_image": tower_is_frozen(s, "image"), "frozen_text": tower_is_frozen(s, "text")}
    sets = w.sets if final else [x for x in w.sets if x.split == VAL]  # the test part is scored once, at the end
    encoder = SuffixEncoder(w.clip, w.depths, w.memo) if w.depths else w.clip
    cache = feature_cache(Path(job.cache_dir), job.model_name, job.model_pretrained)
    values, confusions, _ = evaluate_sets(
        encoder, w.tokenizer, sets, w.device, detailed=final, cache=cache,
        baseline_predictions=job.baseline_predictions, seed=s.seed, collapse_share=job.evaluation.collapse_share,
        **frozen)
    if final and w.probes:  # the fine-tuned model's own ceiling, as the baseline's is fitted (same data seed)
        values.update(probe_metrics(encoder, w.probes, w.device, cache=cache, frozen=frozen["frozen_image"],
                                    settings=ProbeSettings(select=job.evaluation.headline, seed=job.data.seed)))
    metrics = {**values, **changes(values, job.baseline), "weight_change_norm": weight_change_norm(w.model, w.initial)}
    if final and job.evaluation.wiseft_alphas:
        metrics.update(wiseft_curve(job.model_name, job.model_pretrained, s, trainable_state(w.model), w.initial,
                                    w.sets, w.device, job.evaluation.wiseft_alphas, job.evaluation.wiseft_metric,
                                    job.baseline, job.evaluation.collapse_share, depths=w.depths, memo=w.memo))
    metrics["eval_seconds"] = time.time() - t0
    if w.logger:
        for name, (matrix, classnames) in confusions.items():
            w.logger.log_confusion(name, matrix, classnames)
    w.confusions = confusions  # the last epoch's go into the final records' per-class table
    return metrics


def checkpoint_and_report(w: Worker, epoch: int, metrics: dict) -> None:
    """Record the epoch in MLflow (rank 0; at the last epoch everything, before Tune sees the result and may
    stop the trial), then save the checkpoint and report it (to Ray Train, or to Tune for a trial run in Tune)."""
    if w.logger:
        w.logger.log_epoch(metrics, step=epoch + 1)
        if epoch + 1 == w.job.settings.epochs:
            w.logger.log_final(w.model, metrics, w.confusions)
            w.logger.close()
    with tempfile.TemporaryDirectory() as tmp:
        if w.rank == 0:
            # Only the trained tensors and their optimizer state: the frozen rest, and the trained tensors' values
            # before training (w.initial), come back from the base model that every attempt loads.
            torch.save({"trainable": trainable_state(w.model), "optimizer": w.opt.state_dict(),
                        "scheduler": w.sched.state_dict(), "epoch": epoch + 1}, Path(tmp) / "state.pt")
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, default=float))  # numpy scalars too
            w.history[epoch + 1] = metrics
            (Path(tmp) / "history.json").write_text(json.dumps(w.history, default=float))
        w.session.report(metrics if w.rank == 0 else {}, tmp if w.rank == 0 else None)


def report_restored(w: Worker) -> None:
    """Report the restored last epoch's result again (no checkpoint: it is already stored).

    The run was interrupted after that epoch's checkpoint was stored but perhaps before Tune recorded its
    result, e.g. a Ctrl-C while it was being checkpointed. Without this report the trial would end with no
    result or a stale one (Tune then fails on the missing metric, or keeps an earlier epoch's numbers). Its
    MLflow records were all written before the checkpoint, so only the logger is closed first.
    """
    if w.logger:
        if w.restored_metrics:  # the lost attempt may have died before its final records reached MLflow
            w.logger.log_final(w.model, w.restored_metrics, only_if_missing=True)  # no per-class table
        w.logger.close()
    if w.restored_metrics:  # all ranks read the same checkpoint, so all report or none does
        w.session.report(w.restored_metrics if w.rank == 0 else {}, None)
