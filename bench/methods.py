"""What each fine-tuning method costs, against LoRA's, on ViT-B-32 (random weights) at K=2 of 12 blocks per tower.

Per method (``TrialSettings.method``: lora, full, bitfit, attention, projections), in a process of its own (peak
memory is a per-process high-water mark), one thread (a worker with ``cpus_per_worker: 1``), batch 32, the
projections and temperature trained as in every method, tether weight 1:

* ``step``: the median time of a training step (forward, contrastive + tether loss, backward, AdamW) over the
  trainable suffix on frozen-prefix tokens, as a trial runs with the cache (study.library.prefix);
* ``peak``: the process's peak resident memory during the steps (sampled every 2 ms), above what it held before the
  first one (the model, the inputs): activations kept for the backward, gradients, the optimizer's state;
* ``checkpoint``: the bytes of a trial's epoch checkpoint (``state.pt``: the trained tensors, their optimizer state
  and the scheduler's) and of its ``adapter/`` artifact (the trained tensors as safetensors).

Step and peak are also given as ratios against LoRA's (rank 4 on attention and MLP), measured in the same run.
It reports and asserts nothing.

    python bench/methods.py                # 4 timed steps per method (about 2-3 minutes on 2 cores)
    python bench/methods.py --quick        # 1 timed step, batch 8
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lora", "full", "bitfit", "attention", "projections")


class PeakRSS:
    """The process's resident memory sampled every ``interval`` seconds in a thread while the block runs: ``peak``
    is the largest sample above ``before``, the resident memory at entry once freed pages went back to the system
    (``malloc_trim``), so that memory the model's loading used and freed is not counted."""

    def __init__(self, interval: float = 0.002):
        import psutil  # a dependency of peft

        self.process, self.interval, self.peak = psutil.Process(), interval, 0

    def __enter__(self):
        import ctypes
        import threading

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the baseline may count freed pages
            pass
        self.before = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.before)
            self.done.wait(self.interval)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def measure(method: str, steps: int, batch: int, blocks: int = 2) -> dict:
    """One method's row, measured in this process (call it once per process: peak memory is the process's)."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from study.library.alignment import apply_alignment_module, trainable_state
    from study.library.models import load_base_model
    from study.library.objective import alignment_loss
    from study.library.prefix import SuffixCLIP, image_prefix, image_suffix, prefix_depths, text_prefix, text_suffix
    from study.settings import TrialSettings

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = load_base_model("ViT-B-32", None)
    depths = prefix_depths(lm.model, blocks, {"image", "text"})
    x = torch.randn(batch, 3, 224, 224)
    t = lm.tokenizer([f"a cell with {i} dark nuclei" for i in range(batch)])
    with torch.no_grad():  # once per study: the prefix tokens and the tether's targets
        xi = torch.cat([image_prefix(lm.model, x[i:i + 4], depths["image"]) for i in range(0, batch, 4)])
        xt = text_prefix(lm.model, t, depths["text"])
        teacher = (F.normalize(image_suffix(lm.model, xi, depths["image"]), dim=-1),
                   F.normalize(text_suffix(lm.model, xt, t, depths["text"]), dim=-1))
    del x
    s = TrialSettings(method=method, lora_blocks=blocks, lora_rank=4)
    model = apply_alignment_module(lm.model, s)
    net = SuffixCLIP(model, depths)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    loss_fn = ClipLoss()

    def step() -> float:
        img, txt, scale = net(xi, xt, t)
        loss = alignment_loss(loss_fn, img, txt, scale, 1.0, *teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    times = []
    with PeakRSS() as memory:
        step()  # warm-up: gradients and Adam's state are allocated here
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    buf = io.BytesIO()  # what the worker saves each epoch (study.orchestration.worker.checkpoint_and_report)
    torch.save({"trainable": trainable_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": 1}, buf)
    from study.library.alignment import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_adapter(model, Path(tmp) / "adapter")
        adapter = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"method": method, "trained_tensors": len(params), "trained_parameters": sum(p.numel() for p in params),
            "step_s": statistics.median(times), "peak_extra_bytes": memory.peak, "checkpoint_bytes": buf.getbuffer().nbytes,
            "adapter_bytes": adapter}


def rows(steps: int, batch: int) -> list[dict]:
    """Every method's row, each measured in a fresh process, one after another (the ratios against LoRA's)."""
    out = []
    for method in METHODS:
        proc = subprocess.run([sys.executable, __file__, "--one", method, "--steps", str(steps), "--batch",
                               str(batch)], capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    lora = out[0]
    for r in out:
        r["step_ratio_vs_lora"] = r["step_s"] / lora["step_s"]
        r["peak_ratio_vs_lora"] = r["peak_extra_bytes"] / lora["peak_extra_bytes"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 timed step of batch 8 (a smoke check of the harness)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # the per-method child process
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    steps, batch = (1, 8) if args.quick else (args.steps, args.batch)
    if args.one:
        print(json.dumps(measure(args.one, steps, batch)))
        return
    out = rows(steps, batch)
    mb = 2 ** 20
    print(f"ViT-B-32 (random weights), K=2 of 12 blocks per tower, batch {batch}, 1 thread, frozen-prefix cache; "
          f"median of {steps} steps")
    print(f"{'method':<12}{'trained params':>16}{'step s':>9}{'vs LoRA':>9}{'peak MiB':>10}{'vs LoRA':>9}"
          f"{'state.pt MiB':>14}{'adapter MiB':>13}")
    for r in out:
        print(f"{r['method']:<12}{r['trained_parameters']:>16,}{r['step_s']:>9.3f}{r['step_ratio_vs_lora']:>9.2f}"
              f"{r['peak_extra_bytes'] / mb:>10.0f}{r['peak_ratio_vs_lora']:>9.2f}{r['checkpoint_bytes'] / mb:>14.2f}"
              f"{r['adapter_bytes'] / mb:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
