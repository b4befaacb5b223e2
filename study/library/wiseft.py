"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): the trained change scaled by alpha.

:func:`interpolate` scales one model in place; :func:`wiseft_curve` evaluates
every alpha of a study's grid and picks the one a trial reports. alpha = 0 is the
base model bit for bit, alpha = 1 the fine-tuned one.
"""

from __future__ import annotations

import torch

from ..settings import TrialSettings
from ..vocabulary import (HEADLINES, TEST, VAL, WISEFT_BEST, WISEFT_BEST_ALPHA, WISEFT_REPORTED, changes, headline,
                          key, wiseft_key)
from .alignment import apply_alignment_module, load_trainable_state, undistributed, unwrap
from .models import load_base_model
from .prefix import SuffixEncoder
from .zeroshot import evaluate_sets


def interpolate(model: torch.nn.Module, initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
                alpha: float) -> None:
    """WiSE-FT: scale the trained change by ``alpha`` in place.

    LoRA deltas are scaled through peft's ``set_scale`` (``alpha * lora_alpha / r``), since the delta
    ``B @ A`` is bilinear in the adapter weights; every other trained tensor (projections, temperature, the block
    weights of ``full``, ``bitfit`` and ``attention``) becomes ``initial + alpha * (trained - initial)``. ``alpha = 0`` gives the base model exactly (the delta is
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



def choose_alpha(validation: dict[float, dict], select: str) -> float:
    """The WiSE-FT alpha a trial reports: the one whose validation metrics (``{alpha: {"val/<metric>": value}}``, in
    the study's grid order) maximise ``select`` (e.g. ``mean_balanced_accuracy``); the first in grid order on a tie.
    Test metrics never enter the choice."""
    order = list(validation)
    return max(order, key=lambda a: (validation[a][key(VAL, select)], -order.index(a)))


def wiseft_curve(model_name: str, pretrained: str | None, settings: TrialSettings, trained: dict, initial: dict,
                 sets, device, alphas: list[float], select: str, baseline: dict, collapse_share: float = 0.9,
                 depths: dict | None = None, memo: dict | None = None) -> dict:
    """Evaluate the model with its trained change scaled by each of ``alphas`` on both parts of ``sets``, and pick
    the alpha that maximises ``select`` on the validation part alone (the first such alpha on a tie).

    ``trained``/``initial``: :func:`~study.library.alignment.trainable_state` after and before training;
    ``sets``: the study's :class:`~study.library.benchmarks.EvalSet` list (both parts); ``select``: a headline
    metric of one role or the mean of both (``specialized_top1``, ``general_balanced_accuracy``, ``mean_top1``,
    ``mean_balanced_accuracy``...). Returns flat metrics: ``val/wiseft/alpha_<a>/<metric>`` and
    ``test/wiseft/alpha_<a>/<metric>`` for every alpha (the test curve reports the trade-off, e.g. the exchange
    rate; it never chooses), ``wiseft_best_alpha``, and ``val/``/``test/wiseft_best_<metric>`` at that alpha.

    The interpolated models are built on a freshly loaded base model, so that alpha = 0 is the base
    model bit for bit (training drifts peft's merged attention weights by round-off). With ``depths`` (the
    frozen-prefix cache, :mod:`.prefix`), ``sets`` hold image-prefix tokens and only the suffix runs;
    ``memo`` keeps class-prompt text prefixes between calls.
    """
    lm = load_base_model(model_name, pretrained)
    model = apply_alignment_module(lm.model, settings).to(device)
    load_trainable_state(model, trained)

    encoder = SuffixEncoder(unwrap(model), depths, memo) if depths else model

    def scores(split: str) -> dict:
        values, _, _ = evaluate_sets(encoder, lm.tokenizer, [s for s in sets if s.split == split], device,
                                     seed=settings.seed, collapse_share=collapse_share)
        values.update(changes(values, baseline))
        for head in HEADLINES:  # mean_top1, mean_balanced_accuracy: both roles weighed alike
            values[key(split, f"mean_{head}")] = (values[key(split, headline("specialized", head))]
                                                  + values[key(split, headline("general", head))]) / 2
        return values

    out, curve = {}, {}
    for alpha in alphas:
        interpolate(model, initial, trained, alpha)
        curve[alpha] = {split: scores(split) for split in (VAL, TEST)}
        for values in curve[alpha].values():
            out.update({wiseft_key(alpha, k): v for k, v in values.items() if not k.endswith("images")})
    alpha = choose_alpha({a: curve[a][VAL] for a in alphas}, select)
    out[WISEFT_BEST_ALPHA] = alpha
    for split, values in curve[alpha].items():
        out.update({key(split, WISEFT_BEST + k): values[key(split, k)] for k in WISEFT_REPORTED if key(split, k) in values})
    return out
