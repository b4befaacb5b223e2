"""The per-worker fine-tuning loop that every Ray Train worker runs.

Data order is global: each step takes one global batch from a seeded
permutation and worker ``r`` of ``W`` takes rows ``r::W`` of it. Features are
gathered across workers with gradients (open_clip's ``ClipLoss``), so a run on
W workers computes the same loss and the same updates as a run on one.
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict

from .config import DataSection, TrialSettings

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial is failed, not retried."""


class WorkerJob(BaseModel):
    """What a trial hands its workers: the knobs plus the study context."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    settings: TrialSettings
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


def autocast_for(device: torch.device, precision: str):
    """Decide the autocast context and grad scaler once (nanoGPT style)."""
    dtype = PRECISIONS[precision]
    if dtype is None or (device.type == "cpu" and dtype == torch.float16):
        return nullcontext(), torch.amp.GradScaler(enabled=False)
    return (torch.autocast(device_type=device.type, dtype=dtype),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def tether_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MoCLIP's tether: mean over the batch of ``||student - teacher||^2`` for normalized ``[B, D]`` embeddings.

    Summed over the embedding dimension (it equals ``2 - 2 cos``), so a weight near 1 means the same
    thing for a 64-d and a 1024-d model; an element-wise mean would shrink it by the dimension.
    """
    return (student.float() - teacher.float()).pow(2).sum(dim=-1).mean()


def lr_lambda(warmup: int, total: int):
    return lambda k: min(1.0, (k + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(k, total) / max(1, total)))


def train_fn_per_worker(config: dict) -> None:
    """Ray Train entry point: fine-tune the alignment module, evaluate and report each epoch."""
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss

    from .adapters import apply_alignment_module, load_trainable_state, trainable_state, unwrap, weight_change_norm
    from .domain import benchmark, finetune_tensors
    from .models import load_base_model
    from .tracking import TrialLogger
    from .zeroshot import accuracy_metrics, detailed_metrics, zero_shot_logits

    job = WorkerJob.model_validate(config)
    s = job.settings
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    torch.manual_seed(s.seed)
    device = ray.train.torch.get_device()
    cache_dir = Path(job.cache_dir)

    lm = load_base_model(job.model_name, job.model_pretrained)
    base = lm.model.to(device)
    images, tokens = finetune_tensors(job.data.finetune, job.data, cache_dir, s.data_fraction, lm.preprocess, lm.tokenizer)
    with torch.no_grad():  # the tether's targets: the frozen model's embeddings of each pair
        base.eval()
        teacher_img = torch.cat([base.encode_image(images[i:i + 256].to(device), normalize=True).cpu()
                                 for i in range(0, len(images), 256)])
        teacher_txt = torch.cat([base.encode_text(tokens[i:i + 256].to(device), normalize=True).cpu()
                                 for i in range(0, len(tokens), 256)])
    benches = ([benchmark(job.data.specialized, job.data, cache_dir, lm.preprocess, "specialized"),
                benchmark(job.data.general, job.data, cache_dir, lm.preprocess, "general")] if rank == 0 else [])

    model = apply_alignment_module(base, s)
    initial = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    global_batch = min(s.batch_size, len(images))
    steps_per_epoch = max(1, len(images) // global_batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup_steps, steps_per_epoch * s.epochs))
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        load_trainable_state(model, state["trainable"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        initial = state["initial"]

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world > 1 else model.to(device)
    autocast, scaler = autocast_for(device, job.precision)
    loss_fn = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)
    logger = TrialLogger(job.tracking_uri, job.run_id) if rank == 0 and job.run_id else None
    clip = unwrap(model)

    metrics = None
    for epoch in range(start_epoch, s.epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
        total = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * global_batch:(step + 1) * global_batch][rank::world]
            img, txt = images[idx].to(device), tokens[idx].to(device)
            with autocast:
                img_f, txt_f, scale = model(img, txt)
                loss = loss_fn(img_f, txt_f, scale)
                if s.tether_weight > 0:
                    loss = loss + s.tether_weight * (tether_loss(img_f, teacher_img[idx].to(device))
                                                     + tether_loss(txt_f, teacher_txt[idx].to(device)))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            with torch.no_grad():  # as in open_clip's training loop
                clip.logit_scale.clamp_(0, math.log(100))
            total += loss.item()

        if world > 1:  # each rank's tether term covers its shard only: average to the global loss
            summed = torch.tensor([total], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(summed)
            total = summed.item() / world
        metrics = {"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "train_pairs": len(images),
                   "steps": (epoch + 1) * steps_per_epoch}
        confusions = {}
        if rank == 0:
            final = epoch + 1 == s.epochs
            for bench in benches:
                logits = zero_shot_logits(clip, lm.tokenizer, bench, device)
                if final:  # intervals, per-class recall and the paired test vs the baseline, once
                    values, confusions[bench.name] = detailed_metrics(
                        logits, bench.labels, job.baseline_predictions.get(bench.name), seed=s.seed)
                else:
                    values = accuracy_metrics(logits, bench.labels)
                metrics.update({f"{bench.name}_{key}": value for key, value in values.items()})
                metrics[f"{bench.name}_images"] = len(bench.labels)
            if "specialized_top1" in job.baseline:
                metrics["specialized_top1_gain"] = metrics["specialized_top1"] - job.baseline["specialized_top1"]
                metrics["general_top1_change"] = metrics["general_top1"] - job.baseline["general_top1"]
            metrics["weight_change_norm"] = weight_change_norm(model, initial)
            metrics["epoch_seconds"] = time.time() - t0
            if logger:
                logger.log_epoch(metrics, step=epoch + 1)
                for name, matrix in confusions.items():
                    logger.log_confusion(name, matrix, next(b.classnames for b in benches if b.name == name))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"trainable": trainable_state(model), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch + 1, "initial": initial},
                           Path(tmp) / "state.pt")
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics if rank == 0 else {}, checkpoint=ckpt)
    if logger and metrics is not None:
        logger.log_final(model, metrics)
