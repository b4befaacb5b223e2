"""Everything a sweep needs before Ray starts: checked inputs, the base model, the baseline.

Runs in the driver process. Any bad input raises here, before Ray starts or
anything reaches MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import StudyConfig
from ..library.benchmarks import check_benchmarks, eval_sets, probe_pairs
from ..library.cache import feature_cache, model_id, prune, store_cache
from ..library.contamination import check_overlap
from ..library.finetune import check_shots, decoded_finetune, finetune_captions, load_finetune_split
from ..library.models import check_model, load_base_model
from ..library.prefix import SuffixEncoder, finetune_features, prefix_depths, prefix_sets, tower_depths, unsupported
from ..library.probe import ProbeSettings, probe_metrics
from ..library.zeroshot import evaluate_sets


@dataclass
class Prepared:
    model_pretrained: Optional[str]  # resolved: tag, hf id, or the cached offline checkpoint path
    finetune_pairs: int
    baseline: dict[str, float]  # specialized_/general_ top1, balanced_accuracy, their CIs, ...
    baseline_predictions: dict[str, list[int]]  # per benchmark: the base model's predicted class per image
    baseline_confusions: dict  # per benchmark: (confusion matrix, class names)
    seconds: float
    overlap: dict  # per benchmark "<role>/<name>": {"exact", "perceptual", "images"} shared with data.finetune
    transfer: str = ""  # "" (zero-shot), or why the study is in-distribution transfer
    prefix_depths: Optional[dict] = None  # blocks per tower served by the frozen-prefix cache (None: off)


def check_inputs(cfg: StudyConfig, cache_dir: Path) -> int:
    """Validate the data (paths, splits, columns, class names). Returns fine-tuning pairs."""
    ds = load_finetune_split(cfg.data.finetune, cfg.data, cache_dir)
    finetune_captions(cfg.data.finetune, ds, cfg.data.seed)  # labels without class names stop us here
    if shots := [int(k) for k in cfg.space.values("shots_per_class") if k is not None]:
        check_shots(cfg.data.finetune, ds, max(shots))  # a class with fewer than k images stops us here
    check_benchmarks(cfg.data, cache_dir)
    return len(ds)


def prepare(cfg: StudyConfig, cache_dir: Path) -> Prepared:
    """Check inputs, resolve the base model, build the frozen-prefix feature stores (for ``cfg.space``) and
    evaluate the base model (the baseline) on every benchmark."""
    t0 = time.time()
    check_model(cfg.model.name, cfg.model.pretrained)
    check_inputs(cfg, cache_dir)
    pretrained = cfg.model.weights(cache_dir)
    torch.manual_seed(0)
    lm = load_base_model(cfg.model.name, pretrained)  # weights that do not fit the architecture stop us here
    ft = decoded_finetune(cfg.data.finetune, cfg.data, cache_dir, lm.preprocess)  # undecodable images stop us here
    if ft["skipped"] or ft["no_caption"]:
        print(f"[data] data.finetune: {len(ft['store'])} of {ft['rows']} rows used; skipped {ft['skipped']} images "
              f"that cannot be decoded and {ft['no_caption']} rows with an empty or missing caption", flush=True)
    sets = eval_sets(cfg.data, cache_dir, lm.preprocess, validation_share=cfg.evaluation.validation_share)
    probes = probe_pairs(sets, cache_dir, lm.preprocess, cfg.data.seed, cfg.data.offline_scale, verbose=True)
    named = {bench_where(s): s.images.whole() for s in sets}  # (where, metric name): the benchmark's whole store
    counts = check_overlap(ft["store"], {where: store for (where, _), store in named.items()}, cfg.data.max_overlap)
    overlap = {name: counts[where] for where, name in named}
    print(data_line(ft, sets, overlap, cfg.data.max_overlap), flush=True)
    for folder in (store_cache(cache_dir), Path(cache_dir) / "hf"):  # decoded stores; datasets' builds of local data
        prune(folder, int(cfg.data.cache_max_gb * 2**30))
    depths = prefix_plan(cfg, lm.model)
    model = lm.model
    if depths:  # once per study; the baseline then runs the same suffix as every trial (WiSE-FT's alpha 0 agrees)
        finetune_features(lm, model_id(cfg.model.name, pretrained), depths, ft["store"], lm.tokenizer(ft["captions"]),
                          cache_dir)
        sets, model = prefix_sets(lm, cfg.model.name, pretrained, depths, sets, cache_dir), SuffixEncoder(lm.model, depths)
        probes = paired(prefix_sets(lm, cfg.model.name, pretrained, depths, [s for p in probes for s in p], cache_dir))
    cache = feature_cache(cache_dir, cfg.model.name, pretrained)
    baseline, confusions, predictions = evaluate_sets(
        model, lm.tokenizer, sets, "cpu", detailed=True, cache=cache, frozen_image=True, frozen_text=True,
        collapse_share=cfg.evaluation.collapse_share, progress="[study] baseline zero-shot")
    # the ceiling: its features are the ones just embedded (the cache serves them), so it costs seconds
    baseline.update(probe_metrics(model, probes, "cpu", cache=cache, frozen=True, progress="[study] baseline linear probe",
                                  settings=ProbeSettings(select=cfg.evaluation.headline, seed=cfg.data.seed)))
    return Prepared(pretrained, len(ft["store"]), baseline, predictions, confusions, time.time() - t0, overlap,
                    transfer_kind(ft["classnames"], sets), depths)


def paired(flat: list) -> list[tuple]:
    """``[a, b, c, d]`` -> ``[(a, b), (c, d)]``: probe pairs flattened for :func:`prefix_sets`, paired again."""
    return list(zip(flat[::2], flat[1::2]))


def prefix_plan(cfg: StudyConfig, clip) -> Optional[dict]:
    """Blocks per tower that no trial of the search space trains (see :mod:`study.library.prefix`), or None
    when ``resources.frozen_prefix_cache`` is off or the model does not qualify (said in one line)."""
    if not cfg.resources.frozen_prefix_cache:
        return None
    if why := unsupported(clip):
        print(f"[study] frozen-prefix cache off: {why}", flush=True)
        return None
    # The most blocks any trial trains (projection-only trials train none).
    blocks = 0 if set(cfg.space.values("method")) <= {"projections"} else max(int(v) for v in cfg.space.values("lora_blocks"))
    depths = prefix_depths(clip, blocks, set(cfg.space.values("lora_towers")))
    total = tower_depths(clip)
    print("[study] frozen-prefix cache: the first " + " and ".join(f"{d} of {total[t]} blocks of the {t} tower"
                                                                   for t, d in depths.items())
          + " run once per study; trials run the rest (resources.frozen_prefix_cache)", flush=True)
    return depths


def data_line(ft: dict, sets, overlap: dict, max_overlap: int) -> str:
    """One line on what was decoded and what the contamination check found."""
    kind = "captioned from class names" if ft["classnames"] else "image-caption pairs"
    shared = sum(v["images"] for v in overlap.values())
    images = sum(len(s.images) for s in sets)
    return (f"[data] fine-tuning set: {len(ft['store'])} {kind}; benchmarks: {images} images in "
            f"{len(sets)} validation/test parts; overlap check: {shared} benchmark images also in the fine-tuning "
            f"set (max_overlap {max_overlap})")


def bench_where(s) -> tuple[str, str]:
    """``("data.specialized 'derm'", "specialized/derm")``: a benchmark in words and as a metric name (plus the
    split when it is the benchmark's own validation split)."""
    own = s.spec.validation_split if s.split == "val" and s.spec.validation_split else ""
    return (f"data.{s.role} {s.spec.name!r}" + (f" split {own!r}" if own else ""),
            f"{s.role}/{s.spec.name}" + (f"/{own}" if own else ""))


def transfer_kind(finetune_classes: list[str] | None, sets) -> str:
    """"" for zero-shot transfer; else one sentence: the fine-tuning captions, built from class names, name
    at least half of the headline specialized benchmark's classes (in-distribution transfer, not zero-shot)."""
    if not finetune_classes:
        return ""
    bench = next(s for s in sets if s.role == "specialized" and s.primary)
    norm = {c.strip().lower() for c in finetune_classes}
    shared = [c for c in bench.classnames if c.strip().lower() in norm]
    if len(shared) * 2 < len(bench.classnames):
        return ""
    return (f"in-distribution transfer, not zero-shot: the fine-tuning captions name {len(shared)} of the "
            f"{len(bench.classnames)} classes of benchmark {bench.spec.name!r}")
