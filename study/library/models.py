"""Base models: any open_clip model, or the project's own small CLIP built offline.

``load_base_model`` takes an open_clip model name with

* a pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``),
* a local checkpoint path (``pretrained: /path/to/ckpt.pt``),
* or an ``hf-hub:org/repo`` id (the tag is ignored),

and for the offline default, ``clip-study-tiny`` with no tag, it pretrains the
small model on the generated general domain once and caches the weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import posixpath
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
OFFLINE_MODEL = "clip-study-tiny"
_registered = False


class ModelError(ValueError):
    """An unusable model name, tag or checkpoint; the message names the field."""


def register_configs() -> None:
    """Make the project's model configs (``study/model_configs/*.json``) known to open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def check_model(name: str, pretrained: str | None, where: str = "model") -> None:
    """Validate a model name and tag without loading weights or touching the network."""
    import open_clip

    register_configs()
    if name.startswith(("hf-hub:", "local-dir:")):
        if name.startswith("local-dir:") and not Path(name.split(":", 1)[1]).is_dir():
            raise ModelError(f"{where}.name: directory {name.split(':', 1)[1]!r} does not exist")
        return
    if name not in open_clip.list_models():
        raise ModelError(f"{where}.name: unknown open_clip model {name!r} "
                         f"(see open_clip.list_models(); or use 'hf-hub:org/repo')")
    if pretrained is None:
        if name != OFFLINE_MODEL:
            raise ModelError(f"{where}.pretrained: {name!r} needs a pretrained tag or a checkpoint path; "
                             f"tags: {open_clip.list_pretrained_tags_by_model(name)}")
        return
    if is_checkpoint_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise ModelError(f"{where}.pretrained: checkpoint {pretrained!r} does not exist")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelError(f"{where}.pretrained: unknown tag {pretrained!r} for {name!r}; tags: {tags}")


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether ``pretrained`` names a weights file (by its suffix, or a ``/`` in it) rather than an open_clip tag."""
    return Path(pretrained).expanduser().suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in pretrained


def weights_source(name: str, pretrained: str | None) -> str:
    """Where the weights of model ``name`` come from, in words, for every place that names a model (``study.evaluate``,
    the summary, the report, the sweep's MLflow params): an open_clip tag with the Hub repo (and file) it resolves to
    (``open_clip.get_pretrained_cfg(name, tag)["hf_hub"]``), a checkpoint file, a Hub repo (``hf-hub:``), the offline
    pretraining, or random init. ``pretrained`` as configured: a tag, a path, or None."""
    import open_clip

    if name.startswith("hf-hub:"):
        return f"Hugging Face Hub repo {name.removeprefix('hf-hub:')} (open_clip_config.json and its weights)"
    if name.startswith("local-dir:"):
        return f"local folder {name.split(':', 1)[1]}"
    if pretrained is None:
        return "offline pretraining on the generated general domain" if name == OFFLINE_MODEL else "random init"
    if is_checkpoint_path(pretrained):
        return f"checkpoint {pretrained}"
    cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    repo, file = posixpath.split(cfg.get("hf_hub") or "")  # open_clip's own split: "org/repo/" or "org/repo/file"
    if repo:
        return f"open_clip tag {pretrained}: Hugging Face Hub repo {repo}" + (f", file {file}" if file else "")
    return f"open_clip tag {pretrained}: {cfg.get('url') or 'no download location known'}"


def quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether tag ``pretrained`` of ``name`` was trained with QuickGELU (OpenAI's weights: ViT-B-16 + ``openai``),
    which open_clip's plain ``ViT-B-16`` config lacks: open_clip only warns ("QuickGELU mismatch") and builds GELU,
    a different network from the one the weights were trained in."""
    import open_clip

    if pretrained is None or name.startswith(("hf-hub:", "local-dir:")) or is_checkpoint_path(pretrained):
        return False
    return bool((open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu", False))


def _no_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: object  # torchvision transform: PIL image -> [3, H, W]
    tokenizer: object   # list[str] -> LongTensor [N, context_length]


def load_base_model(name: str, pretrained: str | None, device="cpu", trainable: bool = False) -> LoadedModel:
    """Build ``name`` and load its weights (tag, local file, or hf-hub) with ``weights_only=True``.

    The model comes frozen (no parameter requires grad) unless ``trainable``: the base model is frozen
    everywhere but in pretraining, and PyTorch's CPU kernels can differ in the last bit between frozen and
    trainable weights, so the baseline, every trial's frozen parts and WiSE-FT's alpha = 0 must all see
    the same state to agree bit for bit.
    """
    import open_clip

    register_configs()
    # open_clip narrates every step on the root logger; keep warnings, except the expected
    # "no pretrained weights" when the offline model is built from scratch for pretraining.
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR if pretrained is None and name == OFFLINE_MODEL else logging.WARNING)
    root.addFilter(_no_errors)  # a failed load is reported once, as a ModelError, not also as a log record
    hub = logging.getLogger("huggingface_hub")  # its retries of an unreachable Hub print a line each
    hub_level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        if name.startswith("hf-hub:"):  # open_clip only warns when the repo's weights are missing, and builds a
            # randomly initialised model under the Hub repo's name; fetch (or find in the cache) the weights first
            open_clip.pretrained.download_pretrained_from_hf(name.removeprefix("hf-hub:"))
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True,
            force_quick_gelu=quick_gelu(name, pretrained))
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError, EOFError) as exc:
        raise ModelError(load_failure(name, pretrained, exc)) from None
    finally:
        root.setLevel(saved)
        root.removeFilter(_no_errors)
        hub.setLevel(hub_level)
    model.requires_grad_(trainable)
    return LoadedModel(model, preprocess, tokenizer)


def load_failure(name: str, pretrained: str | None, exc: BaseException) -> str:
    """One line on why open_clip could not build ``name`` with ``pretrained``: a file that is not a
    state dict of that architecture, or weights that cannot be downloaded (offline, unknown repo)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    first = next((ln for ln in lines if ln.startswith(("Missing key", "Unexpected key", "size mismatch"))), lines[0])
    if pretrained and Path(pretrained).expanduser().is_file():
        why = ("not a PyTorch checkpoint that loads with weights_only=True" if isinstance(
            exc, (pickle.UnpicklingError, EOFError)) else f"{type(exc).__name__}: {first[:200]}")
        return f"model.pretrained: checkpoint {pretrained!r} does not load into {name!r}: {why}"
    what = f"model.name: {name!r}" if name.startswith("hf-hub:") else f"model.pretrained: tag {pretrained!r} of {name!r}"
    return (f"{what}: the weights cannot be loaded (downloads need the network, or a copy in the Hugging Face "
            f"cache): {type(exc).__name__}: {first[:300]}")


def model_config(name: str) -> dict:
    register_configs()
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())
