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
from ..library.benchmarks import check_benchmarks, eval_sets
from ..library.cache import feature_cache
from ..library.finetune import decoded_finetune, load_finetune_split
from ..library.models import check_model, load_base_model
from ..library.pretrain import resolve_weights
from ..library.zeroshot import evaluate_sets


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
    check_benchmarks(cfg.data, cache_dir)
    return len(ds)


def prepare(cfg: StudyConfig, cache_dir: Path) -> Prepared:
    """Check inputs, resolve the base model and evaluate it (the baseline) on every benchmark."""
    t0 = time.time()
    pairs = check_inputs(cfg, cache_dir)
    pretrained = resolve_weights(cfg.model, cache_dir)
    torch.manual_seed(0)
    lm = load_base_model(cfg.model.name, pretrained)
    decoded_finetune(cfg.data.finetune, cfg.data, cache_dir, lm.preprocess)  # undecodable images stop us here
    sets = eval_sets(cfg.data, cache_dir, lm.preprocess, validation_share=cfg.evaluation.validation_share)
    baseline, confusions, predictions = evaluate_sets(
        lm.model, lm.tokenizer, sets, "cpu", detailed=True, cache=feature_cache(cache_dir, cfg.model.name, pretrained),
        frozen_image=True, frozen_text=True, collapse_share=cfg.evaluation.collapse_share)
    return Prepared(pretrained, pairs, baseline, predictions, confusions, time.time() - t0)
