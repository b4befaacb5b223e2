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

from .config import StudyConfig
from .domain import benchmark, load_benchmark_split, load_finetune_split
from .models import OFFLINE_MODEL, check_model, load_base_model
from .zeroshot import detailed_metrics, zero_shot_logits


@dataclass
class Prepared:
    model_pretrained: Optional[str]  # resolved: tag, hf id, or the cached offline checkpoint path
    finetune_pairs: int
    baseline: dict[str, float]  # specialized_/general_ top1, balanced_accuracy, their CIs, ...
    baseline_predictions: dict[str, list[int]]  # per benchmark: the base model's predicted class per image
    baseline_confusions: dict  # per benchmark: (confusion matrix, class names)
    seconds: float


def check_inputs(cfg: StudyConfig, cache_dir: Path) -> int:
    """Validate model and data (paths, splits, columns, class names). Returns fine-tuning pairs."""
    check_model(cfg.model.name, cfg.model.pretrained)
    ds = load_finetune_split(cfg.data.finetune, cfg.data, cache_dir)
    for name in ("specialized", "general"):
        load_benchmark_split(getattr(cfg.data, name), cfg.data, cache_dir, f"data.{name}")
    return len(ds)


def resolve_pretrained(cfg: StudyConfig, cache_dir: Path) -> Optional[str]:
    """The weights to load: the configured tag/path, or the offline default (pretrained once, cached)."""
    if cfg.model.name == OFFLINE_MODEL and cfg.model.pretrained is None:
        from .pretrain import PretrainSettings, ensure_pretrained

        return str(ensure_pretrained(cache_dir, PretrainSettings(**cfg.model.pretrain.model_dump())))
    return cfg.model.pretrained


def prepare(cfg: StudyConfig, cache_dir: Path) -> Prepared:
    t0 = time.time()
    pairs = check_inputs(cfg, cache_dir)
    pretrained = resolve_pretrained(cfg, cache_dir)
    torch.manual_seed(0)
    lm = load_base_model(cfg.model.name, pretrained)
    baseline, predictions, confusions = {}, {}, {}
    for name in ("specialized", "general"):
        bench = benchmark(getattr(cfg.data, name), cfg.data, cache_dir, lm.preprocess, name)
        logits = zero_shot_logits(lm.model, lm.tokenizer, bench, "cpu")
        values, matrix = detailed_metrics(logits, bench.labels)
        baseline.update({f"{name}_{key}": value for key, value in values.items()})
        baseline[f"{name}_chance"] = 1.0 / len(bench.classnames)
        baseline[f"{name}_images"] = len(bench.labels)
        predictions[name] = logits.argmax(1).tolist()
        confusions[name] = (matrix, bench.classnames)
    return Prepared(pretrained, pairs, baseline, predictions, confusions, time.time() - t0)
