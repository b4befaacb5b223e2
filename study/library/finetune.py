"""The fine-tuning pairs: one split of image-caption pairs (or labelled images, captioned from their class
names), decoded once per study into an on-disk store, and its nested subsets: a data fraction, or k shots per class.

Shared by the driver (input checks, decoding before Ray starts) and every Ray Train worker, so that both
see exactly the same images and captions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import webdataset
from .cache import fingerprint, save_atomic, source_stamp, store_cache, touch
from .rows import apply_holdout, class_index
from .sources import DataError, load_source, local_base, require_columns
from .store import ImageStore, build_store, is_store


def load_finetune_split(spec, data, cache_dir: Path, where="data.finetune"):
    """The rows named by ``spec`` (:class:`~study.config.FinetuneData`: split or slice, then its holdout) as a
    ``datasets.Dataset``, its columns checked. ``data`` (:class:`~study.config.DataSection`) gives the seed
    (of the holdout too) and the scale of generated domains."""
    ds = load_source(spec.source, spec.split, cache_dir=cache_dir, seed=data.seed, scale=data.offline_scale,
                     csv_separator=spec.csv_separator, where=f"{where}.source")
    text = {"label_column": spec.label_column} if spec.label_column else {"caption_column": spec.caption_column}
    require_columns(ds, {"image_column": spec.image_column, **text}, where, spec.source)
    return apply_holdout(ds, spec.holdout, data.seed)


def webdataset_defaults(spec, where="data.finetune") -> dict:
    """For a WebDataset fine-tuning source (:mod:`.webdataset`) whose config names no ``label_column``: ``{}`` when
    its samples carry captions (``.txt``), else what makes it a set of labelled images captioned from class names
    (it has no caption to read), ``label_column: label`` and ``classnames`` from its ``classnames.txt`` (unless the
    config lists them). ``{}`` for every other source. Raises :class:`DataError` naming ``where``."""
    if spec.label_column or not webdataset.is_webdataset(spec.source):
        return {}
    meta = webdataset.meta_of(spec.source, where=f"{where}.source")
    if not webdataset.labelled(meta, spec.source, spec.split.split("[")[0], f"{where}.source"):
        return {}
    given = "classnames" in spec.model_fields_set or not meta.classnames
    return {"label_column": "label", **({} if given else {"classnames": meta.classnames})}


def finetune_labels(spec, ds, where="data.finetune") -> tuple[list[str], np.ndarray]:
    """``(class names, label per row [N] in 0..C-1)`` of a labelled fine-tuning split (``spec.label_column``)."""
    feature = ds.features[spec.label_column]
    return class_index(ds[spec.label_column], spec.classnames, getattr(feature, "names", None),
                       f"{where}.label_column", f"{where}.classnames")


def finetune_captions(spec, ds, seed: int, where="data.finetune") -> tuple[list, list[str] | None]:
    """``(caption per row, class names or None)``. With ``label_column``, each row's caption is one of
    ``templates`` (drawn with ``seed``) filled with its class name, as in FLYP (Goyal et al., 2023); empty
    or missing captions are None (skipped and counted later); a list of captions (a WebDataset's ``.txt`` lines)
    gives its first."""
    if not spec.label_column:
        first = [c[0] if isinstance(c, list) and c else None if isinstance(c, list) else c
                 for c in ds[spec.caption_column]]
        return [str(c) if c is not None and str(c).strip() else None for c in first], None
    names, labels = finetune_labels(spec, ds, where)
    pick = np.random.default_rng(seed).integers(len(spec.templates), size=len(labels))
    return [spec.templates[t].format(c=names[y]) for t, y in zip(pick, labels)], names


def check_shots(spec, ds, shots: int, where="data.finetune") -> None:
    """Raise :class:`DataError` unless every class present in the labelled split ``ds`` has at least ``shots`` images
    (the largest ``shots_per_class`` of a search space); the message names the smallest class and its count."""
    names, labels = finetune_labels(spec, ds, where)
    counts = np.bincount(labels, minlength=len(names))
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if counts[smallest] < shots:
        raise DataError(f"{where}: params.shots_per_class: {shots} images per class asked, but class "
                        f"{names[smallest]!r} has {counts[smallest]} in split {spec.split!r} of {spec.source}")


def decoded_finetune(spec, data, cache_dir: Path, preprocess) -> dict:
    """Every fine-tuning image decoded once per study into a store under ``<cache>/stores``:
    ``{"store": ImageStore, "captions": [caption per store image], "rows": rows in the split, "classnames":
    class names of a label-only set or None, "skipped": undecodable images, "no_caption": rows skipped}``.

    The driver calls this before Ray starts (broken images stop the study there, with the count); trials
    open the same store. Keyed by the spec, the preprocessing and the content of every local file.
    """
    key = fingerprint(spec.model_dump_json(), repr(preprocess), data.seed, data.offline_scale,
                      source_stamp(spec.source, webdataset.pattern_files(spec.source)))
    path = store_cache(cache_dir) / f"finetune-{key}"
    meta = path.with_name(path.name + ".finetune.pt")
    if not (meta.exists() and is_store(path)):  # pruning may have taken one of the two
        ds = load_finetune_split(spec, data, cache_dir)
        captions, names = finetune_captions(spec, ds, data.seed)
        store, skipped = build_store(ds, spec.image_column, preprocess, path, where="data.finetune.image_column",
                                     title="the fine-tuning set (data.finetune)",
                                     max_bad_share=spec.max_undecodable_share, base_dir=local_base(spec.source))
        save_atomic({"rows": len(ds), "captions": [captions[int(r)] for r in store.rows], "classnames": names,
                     "skipped": skipped, "labels": store_labels(spec, ds, store)}, meta)  # in store order
    state = torch.load(touch(meta), weights_only=True)
    store = ImageStore(touch(path), preprocess)
    good = [i for i, c in enumerate(state["captions"]) if c is not None]
    if not good:
        raise DataError(f"data.finetune.caption_column: every caption in {spec.caption_column!r} is empty")
    if spec.label_column and "labels" not in state:  # a store decoded before labels were kept: add them
        state["labels"] = store_labels(spec, load_finetune_split(spec, data, cache_dir), store)
        save_atomic(state, meta)
    labels = state.get("labels")
    return {"store": store.subset(good), "captions": [state["captions"][i] for i in good], "rows": state["rows"],
            "classnames": state["classnames"], "skipped": state["skipped"],
            "no_caption": len(state["captions"]) - len(good),
            "labels": None if labels is None else torch.as_tensor(labels)[good].numpy()}


def store_labels(spec, ds, store: ImageStore) -> list[int] | None:
    """The class index of each image of ``store`` (decoded from ``ds``), for k-shot subsets; None without labels."""
    if not spec.label_column:
        return None
    _, labels = finetune_labels(spec, ds)
    return [int(labels[int(r)]) for r in store.rows]


def nested_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indices of a ``fraction`` subset of ``range(n)``, nested across fractions.

    One fixed permutation per ``(n, seed)``; a subset is its prefix, so the 10%
    subset always lies inside the 20% subset. Raises ``ValueError`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: max(1, math.ceil(fraction * n))])


def kshot_subset(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` items of each class of ``labels`` ``[N]`` (k-shot, as CoOp and CLIP-LoRA draw their
    training sets), sorted: stratified by construction, seeded, and nested across k, since one fixed permutation per
    ``(N, seed)`` is walked and each class keeps its first k items in it (the 2-shot set lies inside the 4-shot set).
    A class with fewer than k items gives all it has (:func:`check_shots` refuses that before a study starts)."""
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    picked = [order[labels[order] == c][:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def finetune_subset(spec, data, cache_dir: Path, fraction: float, preprocess,
                    shots: int | None = None) -> tuple[dict, list[int]]:
    """``(decoded, keep)``: :func:`decoded_finetune`'s dict and the positions in its store of the trial's subset
    (undecodable images and empty captions skipped): the nested ``fraction`` subset, or with ``shots`` the k-shot
    subset (:func:`kshot_subset`, drawn with the data seed).

    A fraction is drawn over the split's rows (not the usable ones), so it stays nested and the same whatever fails
    to decode; k shots are drawn over the usable images, so that every class has exactly k.
    """
    d = decoded_finetune(spec, data, cache_dir, preprocess)
    if shots is not None:
        if d["labels"] is None:
            raise DataError("data.finetune.label_column: k shots per class need class labels; the set has none")
        return d, kshot_subset(d["labels"], shots, data.seed).tolist()
    position = {int(row): i for i, row in enumerate(d["store"].rows)}
    return d, [position[int(r)] for r in nested_subset(d["rows"], fraction, data.seed) if int(r) in position]


def finetune_tensors(spec, data, cache_dir: Path, fraction: float, preprocess,
                     tokenizer, shots: int | None = None) -> tuple[ImageStore, torch.Tensor]:
    """The trial's subset (:func:`finetune_subset`) as ``(images [N,3,H,W] on disk, tokens [N,L])``."""
    d, keep = finetune_subset(spec, data, cache_dir, fraction, preprocess, shots)
    return d["store"].subset(keep), tokenizer([d["captions"][i] for i in keep])


class Pairs:
    """One trial's fine-tuning pairs, read batch by batch: decoded images ``[N, 3, H, W]`` with token ids
    ``[N, L]`` and the tether's targets ``[N, D]`` (computed by the trial), or, with the frozen-prefix cache
    (:mod:`.prefix`), both towers' prefix tokens and the targets, read from the study's feature store."""

    def __init__(self, tokens: torch.Tensor, images=None, teacher=(None, None), features=None):
        self.tokens, self.images, self.teacher, self.features = tokens, images, teacher, features
        self.loaded = None  # the features held in memory, when they fit in IN_MEMORY_BYTES
        if features is not None and len(features):
            row = sum(t.numel() * t.element_size() for t in features.read([0], FEATURE_COLUMNS).values())
            if row * len(features) <= IN_MEMORY_BYTES:  # small sets: one read, not one per step
                self.loaded = features.read(slice(None), FEATURE_COLUMNS)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, idx, device) -> tuple[tuple, torch.Tensor | None, torch.Tensor | None]:
        """``(model inputs, teacher image [B, D], teacher text [B, D])`` of rows ``idx`` on ``device``: the
        inputs are ``(images, tokens)`` for open_clip's ``CLIP``, or ``(image prefix, text prefix, tokens)``
        for :class:`~.prefix.SuffixCLIP`."""
        tokens = self.tokens[idx].to(device)
        if self.features is not None:
            b = {k: v[idx] for k, v in self.loaded.items()} if self.loaded else self.features.read(idx, FEATURE_COLUMNS)
            b = {k: v.to(device) for k, v in b.items()}
            return (b["image"], b["text"], tokens), b["teacher_image"], b["teacher_text"]
        teacher = [t[idx].to(device) if t is not None else None for t in self.teacher]
        return (self.images[idx].to(device), tokens), teacher[0], teacher[1]


FEATURE_COLUMNS = ["image", "text", "teacher_image", "teacher_text"]
# A trial's prefix features up to this size are read into memory once (a per-step read of a small model's
# features costs more than the blocks it saves); larger sets stream from the store, so memory stays bounded.
IN_MEMORY_BYTES = 256 * 2**20
