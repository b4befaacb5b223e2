"""The trainable alignment module: the last K blocks of the chosen towers as the trial's method trains them, the
projections and the temperature.

Methods (``TrialSettings.method``), each on the last K residual blocks of each tower in ``lora_towers``:

- ``lora``: peft LoRA adapters on ``lora_targets`` (the block weights stay frozen);
- ``full``: every parameter of those blocks (attention, MLP, LayerNorms);
- ``bitfit``: their bias terms only, LayerNorm biases included (BitFit, Ben Zaken et al., arXiv 2106.10199);
- ``attention``: the attention module's own parameters (``attn.in_proj_*``, ``attn.out_proj.*``), no adapters;
- ``projections``: no block; only the projection heads and the temperature.

open_clip's residual blocks hold an ``nn.MultiheadAttention`` (``attn``) and an
MLP (``mlp.c_fc``, ``mlp.c_proj``). peft >= 0.14 wraps a whole
``nn.MultiheadAttention`` (its ``in_proj`` and ``out_proj`` together); targeting
``out_proj`` alone would train nothing, because the attention module never calls
that Linear's forward. The projections are raw ``nn.Parameter``s that peft
cannot wrap, so their ``requires_grad`` is set here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..settings import TrialSettings

TOWER_PREFIX = {"image": "visual.transformer.resblocks", "text": "transformer.resblocks"}
PROJECTIONS = ("visual.proj", "text_projection")
#: which parameters of a trained block each method without adapters trains, by name inside the block
BLOCK_PARAMETERS = {
    "full": lambda name: True,
    "bitfit": lambda name: name.rpartition(".")[2].endswith("bias"),  # attn.in_proj_bias, mlp.c_fc.bias, ln_1.bias
    "attention": lambda name: name.startswith("attn."),
}


def trained_blocks(model: torch.nn.Module, s: TrialSettings) -> list[str]:
    """Module names of the residual blocks ``s`` trains: the last ``s.trained_blocks`` of each tower in
    ``s.lora_towers``, e.g. ``["visual.transformer.resblocks.2", "transformer.resblocks.2"]``."""
    out = []
    for tower in s.lora_towers if s.trained_blocks else []:
        prefix = TOWER_PREFIX[tower]
        blocks = sorted({int(m.group(1)) for n, _ in model.named_modules()
                         if (m := re.fullmatch(re.escape(prefix) + r"\.(\d+)", n))})
        out += [f"{prefix}.{b}" for b in blocks[max(0, len(blocks) - s.trained_blocks):]]
    return out


def lora_target_regex(model: torch.nn.Module, s: TrialSettings) -> str | None:
    """Full-match regex over module names for the LoRA targets (None when the method is not LoRA, or LoRA is off)."""
    names = []
    for block in trained_blocks(model, s) if s.method == "lora" else []:
        if "attn" in s.lora_targets:
            names.append(f"{block}.attn")
        if "mlp" in s.lora_targets:
            names += [f"{block}.mlp.c_fc", f"{block}.mlp.c_proj"]
    return "|".join(re.escape(n) for n in names) or None


def block_parameters(model: torch.nn.Module, s: TrialSettings) -> list[str]:
    """Names of the block parameters a method without adapters (``full``, ``bitfit``, ``attention``) trains in
    ``model`` (open_clip's, unwrapped); ``[]`` for ``lora`` and ``projections``."""
    keep = BLOCK_PARAMETERS.get(s.method)
    if keep is None:
        return []
    return [f"{block}.{n}" for block in trained_blocks(model, s)
            for n, _ in model.get_submodule(block).named_parameters() if keep(n)]


def apply_alignment_module(model: torch.nn.Module, s: TrialSettings) -> torch.nn.Module:
    """Freeze ``model`` and make only the alignment module of ``s.method`` trainable; returns the model (peft-wrapped
    for LoRA)."""
    for p in model.parameters():
        p.requires_grad_(False)
    target = lora_target_regex(model, s)
    if target:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha or 2 * s.lora_rank, lora_dropout=0.0,
                         target_modules=f"^(?:{target})$", bias="none")
        model = get_peft_model(model, cfg)
    for name in block_parameters(model, s):
        model.get_parameter(name).requires_grad_(True)
    base = unwrap(model)
    for name in PROJECTIONS:
        if _has(base, name):
            base.get_parameter(name).requires_grad_(s.train_projections)
    base.logit_scale.requires_grad_(s.train_logit_scale)
    return model


