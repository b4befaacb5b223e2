"""Pretrain the offline default CLIP on the generated general domain, once, and cache it.

The cache key covers the model config, the pretraining settings and the data
seed, so the same settings always give the same file, and changed settings
never reuse a stale one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .benchmarks import load_spec, validation_and_test
from .cache import fingerprint, save_atomic
from .images import images_to_tensor
from .models import OFFLINE_MODEL, load_base_model, model_config
from .objective import clamp_logit_scale, lr_lambda
from .sources import load_source
from .zeroshot import evaluate_sets


# The default study's general benchmark (study.config.DataSection.general), which pretraining scores itself on.
GENERAL_BENCHMARK = "shapes"


@dataclass(frozen=True)
class PretrainSettings:
    """How the offline base model is pretrained; a study's ``model.pretrain`` section gives the first five."""

    steps: int                 # optimizer steps over the general domain
    batch_size: int            # image-caption pairs per step
    lr: float                  # AdamW peak learning rate (cosine decay, linear warmup)
    seed: int                  # seeds the data and the initialisation
    data_scale: float          # shrink the generated general domain (smoke runs)
    warmup: int = 100          # warmup steps
    weight_decay: float = 0.1


def checkpoint_path(cache_dir: Path, settings: PretrainSettings) -> Path:
    key = fingerprint(json.dumps(model_config(OFFLINE_MODEL), sort_keys=True),
                      json.dumps(asdict(settings), sort_keys=True))
    return Path(cache_dir) / "models" / f"{OFFLINE_MODEL}-{key}.pt"


def resolve_weights(name: str, pretrained: str | None, cache_dir: Path, settings: PretrainSettings) -> str | None:
    """The weights to load for model ``name``: its tag or checkpoint path ``pretrained``, or for the offline default
    (``clip-study-tiny`` with no tag) the cached checkpoint pretrained with ``settings``, pretrained first if
    missing."""
    if name == OFFLINE_MODEL and pretrained is None:
        return str(ensure_pretrained(cache_dir, settings))
    return pretrained


def ensure_pretrained(cache_dir: Path, settings: PretrainSettings) -> Path:
    """Path of the cached offline base checkpoint; pretrains it first if missing."""
    path = checkpoint_path(cache_dir, settings)
    if not path.exists():
        pretrain(path, cache_dir, settings)
    return path


def pretrain(out_path: Path, cache_dir: Path, s: PretrainSettings) -> dict:
    """Train ``clip-study-tiny`` from scratch with the CLIP loss; save its state dict to ``out_path``."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(s.seed)
    t0 = time.time()
    lm = load_base_model(OFFLINE_MODEL, None, trainable=True)
    model, tok = lm.model, lm.tokenizer
    # The general domain and its benchmark exactly as the default study configures them.
    general = load_spec(GENERAL_BENCHMARK)
    train = load_source(general.source, "train", cache_dir=cache_dir, seed=s.seed, scale=s.data_scale)
    images, _ = images_to_tensor(train, "image", lm.preprocess)
    texts = tok(train["caption"])
    sets = validation_and_test(general, "general", True, cache_dir, lm.preprocess, s.seed, s.data_scale, 0.5)
    print(f"[pretrain] {OFFLINE_MODEL}: {len(images)} pairs, {s.steps} steps of {s.batch_size} "
          f"(one-time, cached at {out_path})", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup, s.steps))
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(s.seed)
    model.train()
    order, pos = torch.randperm(len(images), generator=gen), 0
    from tqdm.auto import tqdm

    bar = tqdm(range(1, s.steps + 1), desc="[pretrain]", unit="step", disable=None)  # a bar on a terminal only
    for step in bar:
        if pos + s.batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + s.batch_size]
        pos += s.batch_size
        img_f, txt_f, scale = model(images[idx], texts[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        clamp_logit_scale(model.logit_scale)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if bar.disable and (step % max(1, s.steps // 10) == 0 or step == s.steps):  # logs get ten lines
            print(f"[pretrain] step {step}/{s.steps}  loss {loss.item():.3f}  {time.time() - t0:.0f}s", flush=True)
    values, _, _ = evaluate_sets(model, tok, sets, "cpu")
    metrics = {k.removeprefix("test/general_"): v for k, v in values.items() if k.startswith("test/general_")}
    print(f"[pretrain] done in {time.time() - t0:.0f}s: general zero-shot top-1 {metrics['top1']:.1%} (test part)", flush=True)
    save_atomic(model.state_dict(), out_path)  # a killed build never leaves a half-written cache
    out_path.with_suffix(".json").write_text(json.dumps({"settings": asdict(s), "general_zero_shot": metrics,
                                                         "seconds": time.time() - t0}, indent=2))
    return metrics
