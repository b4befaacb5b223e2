"""Zero-shot evaluation, following CLIP_benchmark's protocol.

Classification: each class's prompts are embedded, each embedding L2-normalized,
averaged, then normalized again; images are embedded and normalized, and the
logits are their cosine similarity to each class embedding. Retrieval: recall@k
of captions given images and of images given captions. Small pure functions,
plus :func:`evaluate_sets`, which runs them over a study's benchmarks and can
reuse a frozen tower's embeddings from a :class:`FeatureCache`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .cache import FeatureCache


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, prompts: list[list[str]], device) -> torch.Tensor:
    """Class embeddings ``[D, C]`` from C lists of prompts (templates filled with the class name, or CuPL).

    Exactly CLIP_benchmark's ``zero_shot_classifier``: per class, the prompts' embeddings are
    normalized, averaged, and normalized again.
    """
    weights = []
    for texts in prompts:
        emb = F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1).mean(dim=0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, dim=1)


@torch.no_grad()
def image_features(model, images: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized image embeddings ``[N, D]`` for ``images`` ``[N, 3, H, W]``."""
    feats = [F.normalize(model.encode_image(images[i:i + batch_size].to(device)).float(), dim=-1)
             for i in range(0, len(images), batch_size)]
    return torch.cat(feats)


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized text embeddings ``[T, D]``."""
    feats = [F.normalize(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float(), dim=-1)
             for i in range(0, len(texts), batch_size)]
    return torch.cat(feats)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, top-5 (C >= 5) and balanced accuracy (mean per-class recall) from ``logits`` ``[N, C]``
    and ``labels`` ``[N]``: CLIP_benchmark's ``evaluate`` arithmetic (counts divided in float64)."""
    pred, labels = logits.argmax(dim=1).cpu(), labels.cpu()
    n = len(labels)
    recalls = [int((pred[labels == c] == c).sum()) / int((labels == c).sum())
               for c in range(logits.shape[1]) if (labels == c).any()]
    out = {"top1": int((pred == labels).sum()) / n, "balanced_accuracy": float(np.mean(recalls))}
    if logits.shape[1] >= 5:
        out["top5"] = int((logits.topk(5, dim=1).indices.cpu() == labels[:, None]).any(1).sum()) / n
    return out


