"""The frozen-prefix feature cache: each tower's output up to the first block any trial trains, computed once
per study, so that trials run only the trainable suffix.

LoRA sits on the last K residual blocks of a tower (:mod:`.alignment`), and everything before them is frozen
and fed by fixed preprocessing (no augmentation). The tokens after block ``depth - K_max`` (``K_max`` the
largest ``lora_blocks`` of the search space; a tower no trial adapts is cached after its last block) are the
same in every trial. They are written once per study into memory-mapped Arrow stores beside the decoded
images (:mod:`.store`), with the frozen model's embeddings of every fine-tuning pair (the tether's targets).
A trial that trains fewer blocks runs the blocks in between frozen.

The split follows open_clip's own forward (``VisionTransformer._embeds``/``_pool``, ``CLIP.encode_text``), so
prefix then suffix computes what the whole tower computes, up to float round-off. Only open_clip's ``CLIP``
with a ``VisionTransformer`` image tower qualifies (:func:`unsupported` says why another does not); the
study then runs uncached.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .alignment import unwrap
from .cache import fingerprint, model_id, store_cache, touch
from .finetune import FEATURE_COLUMNS
from .sources import datasets_quiet
from .store import ARROW, ImageStore, ArrowRows, is_store

TEXT_MEMO_BYTES = 512 * 2**20  # class-prompt prefixes kept in memory by one evaluator


def unsupported(clip: torch.nn.Module) -> Optional[str]:
    """Why the cache cannot serve ``clip`` (an open_clip model, unwrapped), or None when it can."""
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    if not isinstance(clip, CLIP):
        return f"{type(clip).__name__} is not open_clip's CLIP (e.g. a Hugging Face text tower)"
    if not isinstance(clip.visual, VisionTransformer):
        return f"the image tower is a {type(clip.visual).__name__}, not a VisionTransformer"
    if getattr(clip.visual.patch_dropout, "prob", 0.0) > 0:
        return "patch dropout draws random patches each step"
    return None


def tower_depths(clip: torch.nn.Module) -> dict[str, int]:
    """Residual blocks per tower: ``{"image": n, "text": m}``."""
    return {"image": len(clip.visual.transformer.resblocks), "text": len(clip.transformer.resblocks)}


def prefix_depths(clip: torch.nn.Module, max_lora_blocks: int, lora_towers: set[str]) -> dict[str, int]:
    """Blocks of each tower that no trial trains: ``depth - max_lora_blocks`` for a tower some trial adapts
    (``lora_towers``), the whole depth for the others."""
    return {t: max(0, d - max_lora_blocks) if t in lora_towers else d for t, d in tower_depths(clip).items()}


def _blocks(transformer, x: torch.Tensor, start: int, stop: Optional[int], attn_mask=None) -> torch.Tensor:
    """Residual blocks ``start:stop`` of an open_clip ``Transformer`` on batch-first ``x`` ``[B, T, W]``."""
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in transformer.resblocks[start:stop]:
        x = block(x, attn_mask=attn_mask)
    return x if transformer.batch_first else x.transpose(0, 1)


def image_prefix(clip, images: torch.Tensor, depth: int) -> torch.Tensor:
    """Tokens ``[B, T, W]`` after the first ``depth`` blocks of the image tower, from images ``[B, 3, H, W]``."""
    v = clip.visual
    return _blocks(v.transformer, v._embeds(images), 0, depth)


def image_suffix(clip, x: torch.Tensor, depth: int) -> torch.Tensor:
    """Image embeddings ``[B, D]`` (not normalized) from :func:`image_prefix`'s tokens: the remaining blocks,
    pooling, ``ln_post`` and ``visual.proj``."""
    v = clip.visual
    pooled, _ = v._pool(_blocks(v.transformer, x, depth, None))
    return pooled @ v.proj if v.proj is not None else pooled


def text_prefix(clip, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """Tokens ``[B, L, W]`` after the first ``depth`` blocks of the text tower, from token ids ``[B, L]``."""
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)
    return _blocks(clip.transformer, x, 0, depth, clip.attn_mask)


def text_suffix(clip, x: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """Text embeddings ``[B, D]`` (not normalized) from :func:`text_prefix`'s output and the token ids
    (pooling takes the end-of-text position)."""
    from open_clip.transformer import text_global_pool

    x = clip.ln_final(_blocks(clip.transformer, x, depth, None, clip.attn_mask))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class SuffixCLIP(torch.nn.Module):
    """The trainable suffix of both towers as one module (what DDP wraps when the cache serves a trial).

    ``forward(image_prefix [B, T, W], text_prefix [B, L, W], tokens [B, L])`` returns open_clip's
    ``(image_features [B, D], text_features [B, D], logit_scale.exp())``, features normalized.
    ``model``: the peft-wrapped CLIP; its parameter names are unchanged under ``self.model``.
    """

    def __init__(self, model: torch.nn.Module, depths: dict[str, int]):
        super().__init__()
        self.model, self.depths = model, dict(depths)

    def forward(self, image_prefix: torch.Tensor, text_prefix: torch.Tensor, tokens: torch.Tensor):
        clip = unwrap(self.model)
        img = F.normalize(image_suffix(clip, image_prefix, self.depths["image"]), dim=-1)
        txt = F.normalize(text_suffix(clip, text_prefix, tokens, self.depths["text"]), dim=-1)
        return img, txt, clip.logit_scale.exp()


class SuffixEncoder:
    """What :func:`~study.library.zeroshot.evaluate_sets` calls as its model when benchmark images come as
    prefix tokens: ``encode_image`` takes :func:`image_prefix` tokens; ``encode_text`` takes token ids and
    keeps their prefix in memory (class prompts are embedded every epoch; up to ``TEXT_MEMO_BYTES``).
    ``memo`` may be shared between evaluators of the same base model (the prefix is frozen)."""

    def __init__(self, clip: torch.nn.Module, depths: dict[str, int], memo: Optional[dict] = None):
        self.clip, self.depths = clip, dict(depths)
        self.memo = {} if memo is None else memo

    @property
    def training(self) -> bool:
        return self.clip.training

    def train(self, mode: bool = True):
        self.clip.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = image_suffix(self.clip, x, self.depths["image"])
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        key = hashlib.sha1(tokens.cpu().numpy().tobytes()).hexdigest()
        x = self.memo.get(key)
        if x is None:
            x = text_prefix(self.clip, tokens, self.depths["text"])
            used = sum(t.numel() * t.element_size() for t in self.memo.values())
            if used + x.numel() * x.element_size() <= TEXT_MEMO_BYTES:
                self.memo[key] = x
        f = text_suffix(self.clip, x, tokens, self.depths["text"])
        return F.normalize(f, dim=-1) if normalize else f


class FeatureStore(ArrowRows):
    """Prefix features on disk, read in batches: ``store[idx]`` gives ``[B, ...]`` of ``column``;
    :meth:`read` gives several columns (``image``, ``text``, ``teacher_image``, ``teacher_text``)."""

    def __init__(self, path: Path, column: str = "image", positions: Optional[np.ndarray] = None):
        super().__init__(path, positions)
        self.column_name = column

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[[int(idx)]][0]
        return self.read(idx, [self.column_name])[self.column_name]

    def __getstate__(self):
        return {"path": self.path, "column": self.column_name, "positions": self.positions}

    def __setstate__(self, state):
        self.__init__(state["path"], state["column"], state["positions"])

    def subset(self, idx) -> "FeatureStore":
        return FeatureStore(self.path, self.column_name, self.positions[np.asarray(idx, dtype=np.int64)])


def _write(path: Path, batches, features) -> None:
    """Write ``batches`` (dicts of numpy arrays) as a finished store at ``path``, through a temporary folder
    renamed into place (a concurrent builder's identical store wins)."""
    from datasets.arrow_writer import ArrowWriter

    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
    tmp.mkdir(parents=True)
    writer = ArrowWriter(features=features, path=str(tmp / ARROW))
    rows = 0
    for batch in batches:
        writer.write_batch(batch)
        rows += len(next(iter(batch.values())))
    writer.finalize()
    (tmp / "meta.json").write_text(f'{{"rows": {rows}, "skipped": 0}}')
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _array(shape: tuple, dtype: str = "float32"):
    datasets = datasets_quiet()
    return datasets.Array2D(shape=shape, dtype=dtype) if len(shape) == 2 else datasets.Sequence(
        datasets.Value(dtype), length=shape[0])


@torch.no_grad()
def finetune_features(lm, model_key: str, depths: dict[str, int], images: ImageStore, tokens: torch.Tensor,
                      cache_dir: Path, device="cpu", batch_size: int = 128) -> FeatureStore:
    """The prefix tokens of every fine-tuning pair (``images`` ``[N, 3, H, W]``, ``tokens`` ``[N, L]``) and
    the frozen model's normalized embeddings of both (the tether's targets), built once under
    ``<cache>/stores``; rows follow ``images``. ``lm``: the base model (:class:`~.models.LoadedModel`)."""
    key = fingerprint(model_key, images.path.name, hashlib.sha1(images.positions.tobytes()).hexdigest(), len(images),
                      hashlib.sha1(tokens.numpy().tobytes()).hexdigest(), sorted(depths.items()), _versions())
    path = store_cache(cache_dir) / f"prefix-finetune-{key}"
    if not is_store(path):
        clip = lm.model.to(device).eval()

        def batches():
            for i in range(0, len(images), batch_size):
                img, tok = images[i:i + batch_size].to(device), tokens[i:i + batch_size].to(device)
                xi, xt = image_prefix(clip, img, depths["image"]), text_prefix(clip, tok, depths["text"])
                yield {"image": xi.cpu().numpy(), "text": xt.cpu().numpy(),
                       "teacher_image": F.normalize(image_suffix(clip, xi, depths["image"]), dim=-1).cpu().numpy(),
                       "teacher_text": F.normalize(text_suffix(clip, xt, tok, depths["text"]), dim=-1).cpu().numpy()}
        gen = batches()
        first = next(gen)
        features = datasets_quiet().Features({c: _array(first[c].shape[1:]) for c in FEATURE_COLUMNS})
        _write(path, itertools.chain([first], gen), features)
    return FeatureStore(touch(path), "image")


@torch.no_grad()
def benchmark_features(lm, model_key: str, depth: int, images: ImageStore, cache_dir: Path, device="cpu",
                       batch_size: int = 128) -> FeatureStore:
    """The image-tower prefix tokens ``[N, T, W]`` of every image of a benchmark's store (all of it: its
    validation and test parts are views), built once under ``<cache>/stores``; rows follow the store's file."""
    whole = images.whole()
    path = store_cache(cache_dir) / f"prefix-bench-{fingerprint(model_key, whole.path.name, depth, _versions())}"
    if not is_store(path):
        clip = lm.model.to(device).eval()

        def batches():
            for i in range(0, len(whole), batch_size):
                yield {"image": image_prefix(clip, whole[i:i + batch_size].to(device), depth).cpu().numpy()}
        gen = batches()
        first = next(gen)
        _write(path, itertools.chain([first], gen), datasets_quiet().Features({"image": _array(first["image"].shape[1:])}))
    return FeatureStore(touch(path), "image")


def _versions() -> str:
    import open_clip

    return f"torch {torch.__version__} open_clip {open_clip.__version__}"


def prefix_sets(lm, model_name: str, pretrained: Optional[str], depths: dict[str, int], sets, cache_dir: Path,
                device="cpu") -> list:
    """``sets`` (:class:`~.benchmarks.EvalSet`) with their images replaced by image-prefix tokens (views of
    one store per benchmark, built once)."""
    from dataclasses import replace

    key = model_id(model_name, pretrained)
    stores = {}
    out = []
    for s in sets:
        if s.images.path not in stores:
            stores[s.images.path] = benchmark_features(lm, key, depths["image"], s.images, cache_dir, device)
        out.append(replace(s, images=stores[s.images.path].subset(s.images.positions)))
    return out
