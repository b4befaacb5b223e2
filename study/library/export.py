"""A trial's fine-tuned model as a plain open_clip model: the base weights, the trial's adapter (``save_adapter``'s
folder: LoRA adapters, or the trained block tensors of a method without adapters, and the projections and
temperature) loaded back, an optional WiSE-FT alpha, and LoRA merged into the weights.

:func:`trained_model` rebuilds the trial's peft model exactly as the worker had it at its last epoch;
:func:`merged_clip` folds the adapters in (peft's ``merge_and_unload``), so the result is open_clip's own
``CLIP`` module with no peft layer left; :func:`write_checkpoint` saves its ``state_dict``, which
``open_clip.create_model_and_transforms(name, pretrained=path)`` loads.

peft <= 0.21 applies a LoRA ``nn.MultiheadAttention``'s ``out_proj`` delta twice, in its forward and in its
merge alike (huggingface/peft#3774). The merged model therefore computes what the trial trained and evaluated,
and ``weight_change_norm`` measures that same change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..settings import TrialSettings
from .alignment import apply_alignment_module, trainable_state, unwrap
from .models import LoadedModel, load_base_model

ADAPTER_FILE = "adapter_model.safetensors"      # peft's save_pretrained
ALIGNMENT_FILE = "alignment_params.safetensors"  # every other trained tensor: projections, temperature, blocks


class ExportError(ValueError):
    """An adapter folder that does not fit the trial's model or settings; the message names the file."""


def trained_model(model_name: str, pretrained: str | None, settings: TrialSettings, adapter_dir: Path,
                  alpha: float = 1.0) -> LoadedModel:
    """The trial's model on the CPU: base weights, the alignment module of ``settings`` and the tensors saved in
    ``adapter_dir``, with the trained change scaled by the WiSE-FT ``alpha`` (1: as trained, 0: the base model).

    Raises :class:`ExportError` when a file is missing or its tensors do not match the model."""
    from safetensors.torch import load_file

    from .wiseft import interpolate

    lm = load_base_model(model_name, pretrained)
    model = apply_alignment_module(lm.model, settings)
    initial = trainable_state(model)
    trained, loaded = dict(initial), set()
    for name in (ADAPTER_FILE, ALIGNMENT_FILE):
        path = adapter_dir / name
        if not path.exists():
            if name == ADAPTER_FILE and not any("lora_" in n for n in initial):
                continue  # a trial without LoRA saves no adapter
            if name == ALIGNMENT_FILE and all("lora_" in n for n in initial):
                continue
            raise ExportError(f"{path}: missing (expected from the trial's adapter artifact)")
        for n, t in load_file(str(path)).items():
            key = n if n in initial else _peft_key(n)
            if key not in initial or initial[key].shape != t.shape:
                raise ExportError(f"{path}: tensor {n!r} {tuple(t.shape)} does not fit {model_name} with these "
                                  f"settings (method {settings.method}, lora_rank {settings.lora_rank}, lora_blocks "
                                  f"{settings.lora_blocks})")
            trained[key] = t
            loaded.add(key)
    if missing := sorted(set(initial) - loaded):
        raise ExportError(f"{adapter_dir}: holds no tensor for {missing[0]!r} ({len(missing)} trained tensors missing; "
                          f"method {settings.method})")
    interpolate(model, initial, trained, alpha)
    return LoadedModel(model, lm.preprocess, lm.tokenizer)


def _peft_key(name: str) -> str:
    """peft's ``save_pretrained`` drops the adapter name: ``...lora_A.weight`` -> ``...lora_A.default.weight``."""
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.weight", f".{part}.default.weight")
    return name


def merged_clip(model: torch.nn.Module) -> torch.nn.Module:
    """open_clip's ``CLIP`` with every LoRA delta (at its current scale) added to the weights it adapts."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return unwrap(model)


def write_checkpoint(clip: torch.nn.Module, path: Path) -> Path:
    """Save ``clip.state_dict()`` (CPU tensors) at ``path``; ``open_clip.create_model_and_transforms(name,
    pretrained=path)`` loads it (also with ``weights_only=True``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}, path)
    return path
