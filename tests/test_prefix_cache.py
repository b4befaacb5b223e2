"""The frozen-prefix feature cache: prefix then suffix computes the whole tower, and a trial served by the cache
trains, evaluates and interpolates (WiSE-FT) as one run on images does, within float round-off."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss

from study.library.alignment import apply_alignment_module, trainable_state, unwrap
from study.library.models import load_base_model
from study.library.prefix import (SuffixCLIP, SuffixEncoder, finetune_features, image_prefix, image_suffix,
                                  prefix_depths, prefix_sets, text_prefix, text_suffix, unsupported)
from study.settings import TrialSettings


def _perturb_lora(model) -> None:
    """Give every LoRA B a non-zero value, so the adapters change the output (peft starts them at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name,blocks", [("clip-study-tiny", 1), ("clip-study-tiny", 2), ("ViT-B-32", 2)])
def test_prefix_then_suffix_is_the_whole_tower(name, blocks):
    torch.manual_seed(0)
    lm = load_base_model(name, None)
    assert unsupported(lm.model) is None
    depths = prefix_depths(lm.model, blocks, {"image", "text"})
    total = len(lm.model.visual.transformer.resblocks)
    assert depths["image"] == total - blocks
    model = apply_alignment_module(lm.model, TrialSettings(lora_blocks=blocks, lora_rank=4)).eval()
    _perturb_lora(model)
    clip = unwrap(model)
    size = clip.visual.image_size
    x = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)))
    t = lm.tokenizer(["a red circle", "two cells with a dark stain", "three squares"])
    with torch.no_grad():
        whole_img, whole_txt = clip.encode_image(x), clip.encode_text(t)
        split_img = image_suffix(clip, image_prefix(clip, x, depths["image"]), depths["image"])
        split_txt = text_suffix(clip, text_prefix(clip, t, depths["text"]), t, depths["text"])
    torch.testing.assert_close(split_img, whole_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split_txt, whole_txt, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(whole_img, load_base_model(name, None).model.eval().encode_image(x), atol=1e-4)


def test_a_tower_no_trial_adapts_is_cached_after_its_last_block():
    lm = load_base_model("clip-study-tiny", None)
    assert prefix_depths(lm.model, 2, {"image"}) == {"image": 1, "text": 3}


def _study_pieces(smoke_world, smoke_cache: Path):
    from study.library.benchmarks import eval_sets
    from study.library.cache import model_id
    from study.library.finetune import decoded_finetune

    cfg, prepared = smoke_world
    lm = load_base_model(cfg.model.name, prepared.model_pretrained)
    depths = prepared.prefix_depths
    assert depths, "the smoke study runs with the cache"
    d = decoded_finetune(cfg.data.finetune, cfg.data, smoke_cache, lm.preprocess)
    tokens = lm.tokenizer(d["captions"])
    feats = finetune_features(lm, model_id(cfg.model.name, prepared.model_pretrained), depths, d["store"], tokens,
                              smoke_cache)
    sets = eval_sets(cfg.data, smoke_cache, lm.preprocess, validation_share=cfg.evaluation.validation_share)
    cached_sets = prefix_sets(lm, cfg.model.name, prepared.model_pretrained, depths, sets, smoke_cache)
    return cfg, prepared, lm, depths, d["store"], tokens, feats, sets, cached_sets


def test_cached_trial_trains_evaluates_and_interpolates_as_uncached(smoke_world, smoke_cache):
    from study.library.objective import alignment_loss, tether_targets
    from study.library.wiseft import wiseft_curve
    from study.library.zeroshot import evaluate_sets

    cfg, prepared, lm, depths, images, tokens, feats, sets, cached_sets = _study_pieces(smoke_world, smoke_cache)
    s = TrialSettings(lora_blocks=1, lora_rank=4, tether_weight=1.0, learning_rate=5e-3)  # fewer than cached: a
    # frozen block runs between prefix and adapters
    torch.manual_seed(0)
    plain = apply_alignment_module(copy.deepcopy(lm.model), s)
    torch.manual_seed(0)
    cached = SuffixCLIP(apply_alignment_module(copy.deepcopy(lm.model), s), depths)
    initial = trainable_state(plain)
    idx = torch.arange(32)
    teacher = tether_targets(lm.model, images.subset(idx.numpy()), tokens[idx], "cpu")
    batch = feats.read(idx, ["image", "text", "teacher_image", "teacher_text"])
    torch.testing.assert_close(batch["teacher_image"], teacher[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["teacher_text"], teacher[1], atol=1e-5, rtol=1e-5)
    losses = {}
    for name, net, inputs, target in (("plain", plain, (images[idx], tokens[idx]), teacher),
                                      ("cached", cached, (batch["image"], batch["text"], tokens[idx]),
                                       (batch["teacher_image"], batch["teacher_text"]))):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=s.learning_rate)
        losses[name] = []
        for _ in range(3):
            img, txt, scale = net(*inputs)
            loss = alignment_loss(ClipLoss(), img, txt, scale, s.tether_weight, *target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["plain"][-1] < losses["plain"][0]  # it trains
    torch.testing.assert_close(losses["cached"], losses["plain"], atol=1e-5, rtol=1e-5)
    trained = trainable_state(plain)
    for k, v in trainable_state(cached.model).items():
        torch.testing.assert_close(v, trained[k], atol=1e-5, rtol=1e-4)

    val = [x for x in sets if x.split == "val"]
    a, _, pred_a = evaluate_sets(unwrap(plain), lm.tokenizer, val, "cpu")
    b, _, pred_b = evaluate_sets(SuffixEncoder(unwrap(cached.model), depths), lm.tokenizer,
                                 [x for x in cached_sets if x.split == "val"], "cpu")
    assert pred_a == pred_b
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)

    args = (cfg.model.name, prepared.model_pretrained, s, trained, initial)
    rest = ("cpu", [0.0, 0.5, 1.0], "mean_top1", prepared.baseline)
    curve_a = wiseft_curve(*args, sets, *rest)
    curve_b = wiseft_curve(*args, cached_sets, *rest, depths=depths, memo={})
    assert curve_a.keys() == curve_b.keys() and all(abs(curve_a[k] - curve_b[k]) < 1e-6 for k in curve_a)
    zero = {k.replace("wiseft/alpha_0/", ""): v for k, v in curve_b.items() if k.startswith("val/wiseft/alpha_0/")}
    shared = [k for k in zero if k.endswith(("top1", "balanced_accuracy", "recall_at_1")) and k in prepared.baseline]
    assert len(shared) >= 3  # alpha 0 is the baseline (which the driver computed through the same cache)
    assert all(zero[k] == prepared.baseline[k] for k in shared)
