"""The alignment module: what trains, what stays frozen, and the zero-shot protocol."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss

from study.library.alignment import apply_alignment_module, load_trainable_state, lora_target_regex, save_adapter, \
    tower_is_frozen, trainable_state, unwrap, weight_change_norm
from study.library.wiseft import interpolate
from study.settings import TrialSettings
from study.library.models import load_base_model
from study.library.zeroshot import accuracy_metrics, zero_shot_classifier


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return load_base_model("clip-study-tiny", None)


def _train(model, tokenizer, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 3, 32, 32)
    t = tokenizer([f"a red circle {i}" for i in range(8)])
    for _ in range(steps):
        img, txt, scale = model(x, t)
        loss = ClipLoss()(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_targets_last_k_blocks_of_chosen_towers(tiny):
    regex = lora_target_regex(tiny.model, TrialSettings(lora_blocks=2, lora_targets=["mlp"], lora_towers=["text"]))
    import re

    names = [n for n, _ in tiny.model.named_modules() if re.fullmatch(regex, n)]
    assert names == ["transformer.resblocks.1.mlp.c_fc", "transformer.resblocks.1.mlp.c_proj",
                     "transformer.resblocks.2.mlp.c_fc", "transformer.resblocks.2.mlp.c_proj"]


def test_only_alignment_params_train_and_base_is_untouched(tiny):
    s = TrialSettings(lora_targets=["mlp"], lora_rank=2)
    model = apply_alignment_module(tiny.model, s)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {
        "base_model.model.visual.proj", "base_model.model.text_projection", "base_model.model.logit_scale"}
    frozen = {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    _train(model, tiny.tokenizer)
    after = dict(unwrap(model).named_parameters())
    for n, p in frozen.items():  # exact: peft's Linear LoRA never writes the base weight
        assert torch.equal(p, after[n]), n
    changed = trainable_state(model)
    assert all(not torch.equal(before[n], changed[n]) for n in before if "lora_A" in n or "proj" in n)
    assert weight_change_norm(model, before) > 0


def test_attention_lora_keeps_base_weights_within_roundoff(tiny):
    # peft wraps nn.MultiheadAttention by merging the LoRA delta into in_proj_weight for each
    # forward and unmerging after, so the frozen weight round-trips through float arithmetic:
    # it must come back equal up to round-off, never drift by a training-sized step.
    model = apply_alignment_module(tiny.model, TrialSettings(lora_targets=["attn"], train_projections=False))
    frozen = {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if not p.requires_grad}
    _train(model, tiny.tokenizer)
    after = dict(unwrap(model).named_parameters())
    for n, p in frozen.items():
        torch.testing.assert_close(after[n], p, rtol=0, atol=1e-6)
    assert not unwrap(model).visual.proj.requires_grad


def test_adapter_artifact_round_trips(tiny, tmp_path):
    from safetensors.torch import load_file

    model = apply_alignment_module(tiny.model, TrialSettings(lora_rank=2))
    _train(model, tiny.tokenizer, steps=1)
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    extra = load_file(str(out / "alignment_params.safetensors"))
    torch.testing.assert_close(extra["base_model.model.visual.proj"], unwrap(model).visual.proj.detach())


def test_zero_shot_classifier_follows_clip_benchmark_protocol(tiny):
    model, tok = tiny.model.eval(), tiny.tokenizer
    classes, templates = ["circle", "square"], ["a {c}.", "a photo of a {c}."]
    w = zero_shot_classifier(model, tok, [[t.format(c=c) for t in templates] for c in classes], "cpu")
    assert w.shape == (64, 2)
    with torch.no_grad():
        for j, c in enumerate(classes):
            e = model.encode_text(tok([t.format(c=c) for t in templates]), normalize=True).mean(0)
            torch.testing.assert_close(w[:, j], e / e.norm())


def test_accuracy_metrics_balanced():
    logits = torch.tensor([[1.0, 0], [1, 0], [1, 0], [0, 1]])  # predicts 0,0,0,1
    labels = torch.tensor([0, 0, 1, 1])
    m = accuracy_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)


def test_tether_is_squared_distance_of_normalized_embeddings():
    from study.library.objective import tether_loss

    a = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    assert tether_loss(a, a) == 0
    torch.testing.assert_close(tether_loss(a, b), (2 - 2 * (a * b).sum(-1)).mean())


def test_detailed_metrics_intervals_and_paired_test():
    from study.library.zeroshot import detailed_metrics

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=gen)
    logits = torch.randn(400, 5, generator=gen)
    logits[torch.arange(400), labels] += 1.5
    pred = logits.argmax(1)
    m, confusion = detailed_metrics(logits, labels, baseline_pred=pred.tolist())
    assert m["top1_ci_low"] <= m["top1"] <= m["top1_ci_high"] and m["top1_ci_high"] - m["top1_ci_low"] < 0.15
    assert m["top1_gain"] == 0 and m["mcnemar_p"] == 1.0
    assert m["top1_gain_ci_low"] == m["top1_gain_ci_high"] == 0  # identical predictions: no paired spread
    assert confusion.sum() == 400 and confusion.trace() == int((pred == labels).sum())
    assert m["top5"] == 1.0 and len([k for k in m if k.startswith("recall/")]) == 5
    worse = labels.clone()  # a baseline right on every image: the trial's errors are all discordant
    m2, _ = detailed_metrics(logits, labels, baseline_pred=worse.tolist())
    assert m2["top1_gain"] < 0 and m2["top1_gain_ci_high"] < 0 and m2["mcnemar_p"] < 1e-6
    m3, _ = detailed_metrics(logits[:, :4], labels.clamp(max=3))
    assert "top5" not in m3


def test_wiseft_alpha_zero_is_the_base_model_bit_for_bit_and_one_the_finetuned(tiny):
    import copy

    s = TrialSettings(lora_blocks=2, lora_rank=4, lora_targets=["attn", "mlp"])
    pristine = copy.deepcopy(tiny.model).eval()
    model = apply_alignment_module(tiny.model, s)
    initial = trainable_state(model)
    _train(model, tiny.tokenizer, steps=5)
    trained = trainable_state(model)
    x, t = torch.randn(4, 3, 32, 32), tiny.tokenizer(["a red circle", "two squares", "a cell", "stain"])

    # As a trial does: a freshly loaded base model with the trained adapters, the change scaled by alpha.
    fresh = apply_alignment_module(copy.deepcopy(pristine), s).eval()
    load_trainable_state(fresh, trained)
    with torch.no_grad():
        interpolate(fresh, initial, trained, 0.0)
        assert torch.equal(fresh.encode_image(x), pristine.encode_image(x))
        assert torch.equal(fresh.encode_text(t), pristine.encode_text(t))
        interpolate(fresh, initial, trained, 1.0)
        torch.testing.assert_close(fresh.encode_image(x), model.eval().encode_image(x), atol=1e-5, rtol=1e-5)
        half = fresh.encode_image(x).clone()
        interpolate(fresh, initial, trained, 0.5)
        assert not torch.allclose(fresh.encode_image(x), half)  # alpha really moves the model


def test_tower_is_frozen_only_when_nothing_in_it_trains():
    assert tower_is_frozen(TrialSettings(lora_towers=["image"], train_projections=False), "text")
    assert not tower_is_frozen(TrialSettings(lora_towers=["image"], train_projections=False), "image")
    assert not tower_is_frozen(TrialSettings(lora_towers=["image"], train_projections=True), "text")
    assert tower_is_frozen(TrialSettings(lora_blocks=0, train_projections=False), "image")