def retrieval_hits(scores: torch.Tensor, caption_image: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query hits at ``k`` from ``scores`` ``[N images, T captions]``: ``(image->text [N], text->image [T])``.

    An image query hits when any of its captions is among its top ``k`` captions; a caption query
    hits when its image is among its top ``k`` images (CLIP_benchmark's retrieval protocol).
    """
    n, t = scores.shape
    positive = torch.zeros(n, t, dtype=torch.bool)
    positive[caption_image, torch.arange(t)] = True
    i2t = positive.gather(1, scores.topk(min(k, t), dim=1).indices).any(1)
    t2i = positive.T.gather(1, scores.T.topk(min(k, n), dim=1).indices).any(1)
    return i2t, t2i


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, caption_image: torch.Tensor, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Recall@1/5/10 both ways from normalized ``img`` ``[N, D]`` and ``txt`` ``[T, D]``, with 95% bootstrap
    intervals of recall@1 (queries resampled with replacement)."""
    scores = (img @ txt.T).cpu()
    out = {}
    rng = np.random.default_rng(seed)
    for k in (1, 5, 10):
        i2t, t2i = retrieval_hits(scores, caption_image.cpu(), k)
        for name, hits in (("i2t", i2t), ("t2i", t2i)):
            out[f"{name}_recall_at_{k}"] = int(hits.sum()) / len(hits)
            if k == 1:
                h = hits.numpy()
                boot = h[rng.integers(0, len(h), size=(n_boot, len(h)))].mean(1)
                out[f"{name}_recall_at_1_ci_low"], out[f"{name}_recall_at_1_ci_high"] = (
                    float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return out


@torch.no_grad()
def evaluate_sets(model, tokenizer, sets, device, *, detailed: bool = False, baseline_predictions=None,
                  cache: FeatureCache | None = None, frozen_image: bool = False, frozen_text: bool = False,
                  seed: int = 0, batch_size: int = 256, collapse_share: float = 0.9,
                  progress: str | None = None) -> tuple[dict, dict, dict]:
    """Zero-shot metrics of ``model`` on every benchmark of a study; ``progress``: a progress bar's label (shown
    on a terminal).

    ``sets``: :class:`~study.library.benchmarks.EvalSet` list. Returns ``(metrics, confusions, predictions)``:
    metrics keyed ``<set.key><metric>``; with ``detailed``,
    intervals, per-class recall, confusion matrices ``{set.label: (matrix, classnames)}`` and, given
    ``baseline_predictions`` ``{set.label: [class per image]}``, the paired test against the baseline.
    ``frozen_image``/``frozen_text`` say a tower is untouched, so ``cache`` may serve its embeddings.
    Classification sets also get their chance levels and the collapse check (:func:`chance_and_collapse`).
    """
    was_training = model.training
    model.eval()
    metrics, confusions, predictions = {}, {}, {}

    def embed(kind: str, key: str, frozen: bool, compute):
        return cache.get(kind, key, compute) if frozen and cache is not None else compute()

    from tqdm.auto import tqdm

    for s in tqdm(sets, desc=progress, unit="benchmark part", disable=None if progress else True, leave=False):
        img = embed("image", s.fingerprint, frozen_image, lambda: image_features(model, s.images, device, batch_size))
        if s.spec.task == "retrieval":
            txt = embed("captions", s.fingerprint, frozen_text,
                        lambda: text_features(model, tokenizer, s.captions, device))
            values = retrieval_metrics(img, txt, s.caption_image, seed=seed)
        else:
            clf = embed("classifier", repr(s.prompts), frozen_text,
                        lambda: zero_shot_classifier(model, tokenizer, s.prompts, device))
            logits = (img.to(clf.device) @ clf.float()).cpu()
            predictions[s.label] = logits.argmax(1).tolist()
            if detailed:
                values, matrix = detailed_metrics(logits, s.labels, (baseline_predictions or {}).get(s.label), seed=seed)
                confusions[s.label] = (matrix, s.classnames)
            else:
                values = accuracy_metrics(logits, s.labels)
            values.update(chance_and_collapse(logits.argmax(1), s.labels, len(s.classnames), collapse_share))
        metrics.update({f"{s.key}{k}": v for k, v in values.items()})
        metrics[f"{s.key}images"] = len(s.images)
        if s.skipped:
            metrics[f"{s.key}undecodable_images"] = s.skipped
    model.train(was_training)
    return metrics, confusions, predictions


def chance_and_collapse(pred: torch.Tensor, labels: torch.Tensor, classes: int, collapse_share: float = 0.9) -> dict:
    """Chance levels and the collapse check from predicted and true classes ``[N]``.

    ``chance_top1``: the majority class's share (what always guessing it scores); ``chance_balanced_accuracy``:
    ``1 / classes``. ``pred_majority_share``: the share of images given the most predicted class;
    ``collapsed`` is 1.0 when that share is at least ``collapse_share`` while the class's true share is
    below it (a model that answers one class for nearly everything), else 0.0.
    """
    n = len(labels)
    true_share = torch.bincount(labels.cpu(), minlength=classes).float() / n
    pred_counts = torch.bincount(pred.cpu(), minlength=classes).float() / n
    top = int(pred_counts.argmax())
    collapsed = pred_counts[top] >= collapse_share and true_share[top] < collapse_share
    return {"chance_top1": float(true_share.max()), "chance_balanced_accuracy": 1.0 / classes,
            "pred_majority_share": float(pred_counts[top]), "collapsed": float(collapsed)}


def detailed_metrics(logits: torch.Tensor, labels: torch.Tensor, baseline_pred: list[int] | None = None,
                     n_boot: int = 1000, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Headline metrics with uncertainty, from ``logits`` ``[N, C]`` and ``labels`` ``[N]``.

    Returns ``(scalars, confusion [C, C])``. Scalars: ``top1``, ``top5`` (C >= 5), ``balanced_accuracy``,
    ``recall/<class index>``, 95% percentile-bootstrap intervals ``<metric>_ci_low/_ci_high`` (images
    resampled with replacement, ``n_boot`` times), and, given the baseline's predictions on the same
    images, the paired-bootstrap intervals of the top-1 and balanced-accuracy gains and McNemar's exact
    p-value (of the top-1 errors).
    """
    from scipy.stats import binomtest

    y = labels.cpu().numpy()
    n, c = logits.shape
    pred = logits.argmax(1).cpu().numpy()
    correct = pred == y
    present = [k for k in range(c) if (y == k).any()]
    out = accuracy_metrics(logits, labels)
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
        base_boot = base_correct[idx]
        base_recalls = [(base_boot & (boot_y == k)).sum(1) / np.maximum((boot_y == k).sum(1), 1) for k in present]
        samples["balanced_accuracy_gain"] = samples["balanced_accuracy"] - np.mean(base_recalls, axis=0)
        out["balanced_accuracy_gain"] = float(np.mean([correct[y == k].mean() for k in present])
                                              - np.mean([base_correct[y == k].mean() for k in present]))
        b, w = int((base_correct & ~correct).sum()), int((~base_correct & correct).sum())
        out["mcnemar_p"] = float(binomtest(w, b + w, 0.5).pvalue) if b + w else 1.0
    for name, values in samples.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    return out, confusion


def metric_tables(metrics: dict, confusions: dict | None = None) -> dict[str, str]:
    """CSV tables of one evaluation's metrics, for a run's ``metrics/`` artifacts: ``{file name: text}``.

    * ``per_class.csv`` - ``part, benchmark, class_index, class, images, recall`` from ``confusions``
      ``{label: (confusion [C, C] (rows true, columns predicted), class names)}``, as :func:`evaluate_sets`
      returns them; ``part`` is ``val``/``test`` (empty for a whole benchmark);
    * ``intervals.csv`` - ``metric, value, ci_low, ci_high``: every metric with a 95% interval;
    * ``wiseft.csv`` - ``alpha`` and one column per metric of the ``<part>/.../wiseft/alpha_<a>/`` keys,
      one row per alpha (the WiSE-FT curve; Wortsman et al. 2022).
    """
    import csv
    import io

    def text(header, rows) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()

    out = {}
    rows = []
    for label, (matrix, classnames) in sorted((confusions or {}).items()):
        part, _, bench = label.partition("_") if label.startswith(("val_", "test_")) else ("", "", label)
        for k, (name, row) in enumerate(zip(classnames, np.asarray(matrix))):
            images = int(row.sum())
            rows.append([part, bench, k, name, images, f"{row[k] / images:.6g}" if images else ""])
    if rows:
        out["per_class.csv"] = text(["part", "benchmark", "class_index", "class", "images", "recall"], rows)
    bounded = sorted(k.removesuffix("_ci_low") for k in metrics if k.endswith("_ci_low"))
    out["intervals.csv"] = text(["metric", "value", "ci_low", "ci_high"],
                                [[k, metrics.get(k, ""), metrics[f"{k}_ci_low"], metrics.get(f"{k}_ci_high", "")]
                                 for k in bounded])
    curve: dict[float, dict] = {}
    for k, v in metrics.items():
        head, sep, rest = k.partition("/wiseft/alpha_")
        if sep:
            alpha, _, name = rest.partition("/")
            curve.setdefault(float(alpha), {})[f"{head}/{name}"] = v
    if curve:
        columns = sorted({c for row in curve.values() for c in row})
        out["wiseft.csv"] = text(["alpha", *columns], [[a, *(curve[a].get(c, "") for c in columns)]
                                                       for a in sorted(curve)])
    return out