def _has(module, name) -> bool:
    try:
        return isinstance(module.get_parameter(name), torch.nn.Parameter)
    except AttributeError:
        return False


def undistributed(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (peft's wrapper kept: its parameter names are the checkpoint's)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip CLIP module under DDP and peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every trainable tensor, keyed by name under the peft wrapper."""
    m = undistributed(model)
    return {n: p.detach().cpu().clone() for n, p in m.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into the model's trainable tensors in place."""
    m = undistributed(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def tower_is_frozen(s: TrialSettings, tower: str) -> bool:
    """True when a trial leaves ``tower`` (``image``/``text``) exactly as the base model has it."""
    return not (s.trained_blocks and tower in s.lora_towers) and not s.train_projections


def weight_change_norm(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> float:
    """‖ΔW‖: Frobenius norm of the change to the effective weights of the trainable part.

    For a LoRA Linear that is the delta ``scale * B @ A`` peft adds to the frozen weight. For a LoRA
    ``nn.MultiheadAttention`` it is measured from the weights peft's own merge produces (the merge its forward
    runs on every call): peft <= 0.21 adds the ``out_proj`` delta twice there, once in the attention's merge
    and once in the nested Linear's (huggingface/peft#3774), so the effective change is not the sum of the
    layers' ``get_delta_weight``. For every other trainable tensor (the projections and temperature, and the block
    weights of ``full``, ``bitfit`` and ``attention``), the change from ``initial``.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

    m = undistributed(model)
    total = 0.0
    with torch.no_grad():
        nested = {id(mod.get_base_layer().out_proj) for mod in m.modules() if isinstance(mod, LoraMHA)}
        for module in m.modules():
            if isinstance(module, LoraMHA):
                total += _merged_change(module) ** 2
            elif isinstance(module, LoraLayer) and id(module) not in nested:
                for adapter in module.active_adapters:
                    total += float(module.get_delta_weight(adapter).float().pow(2).sum())
        for n, p in m.named_parameters():
            if p.requires_grad and "lora_" not in n and n in initial:
                total += float((p.detach().cpu().float() - initial[n].float()).pow(2).sum())
    return total ** 0.5


def _merged_change(module) -> float:
    """‖ΔW‖ of a peft LoRA ``MultiheadAttention``'s in_proj and out_proj weights, as its merge applies them."""
    base = module.get_base_layer()
    before = [base.in_proj_weight.detach().clone(), base.out_proj.get_base_layer().weight.detach().clone()]
    module.merge()
    try:
        after = [base.in_proj_weight.detach(), base.out_proj.get_base_layer().weight.detach()]
        return float(sum((a.float() - b.float()).pow(2).sum() for a, b in zip(after, before))) ** 0.5
    finally:
        module.unmerge()


def save_adapter(model: torch.nn.Module, out_dir: Path) -> Path:
    """Write the peft adapter (if any) and the other trainable tensors (the projections and temperature, and the
    trained block tensors of a method without adapters) as safetensors under ``out_dir``: only what trains."""
    from safetensors.torch import save_file

    m = undistributed(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(m, "save_pretrained"):
        m.save_pretrained(str(out_dir))
    extra = {n: p.detach().cpu().contiguous() for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n}
    if extra:
        save_file(extra, str(out_dir / "alignment_params.safetensors"))
    return out_dir
