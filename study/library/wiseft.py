"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): the trained change scaled by alpha.

:func:`interpolate` scales one model in place; :func:`wiseft_curve` evaluates
every alpha of a study's grid and picks the one a trial reports. alpha = 0 is the
base model bit for bit, alpha = 1 the fine-tuned one.
"""

from __future__ import annotations

import torch

from ..settings import TrialSettings
from ..vocabulary import (GENERAL_TOP1, SPECIALIZED_TOP1, TEST, VAL, WISEFT_BEST, WISEFT_BEST_ALPHA, WISEFT_REPORTED,
                          changes, key, wiseft_key)
from .alignment import apply_alignment_module, load_trainable_state, undistributed, unwrap
from .models import load_base_model
from .prefix import SuffixEncoder
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
                 sets, device, alphas: list[float], select: str, baseline: dict, collapse_share: float = 0.9,
                 depths: dict | None = None, memo: dict | None = None) -> dict:
    """Evaluate the model with its trained change scaled by each of ``alphas`` on the validation parts of
    ``sets``, pick the alpha that maximises ``select`` there, and score the test parts at that alpha only.

    ``trained``/``initial``: :func:`~study.library.alignment.trainable_state` after and before training;
    ``sets``: the study's :class:`~study.library.benchmarks.EvalSet` list (both parts); ``select``:
    ``specialized_top1``, ``general_top1`` or ``mean_top1``. Returns flat metrics:
    ``val/wiseft/alpha_<a>/<metric>`` for every alpha, ``wiseft_best_alpha``, ``val/wiseft_best_<metric>``
    and ``test/wiseft_best_<metric>``.

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
        values[key(split, "mean_top1")] = (values[key(split, SPECIALIZED_TOP1)] + values[key(split, GENERAL_TOP1)]) / 2
        return values

    out, best = {}, None
    for alpha in alphas:
        interpolate(model, initial, trained, alpha)
        values = scores(VAL)
        out.update({wiseft_key(alpha, k): v for k, v in values.items() if not k.endswith("images")})
        if best is None or values[key(VAL, select)] > best[1][key(VAL, select)]:
            best = (alpha, values)
    alpha, val_values = best
    interpolate(model, initial, trained, alpha)
    test_values = scores(TEST)
    out[WISEFT_BEST_ALPHA] = alpha
    for split, values in ((VAL, val_values), (TEST, test_values)):
        out.update({key(split, WISEFT_BEST + k): values[key(split, k)] for k in WISEFT_REPORTED if key(split, k) in values})
    return out
