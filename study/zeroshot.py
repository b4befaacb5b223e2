"""Zero-shot classification, following CLIP_benchmark's protocol.

Class names x prompt templates are embedded, each embedding L2-normalized,
averaged per class, then normalized again (open_clip's
``build_zero_shot_classifier``). Images are embedded and normalized; the logits
are their cosine similarity to each class embedding.
"""

from __future__ import annotations

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
def evaluate(model, tokenizer, bench: Benchmark, device) -> dict:
    """Zero-shot ``{"top1", "balanced_accuracy"}`` of ``model`` on ``bench``."""
    was_training = model.training
    model.eval()
    classifier = zero_shot_classifier(model, tokenizer, bench.classnames, bench.templates, device)
    logits = image_features(model, bench.images, device) @ classifier.float()
    model.train(was_training)
    return accuracy_metrics(logits, bench.labels)
