"""What fine-tuning minimises, and how fast: the contrastive loss plus the MoCLIP tether, the LR schedule,
and the precision (autocast and grad scaler) decided once per device."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial is failed, not retried."""


def autocast_for(device: torch.device, precision: str):
    """``(autocast context, GradScaler)`` for ``precision`` (``fp32``, ``bf16``, ``fp16``) on ``device``,
    decided once (nanoGPT's pattern); fp16 on CPU falls back to fp32."""
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


def alignment_loss(clip_loss, img_f: torch.Tensor, txt_f: torch.Tensor, logit_scale: torch.Tensor,
                   tether_weight: float = 0.0, teacher_img: torch.Tensor | None = None,
                   teacher_txt: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric contrastive loss (open_clip's ``ClipLoss``, the pretraining loss, as FLYP fine-tunes)
    of normalized ``img_f``/``txt_f`` ``[B, D]``, plus ``tether_weight`` x the tether of each tower to the
    frozen model's embeddings of the same pairs."""
    loss = clip_loss(img_f, txt_f, logit_scale)
    if tether_weight > 0:
        loss = loss + tether_weight * (tether_loss(img_f, teacher_img) + tether_loss(txt_f, teacher_txt))
    return loss


def lr_lambda(warmup: int, total: int):
    """LR multiplier for ``LambdaLR``: linear warmup over ``warmup`` steps, cosine decay to 0 at ``total``."""
    return lambda k: min(1.0, (k + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(k, total) / max(1, total)))


def clamp_logit_scale(logit_scale: torch.nn.Parameter) -> None:
    """Keep the temperature in ``[0, log 100]`` after each step, as open_clip's training loop does."""
    with torch.no_grad():
        logit_scale.clamp_(0, math.log(100))


@torch.no_grad()
def tether_targets(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, device,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's normalized embeddings ``([N, D], [N, D])`` of ``images`` ``[N, 3, H, W]`` and
    ``tokens`` ``[N, L]``, on the CPU: the tether's targets, computed once per trial before training."""
    model.eval()
    img = [model.encode_image(images[i:i + batch_size].to(device), normalize=True).cpu()
           for i in range(0, len(images), batch_size)]
    txt = [model.encode_text(tokens[i:i + batch_size].to(device), normalize=True).cpu()
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(img), torch.cat(txt)
