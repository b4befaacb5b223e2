"""The per-worker fine-tuning loop that every Ray Train worker runs.

Data order is global: each step takes one global batch from a seeded
permutation and worker ``r`` of ``W`` takes rows ``r::W`` of it. Features are
gathered across workers with gradients (open_clip's ``ClipLoss``), so a run on
W workers computes the same loss and the same updates as a run on one.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict

from .config import DataSection, EvaluationSection, TrialSettings

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
    evaluation: EvaluationSection = EvaluationSection()


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


def gains(values: dict, baseline: dict) -> dict:
    """Headline changes against the baseline, in accuracy units."""
    out = {}
    if "specialized_top1" in baseline and "specialized_top1" in values:
        out["specialized_top1_gain"] = values["specialized_top1"] - baseline["specialized_top1"]
    if "general_top1" in baseline and "general_top1" in values:
        out["general_top1_change"] = values["general_top1"] - baseline["general_top1"]
    return out


def wiseft_curve(job: WorkerJob, trained: dict, initial: dict, sets, device) -> dict:
    """Evaluate the model with its trained change scaled by each alpha (WiSE-FT) and pick the best alpha.

    The interpolated models are built on a freshly loaded base model, so that alpha = 0 is the base
    model bit for bit (training drifts peft's merged attention weights by round-off).
    """
    from .adapters import apply_alignment_module, interpolate, load_trainable_state
    from .models import load_base_model
    from .zeroshot import evaluate_sets

    lm = load_base_model(job.model_name, job.model_pretrained)
    model = apply_alignment_module(lm.model, job.settings).to(device)
    load_trainable_state(model, trained)
    out, best = {}, None
    for alpha in job.evaluation.wiseft_alphas:
        interpolate(model, initial, trained, alpha)
        values, _, _ = evaluate_sets(model, lm.tokenizer, sets, device, seed=job.settings.seed)
        values.update(gains(values, job.baseline))
        values["mean_top1"] = (values["specialized_top1"] + values["general_top1"]) / 2
        out.update({f"wiseft/alpha_{alpha:g}/{k}": v for k, v in values.items() if not k.endswith("images")})
        if best is None or values[job.evaluation.wiseft_select] > best[1][job.evaluation.wiseft_select]:
            best = (alpha, values)
    alpha, values = best
    out["wiseft_best_alpha"] = alpha
    for k in ("specialized_top1", "general_top1", "specialized_top1_gain", "general_top1_change", "mean_top1"):
        if k in values:
            out[f"wiseft_best_{k}"] = values[k]
    return out


def train_fn_per_worker(config: dict) -> None:
    """Ray Train entry point: fine-tune the alignment module, evaluate and report each epoch."""
    import ray.train
    import ray.train.torch
    from open_clip.loss import ClipLoss

    from .adapters import (apply_alignment_module, load_trainable_state, tower_is_frozen, trainable_state, unwrap,
                           weight_change_norm)
    from .domain import eval_sets, finetune_tensors
    from .models import load_base_model
    from .prepare import feature_cache
    from .tracking import TrialLogger
    from .zeroshot import evaluate_sets

    job = WorkerJob.model_validate(config)
    s = job.settings
    # Ray Train logs every report with all its metrics at INFO; the study prints its own progress.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
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
    sets = eval_sets(job.data, cache_dir, lm.preprocess) if rank == 0 else []
    cache = feature_cache(cache_dir, job.model_name, job.model_pretrained)
    frozen = {"frozen_image": tower_is_frozen(s, "image"), "frozen_text": tower_is_frozen(s, "text")}

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

    if logger and start_epoch:  # a retried attempt (worker or node lost): say where it resumed
        logger.log_resume(start_epoch)
    try:
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
            if rank == 0:
                final = epoch + 1 == s.epochs
                t_eval = time.time()
                # At the last epoch: intervals, per-class recall and the paired test against the baseline.
                values, confusions, _ = evaluate_sets(clip, lm.tokenizer, sets, device, detailed=final, cache=cache,
                                                      baseline_predictions=job.baseline_predictions, seed=s.seed, **frozen)
                metrics.update(values)
                metrics.update(gains(values, job.baseline))
                metrics["weight_change_norm"] = weight_change_norm(model, initial)
                if final and job.evaluation.wiseft_alphas:
                    metrics.update(wiseft_curve(job, trainable_state(model), initial, sets, device))
                metrics["eval_seconds"] = time.time() - t_eval
                metrics["epoch_seconds"] = time.time() - t0
                if logger:
                    logger.log_epoch(metrics, step=epoch + 1)
                    for name, (matrix, classnames) in confusions.items():
                        logger.log_confusion(name, matrix, classnames)
                    if final:  # everything in MLflow before Tune sees the last result (and may stop the trial)
                        logger.log_final(model, metrics)
                        logger.close()
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    torch.save({"trainable": trainable_state(model), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "epoch": epoch + 1, "initial": initial},
                               Path(tmp) / "state.pt")
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics if rank == 0 else {}, checkpoint=ckpt)
    except BaseException:
        if logger:  # keep what was recorded before the failure
            logger.close(raise_errors=False, timeout=120)
        raise
    if logger and not logger.closed:  # e.g. a retried attempt that found every epoch already done
        logger.close()
