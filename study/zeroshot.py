"""Zero-shot classification, following CLIP_benchmark's protocol.

Class names x prompt templates are embedded, each embedding L2-normalized,
averaged per class, then normalized again (open_clip's
``build_zero_shot_classifier``). Images are embedded and normalized; the logits
are their cosine similarity to each class embedding.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import Benchmark


def zero_shot_classifier(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """Class embeddings ``[D, C]`` from ``classnames`` (C) and ``{c}`` ``templates``."""
    from open_clip import build_zero_shot_classifier

    fns = [lambda c, t=t: t.format(c=c) for t in templates]
    return build_zero_shot_classifier(model, tokenizer, list(classnames), fns,
                                      num_classes_per_batch=None, device=device)


@torch.no_grad()
def image_features(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized image embeddings ``[N, D]`` for ``images`` ``[N, 3, H, W]``."""
    feats = [model.encode_image(images[i:i + batch_size].to(device), normalize=True).float()
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and balanced accuracy (mean per-class recall) from ``logits`` ``[N, C]`` and ``labels`` ``[N]``."""
    pred = logits.argmax(dim=1).cpu()
    labels = labels.cpu()
    recalls = [(pred[labels == c] == c).float().mean().item()
               for c in range(logits.shape[1]) if (labels == c).any()]
    return {"top1": (pred == labels).float().mean().item(),
            "balanced_accuracy": float(sum(recalls) / len(recalls))}


@torch.no_grad()
def zero_shot_logits(model, tokenizer, bench: Benchmark, device) -> torch.Tensor:
    """Cosine-similarity logits ``[N, C]`` of ``bench``'s images against its zero-shot classifier."""
    was_training = model.training
    model.eval()
    classifier = zero_shot_classifier(model, tokenizer, bench.classnames, bench.templates, device)
    logits = image_features(model, bench.images, device) @ classifier.float()
    model.train(was_training)
    return logits.cpu()


def evaluate(model, tokenizer, bench: Benchmark, device) -> dict:
    """Zero-shot ``{"top1", "balanced_accuracy"}`` of ``model`` on ``bench``."""
    return accuracy_metrics(zero_shot_logits(model, tokenizer, bench, device), bench.labels)


def detailed_metrics(logits: torch.Tensor, labels: torch.Tensor, baseline_pred: list[int] | None = None,
                     n_boot: int = 1000, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Headline metrics with uncertainty, from ``logits`` ``[N, C]`` and ``labels`` ``[N]``.

    Returns ``(scalars, confusion [C, C])``. Scalars: ``top1``, ``top5`` (C >= 5), ``balanced_accuracy``,
    ``recall/<class index>``, 95% percentile-bootstrap intervals ``<metric>_ci_low/_ci_high`` (images
    resampled with replacement, ``n_boot`` times), and, given the baseline's predictions on the same
    images, the paired-bootstrap interval of the top-1 gain and McNemar's exact p-value.
    """
    from scipy.stats import binomtest

    y = labels.cpu().numpy()
    n, c = logits.shape
    pred = logits.argmax(1).cpu().numpy()
    correct = pred == y
    present = [k for k in range(c) if (y == k).any()]
    out = {"top1": float(correct.mean()),
           "balanced_accuracy": float(np.mean([correct[y == k].mean() for k in present]))}
    if c >= 5:
        top5 = logits.topk(5, dim=1).indices.cpu().numpy()
        out["top5"] = float((top5 == y[:, None]).any(1).mean())
    for k in present:
        out[f"recall/{k}"] = float(correct[y == k].mean())
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)

    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot_correct, boot_y = correct[idx], y[idx]
    top1 = boot_correct.mean(1)
    recalls = [(boot_correct & (boot_y == k)).sum(1) / np.maximum((boot_y == k).sum(1), 1) for k in present]
    samples = {"top1": top1, "balanced_accuracy": np.mean(recalls, axis=0)}
    if baseline_pred is not None:
        base_correct = np.asarray(baseline_pred) == y
        samples["top1_gain"] = top1 - base_correct[idx].mean(1)
        out["top1_gain"] = float(correct.mean() - base_correct.mean())
        b, w = int((base_correct & ~correct).sum()), int((~base_correct & correct).sum())
        out["mcnemar_p"] = float(binomtest(w, b + w, 0.5).pvalue) if b + w else 1.0
    for name, values in samples.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    return out, confusion
