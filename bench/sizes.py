"""Real model sizes on CPU: memory and time of one trial's worker for ViT-B-32, ViT-B-16 and ViT-L-14.

For each model (open_clip's architecture, random weights: the shapes, not the values, set memory and time), each
K = ``lora_blocks`` (LoRA rank 4 on attention and MLP of the last K blocks of both towers, projections and
temperature trained, tether weight 1: the study's default knobs) and each global batch size, one process does what a
trial's worker does with the frozen-prefix feature cache (the study's default path, :mod:`study.library.prefix`):

* loads the base model, wraps the alignment module and builds the trainable suffix (``SuffixCLIP``);
* runs training steps exactly as ``study.orchestration.worker.train_epoch`` does (contrastive + tether loss, AdamW,
  the LR schedule, the logit-scale clamp) on one batch of prefix tokens of the right shape. The tokens are random
  with the scale of the real ones: a step's cost does not depend on their values, and computing real ones for 256
  images through 22 blocks of ViT-L-14 would take longer than everything else here;
* then loads a second copy of the base model, as the WiSE-FT curve does after the last epoch.

It reports the peak RSS of that process (``VmHWM``: everything resident, model, activations, Python, torch), the
RSS before the first step, the fastest timed step after one warm-up step (two timed steps by default) in wall
seconds and in CPU seconds of the process (all its threads: on a machine others share, CPU time is disturbed far
less than wall time; on ``--threads`` idle cores a step's wall time is about CPU time / threads), and the
parameter counts.

Separately, per model, the frozen-prefix stores are built for real (``finetune_features`` and
``benchmark_features`` on 8 and 16 generated images) and their size per 1,000 images is the difference, scaled:
a fine-tuning pair stores its image and text prefix tokens and the two tether targets, a benchmark image its image
prefix tokens, each in float32. (A store's size does not depend on K: it holds one block's output either way.)

Then it estimates the GPU memory one trial needs: weights (4 bytes a parameter), the step's own memory as measured
here (peak minus the RSS before the first step: activations kept for the backward pass, gradients, AdamW's state,
the batch), and 1 GiB for the CUDA context and cuBLAS workspace; at the end, WiSE-FT holds a second copy of the
weights. bf16 autocast halves the activations, roughly. These are estimates from CPU measurements, not GPU ones.

Each measurement runs in its own process, with ``--threads`` torch threads (default 2). Times on a shared machine
vary from run to run; the memory does not.

    python bench/sizes.py                      # 3 models x K 1, 2 x batch 64, 256 (about an hour on 2 busy cores)
    python bench/sizes.py --quick              # batch 64 only, ViT-B-32 and ViT-B-16 (about 5 minutes)
    python bench/sizes.py --models ViT-L-14 --batches 256 --blocks 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ["ViT-B-32", "ViT-B-16", "ViT-L-14"]
CUDA_OVERHEAD_GIB = 1.0


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def prefix_batch(lm, depths: dict, batch: int):
    """``(image prefix [B, T, W], text prefix [B, L, W'], tokens [B, L], teacher image, teacher text)``: one real
    image's and caption's prefix computed, the batch drawn at their scale."""
    import torch
    import torch.nn.functional as F

    from study.library.prefix import image_prefix, text_prefix

    size = lm.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    tokens = lm.tokenizer([f"a micrograph of {i} rod-shaped bacteria, gram stain" for i in range(batch)])
    with torch.no_grad():
        xi = image_prefix(lm.model, torch.randn(1, 3, *size), depths["image"])
        xt = text_prefix(lm.model, tokens[:1], depths["text"])
    gen = torch.Generator().manual_seed(0)
    dim = lm.model.text_projection.shape[1]
    return (torch.randn(batch, *xi.shape[1:], generator=gen) * xi.std(),
            torch.randn(batch, *xt.shape[1:], generator=gen) * xt.std(), tokens,
            F.normalize(torch.randn(batch, dim, generator=gen), dim=-1),
            F.normalize(torch.randn(batch, dim, generator=gen), dim=-1))


def job_step(name: str, blocks: int, batch: int, steps: int, threads: int) -> dict:
    """One worker's training steps on the cached prefix, then WiSE-FT's second copy of the base model."""
    import torch
    from open_clip.loss import ClipLoss

    from study.library.alignment import apply_alignment_module
    from study.library.models import load_base_model
    from study.library.objective import alignment_loss, autocast_for, clamp_logit_scale, lr_lambda
    from study.library.prefix import SuffixCLIP, prefix_depths
    from study.settings import TrialSettings

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lm = load_base_model(name, None)
    params = sum(p.numel() for p in lm.model.parameters())
    depths = prefix_depths(lm.model, blocks, {"image", "text"})
    xi, xt, tokens, teacher_img, teacher_txt = prefix_batch(lm, depths, batch)
    s = TrialSettings(lora_blocks=blocks, lora_rank=4, tether_weight=1.0, batch_size=batch)
    model = apply_alignment_module(lm.model, s)
    net = SuffixCLIP(model, depths)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=s.learning_rate, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup_steps, 100))
    autocast, scaler = autocast_for(torch.device("cpu"), "fp32")
    loss_fn = ClipLoss()
    net.train()
    before = status_kb("VmRSS") * 1024
    times, cpu, losses = [], [], []
    for _ in range(steps + 1):  # the first is a warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            img_f, txt_f, scale = net(xi, xt, tokens)
            loss = alignment_loss(loss_fn, img_f, txt_f, scale, s.tether_weight, teacher_img, teacher_txt)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        clamp_logit_scale(lm.model.logit_scale)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    train_peak = status_kb("VmHWM") * 1024
    second = load_base_model(name, None)  # WiSE-FT's fresh base model, beside the trained one
    del second
    return {"model": name, "blocks": blocks, "batch": batch, "threads": threads, "params": params,
            "trainable": sum(p.numel() for p in trainable), "rss_before_steps": before, "train_peak": train_peak,
            "peak": status_kb("VmHWM") * 1024, "s_per_step": min(times[1:]), "step_times": times,
            "cpu_s_per_step": min(cpu[1:]), "step_cpu_times": cpu,
            "losses": losses}


def job_store(name: str, threads: int, counts=(8, 16)) -> dict:
    """Bytes per 1,000 rows of the frozen-prefix stores (fine-tuning pairs; benchmark images), built for real."""
    import datasets
    import numpy as np
    import torch
    from PIL import Image

    from study.library.cache import model_id
    from study.library.models import load_base_model
    from study.library.prefix import benchmark_features, finetune_features, prefix_depths
    from study.library.store import build_store

    torch.set_num_threads(threads)
    lm = load_base_model(name, None)
    depths = prefix_depths(lm.model, 2, {"image", "text"})
    rng = np.random.default_rng(0)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            images = [Image.fromarray(rng.integers(0, 255, (240, 240, 3), dtype=np.uint8)) for _ in range(n)]
            ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
            store, _ = build_store(ds, "image", lm.preprocess, Path(tmp) / f"images-{n}", where="bench", progress=False)
            tokens = lm.tokenizer([f"a micrograph of {i} cocci" for i in range(n)])
            key = model_id(name, f"random-{n}")
            ft = finetune_features(lm, key, depths, store, tokens, Path(tmp) / f"c{n}")
            bench = benchmark_features(lm, key, depths["image"], store, Path(tmp) / f"c{n}")
            sizes[n] = {"finetune": folder_bytes(ft.path), "benchmark": folder_bytes(bench.path),
                        "images": folder_bytes(store.path)}
    lo, hi = counts
    per = {k: (sizes[hi][k] - sizes[lo][k]) / (hi - lo) * 1000 for k in sizes[lo]}
    return {"model": name, "per_1000": per, "sizes": {str(k): v for k, v in sizes.items()}}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_job(args: list[str], work: Path, tag: str) -> dict:
    """One job in a fresh process (its peak RSS is its own); its JSON."""
    out = work / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job-out", str(out), *args]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"[sizes] {tag}: exit status {proc.returncode}")
    result = json.loads(out.read_text())
    print(f"[sizes] {tag}: {time.time() - t0:.0f}s", flush=True)
    return result


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def gpu_estimate(row: dict) -> tuple[float, float]:
    """``(fp32, bf16)`` GiB one trial needs on a GPU, estimated from the CPU row (see the module docstring)."""
    weights = 4 * row["params"]
    own = max(0, row["train_peak"] - row["rss_before_steps"])
    fp32 = max(weights + own, 2 * weights) + CUDA_OVERHEAD_GIB * 2**30
    bf16 = max(weights + own / 2, 2 * weights) + CUDA_OVERHEAD_GIB * 2**30
    return fp32 / 2**30, bf16 / 2**30


def table(steps: list[dict], stores: dict) -> str:
    lines = ["| model | params | K | batch | trainable | peak RSS (GiB) | step's own (GiB) | s/step (wall) | "
             "CPU-s/step | prefix store / 1,000 pairs | / 1,000 benchmark images | GPU estimate fp32 / bf16 (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
        st = stores.get(r["model"], {}).get("per_1000", {})
        fp32, bf16 = gpu_estimate(r)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['blocks']} | {r['batch']} | "
                     f"{r['trainable'] / 1e6:.2f}M | {gib(r['peak'])} | {gib(r['train_peak'] - r['rss_before_steps'])} "
                     f"| {r['s_per_step']:.1f} | {r.get('cpu_s_per_step', float('nan')):.1f} | "
                     f"{st.get('finetune', float('nan')) / 1e9:.2f} GB | "
                     f"{st.get('benchmark', float('nan')) / 1e9:.2f} GB | {fp32:.1f} / {bf16:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--quick", action="store_true", help="batch 64, ViT-B-32 and ViT-B-16 only")
    ap.add_argument("--models", nargs="+", default=None, help=f"open_clip model names (default: {' '.join(MODELS)})")
    ap.add_argument("--blocks", nargs="+", type=int, default=[1, 2], help="K values (default: 1 2)")
    ap.add_argument("--batches", nargs="+", type=int, default=None, help="global batch sizes (default: 64 256)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up (default: 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each job (default: 2)")
    ap.add_argument("--json", help="also write every row to this file")
    ap.add_argument("--job", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--job-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        kind, name, *rest = args.job
        result = (job_step(name, int(rest[0]), int(rest[1]), int(rest[2]), args.threads) if kind == "step"
                  else job_store(name, args.threads))
        Path(args.job_out).write_text(json.dumps(result))
        return
    models = args.models or (MODELS[:2] if args.quick else MODELS)
    batches = args.batches or ([64] if args.quick else [64, 256])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stores, rows = {}, []
        for m in models:
            stores[m] = run_job(["--threads", str(args.threads), "--job", "store", m], work, f"store {m}")
            for k in args.blocks:
                for b in batches:
                    rows.append(run_job(["--threads", str(args.threads), "--job", "step", m, str(k), str(b),
                                         str(args.steps)], work, f"step {m} K={k} batch {b}"))
                    print(table(rows[-1:], stores).splitlines()[-1], flush=True)
                    if args.json:  # as it goes: a long run interrupted keeps its rows
                        Path(args.json).write_text(json.dumps({"steps": rows, "stores": stores}, indent=2))
    print(table(rows, stores))


if __name__ == "__main__":
    main()
