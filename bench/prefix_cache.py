"""The frozen-prefix feature cache on and off (:mod:`study.library.prefix`), measured side by side in one process.

For the offline model's architecture (``clip-study-tiny``, 3 blocks per tower) and ViT-B-32 (12 blocks), both with
random weights, LoRA rank 4 on attention and MLP of the last K blocks of both towers, projections and temperature
trained, batch 32, one thread:

* ``step``: one training step (forward, contrastive + tether loss, backward, AdamW) on images, against the same
  step on the cached prefix tokens (:class:`~study.library.prefix.SuffixCLIP`);
* ``eval``: zero-shot evaluation of a batch of images against 10 classes x 2 prompts, whole towers against the
  suffix on cached tokens (class prompts' prefixes kept in memory, as from a trial's second epoch on);
* the largest difference between the two in the loss (over the steps) and in the class logits.

The prefix itself is computed once per study, so it is not timed here. Goal (issue 13): on ViT-B-32 at K=2 of
12, a cached step <= 0.33 of an uncached one and a cached evaluation <= 0.2.

    python bench/prefix_cache.py            # 6 steps and 128 images per model (about 3 minutes on 2 cores)
    python bench/prefix_cache.py --quick    # 2 steps, 32 images
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def _timed(fn, repeats: int) -> tuple[float, list]:
    """Median seconds of ``repeats`` calls after one warm-up call; and every call's result."""
    out = [fn()]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out.append(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _trainer(net, inputs, teacher, weight=1.0):
    from open_clip.loss import ClipLoss

    from study.library.objective import alignment_loss

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = ClipLoss()

    def step():
        img, txt, scale = net(*inputs)
        loss = alignment_loss(loss_fn, img, txt, scale, weight, *teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()
    return step


def measure(name: str, blocks: int, steps: int, images: int, batch: int = 32) -> list[dict]:
    """Rows for one model: step and evaluation time with the cache off and on, and their differences."""
    import torch.nn.functional as F

    from study.library.alignment import apply_alignment_module, unwrap
    from study.library.models import load_base_model
    from study.library.prefix import (SuffixCLIP, SuffixEncoder, image_prefix, image_suffix, prefix_depths,
                                      text_prefix, text_suffix)
    from study.library.zeroshot import zero_shot_classifier
    from study.settings import TrialSettings

    torch.manual_seed(0)
    lm = load_base_model(name, None)
    size = lm.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    depths = prefix_depths(lm.model, blocks, {"image", "text"})
    x, t = torch.randn(batch, 3, *size), lm.tokenizer([f"a cell with {i} dark nuclei" for i in range(batch)])
    with torch.no_grad():  # once per study: the prefix tokens and the tether's targets
        xi, xt = image_prefix(lm.model, x, depths["image"]), text_prefix(lm.model, t, depths["text"])
        teacher = (F.normalize(image_suffix(lm.model, xi, depths["image"]), dim=-1),
                   F.normalize(text_suffix(lm.model, xt, t, depths["text"]), dim=-1))
    s = TrialSettings(lora_blocks=blocks, lora_rank=4)
    torch.manual_seed(1)
    plain = apply_alignment_module(copy.deepcopy(lm.model), s)
    torch.manual_seed(1)
    cached = SuffixCLIP(apply_alignment_module(copy.deepcopy(lm.model), s), depths)
    step_off, loss_off = _timed(_trainer(plain, (x, t), teacher), steps)
    step_on, loss_on = _timed(_trainer(cached, (xi, xt, t), teacher), steps)

    ev = torch.randn(images, 3, *size)
    prompts = [[f"a photo of class {c}", f"a micrograph of class {c}"] for c in range(10)]
    with torch.no_grad():
        ev_prefix = torch.cat([image_prefix(lm.model, ev[i:i + 64], depths["image"]) for i in range(0, images, 64)])
        clip, enc = unwrap(plain).eval(), SuffixEncoder(unwrap(cached.model).eval(), depths)

        def logits(model, feats):
            img = torch.cat([F.normalize(model.encode_image(feats[i:i + 64]), dim=-1) for i in range(0, len(feats), 64)])
            return img @ zero_shot_classifier(model, lm.tokenizer, prompts, "cpu")
        eval_off, lo = _timed(lambda: logits(clip, ev), max(1, steps // 2))
        eval_on, lc = _timed(lambda: logits(enc, ev_prefix), max(1, steps // 2))
    total = len(lm.model.visual.transformer.resblocks)
    label = f"{name} (random weights), K={blocks} of {total}"
    loss_diff = max(abs(a - b) for a, b in zip(loss_off, loss_on))
    logit_diff = float((lo[-1] - lc[-1]).abs().max())
    return [{"name": f"(d) {label}: training step", "baseline": step_off, "measured": step_on,
             "ratio": step_on / step_off, "unit": "s/step", "max_loss_diff": loss_diff},
            {"name": f"(d) {label}: evaluation of {images} images", "baseline": eval_off, "measured": eval_on,
             "ratio": eval_on / eval_off, "unit": "s", "max_logit_diff": logit_diff,
             "same_predictions": bool(torch.equal(lo[-1].argmax(1), lc[-1].argmax(1)))}]


def rows(quick: bool) -> list[dict]:
    """Both models' rows (one thread, as one worker with ``cpus_per_worker: 1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps, images = (2, 32) if quick else (6, 128)
        return (measure("clip-study-tiny", 2, steps, images) + measure("clip-study-tiny", 1, steps, images)
                + measure("ViT-B-32", 2, steps, images))
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke check of the harness)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    out = rows(args.quick)
    for r in out:
        extra = ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k.startswith(("max_", "same_")))
        print(f"{r['name']:<62} off {r['baseline']:.4f} {r['unit']:<6} on {r['measured']:.4f}  "
              f"ratio {r['ratio']:.3f}  ({extra})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
