"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): the trained change scaled by alpha.

:func:`interpolate` scales one model in place; :func:`wiseft_curve` evaluates
every alpha of a study's grid and picks the one a trial reports. alpha = 0 is the
base model bit for bit, alpha = 1 the fine-tuned one.
"""

from __future__ import annotations

import torch

from ..settings import TrialSettings
from ..vocabulary import WISEFT_BEST, WISEFT_BEST_ALPHA, WISEFT_REPORTED, changes, wiseft_key
from .alignment import apply_alignment_module, load_trainable_state, undistributed
from .models import load_base_model
from .zeroshot import evaluate_sets


def interpolate(model: torch.nn.Module, initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                alpha: float) -> None:
    """WiSE-FT: scale the trained change by ``alpha`` in place.

    LoRA deltas are scaled through peft's ``set_scale`` (``alpha * lora_alpha / r``), since the delta
    ``B @ A`` is bilinear in the adapter weights; projections and temperature become
    ``initial + alpha * (trained - initial)``. ``alpha = 0`` gives the base model exactly (the delta is
    multiplied by zero), ``alpha = 1`` the fine-tuned one.
    """
    from peft.tuners.lora import LoraLayer

    m = undistributed(model)
    for module in m.modules():
        if isinstance(module, LoraLayer):
            for adapter in list(module.scaling):
                module.set_scale(adapter, alpha)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n, t in trained.items():
            params[n].copy_(t if "lora_" in n else initial[n] + alpha * (t - initial[n]))



def wiseft_curve(model_name: str, pretrained: str | None, settings: TrialSettings, trained: dict, initial: dict,
                 sets, device, alphas: list[float], select: str, baseline: dict) -> dict:
    """Evaluate the model with its trained change scaled by each of ``alphas`` and pick the best alpha.

    ``trained``/``initial``: :func:`~study.library.alignment.trainable_state` after and before training;
    ``sets``: the study's :class:`~study.library.benchmarks.EvalSet` list; ``select``: the metric the chosen
    alpha maximises (``specialized_top1``, ``general_top1`` or ``mean_top1``). Returns flat metrics:
    ``wiseft/alpha_<a>/<metric>`` for every alpha, ``wiseft_best_alpha`` and ``wiseft_best_<metric>``.

    The interpolated models are built on a freshly loaded base model, so that alpha = 0 is the base
    model bit for bit (training drifts peft's merged attention weights by round-off).
    """
    lm = load_base_model(model_name, pretrained)
    model = apply_alignment_module(lm.model, settings).to(device)
    load_trainable_state(model, trained)
    out, best = {}, None
    for alpha in alphas:
        interpolate(model, initial, trained, alpha)
        values, _, _ = evaluate_sets(model, lm.tokenizer, sets, device, seed=settings.seed)
        values.update(changes(values, baseline))
        values["mean_top1"] = (values["specialized_top1"] + values["general_top1"]) / 2
        out.update({wiseft_key(alpha, k): v for k, v in values.items() if not k.endswith("images")})
        if best is None or values[select] > best[1][select]:
            best = (alpha, values)
    alpha, values = best
    out[WISEFT_BEST_ALPHA] = alpha
    out.update({WISEFT_BEST + k: values[k] for k in WISEFT_REPORTED if k in values})
    return out
