"""The linear-probe ceiling: what the same frozen image features reach with labels, the upper end that a zero-shot
number and its gain are read against.

The protocol is CLIP_benchmark's (``clip_benchmark/metrics/linear_probe.py``, after CLIP's appendix A.3, Radford et
al. 2021), run on CPU or GPU alike: multinomial logistic regression (one ``nn.Linear`` on the L2-normalized image
features, cross-entropy) trained with AdamW, learning rate 0.1 on a cosine schedule without warmup, 10 epochs of
shuffled batches of 64; its weight decay is searched over ``logspace(-6, 2, 97)`` on a validation share of the fitting
data (7 evenly spaced values, then the best one's neighbours at spans 8, 4, 2, 1; a tie keeps the earlier), and the
probe is refit on all of the fitting data with the chosen decay and scored once on the test part. One difference: the
search is scored by ``select`` (the study's headline metric, balanced accuracy by default; CLIP_benchmark's is top-1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .rows import stratified_split
from .zeroshot import accuracy_metrics, detailed_metrics, image_features

WEIGHT_DECAYS = np.logspace(-6, 2, num=97)  # CLIP_benchmark's grid
COARSE = list(range(0, 97, 16))             # its first look: logspace(-6, 2, 7), every 16th value of the grid
SPANS = (8, 4, 2, 1)                        # then the best value's neighbours at these distances


@dataclass(frozen=True)
class ProbeSettings:
    """CLIP_benchmark's defaults (``--fewshot_lr 0.1 --fewshot_epochs 10 --batch_size 64``); ``val_share``: the part
    of the fitting data that chooses the weight decay (its ``--val_proportion``); ``select``: the metric that
    chooses it (``top1`` is CLIP_benchmark's)."""

    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    val_share: float = 0.2
    select: str = "balanced_accuracy"
    seed: int = 0


def train(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, s: ProbeSettings) -> torch.nn.Linear:
    """A linear classifier ``[D] -> [classes]`` on features ``x`` ``[N, D]`` and labels ``y`` ``[N]``, trained as
    CLIP_benchmark trains its probe; seeded by ``s.seed`` without touching the global random state."""
    gen = torch.Generator().manual_seed(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = torch.nn.Linear(x.shape[1], classes).to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(x) / s.batch_size)
    total, step = s.epochs * per_epoch, 0
    for _ in range(s.epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for i in range(per_epoch):
            for group in opt.param_groups:  # cosine from lr to 0 over every step, no warmup
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * s.lr
            idx = order[i * s.batch_size:(i + 1) * s.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def logits_of(model: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().cpu()


def choose_weight_decay(fit: tuple, val: tuple, classes: int, s: ProbeSettings) -> float:
    """CLIP_benchmark's search: the weight decay of :data:`WEIGHT_DECAYS` whose probe, trained on ``fit``
    (``(x [N, D], y [N])``), scores best by ``s.select`` on ``val``."""
    scores: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best = candidates[0]
        for i in candidates:
            if i not in scores:  # a value seen at an earlier span is not trained again (same seed: same score)
                scores[i] = accuracy_metrics(logits_of(train(*fit, classes, float(WEIGHT_DECAYS[i]), s), val[0]),
                                             val[1])[s.select]
            if scores[i] > scores[best]:  # strictly better: a tie keeps the earlier candidate, as CLIP_benchmark's
                best = i
        return best

    best = peak(COARSE)
    for span in SPANS:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
    return float(WEIGHT_DECAYS[best])


@contextmanager
def one_thread():
    """Torch on one CPU thread for the block: a probe's steps are tiny matrix products, and with several threads each
    pays their synchronisation, which on a busy machine made the probe 20x slower (111 s against 6 s measured for
    tests/test_probe.py on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 classes: int, s: ProbeSettings = ProbeSettings()) -> dict:
    """Fit the probe on ``train_x`` ``[N, D]`` / ``train_y`` ``[N]`` (its weight decay chosen on a seeded, stratified
    ``s.val_share`` of them, then refit on all) and score it on ``test_x`` ``[M, D]`` / ``test_y`` ``[M]``.

    Returns ``top1``, ``top5`` (C >= 5), ``balanced_accuracy`` with their 95% bootstrap intervals (as
    :func:`~study.library.zeroshot.detailed_metrics`), ``weight_decay`` and ``train_images``."""
    train_x, test_x = train_x.float(), test_x.float()
    val_idx, fit_idx = stratified_split(train_y, s.val_share, s.seed)
    with one_thread():
        if len(val_idx) and len(fit_idx):
            decay = choose_weight_decay((train_x[fit_idx], train_y[fit_idx]), (train_x[val_idx], train_y[val_idx]),
                                        classes, s)
        else:  # one image per class: nothing to choose on; CLIP_benchmark without a validation split uses 0
            decay = 0.0
        model = train(train_x, train_y, classes, decay, s)
    values, _ = detailed_metrics(logits_of(model, test_x), test_y, seed=s.seed)
    keep = {k: v for k, v in values.items() if not k.startswith("recall/")}
    return {**keep, "weight_decay": decay, "train_images": len(train_y)}


def probe_metrics(model, pairs, device, *, cache=None, frozen: bool = False, settings: ProbeSettings = ProbeSettings(),
                  batch_size: int = 256, progress: Optional[str] = None) -> dict:
    """The linear probe of ``model``'s image features on each ``(fit, test)`` pair of
    :class:`~study.library.benchmarks.EvalSet` (:func:`~study.library.benchmarks.probe_pairs`), keyed like the
    test part's zero-shot metrics: ``test/specialized_linear_probe_top1``, ``test/general/<name>/linear_probe_...``.
    ``frozen``: the image tower is the base model's, so ``cache`` (a
    :class:`~study.library.cache.FeatureCache`) may serve features the zero-shot evaluation already computed."""
    from tqdm.auto import tqdm

    def features(s):
        def compute():
            return image_features(model, s.images, device, batch_size)
        return (cache.get("image", s.fingerprint, compute) if frozen and cache is not None else compute()).to(device)

    was_training = model.training
    model.eval()
    out = {}
    for fit, test in tqdm(pairs, desc=progress, unit="benchmark", disable=None if progress else True, leave=False):
        values = linear_probe(features(fit), fit.labels.to(device), features(test), test.labels.to(device),
                              len(test.classnames), settings)
        out.update({f"{test.key}linear_probe_{k}": v for k, v in values.items()})
    model.train(was_training)
    return out
