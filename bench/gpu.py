"""One prepared GPU check: the study's worker loop and library layer on CUDA, in one command, under 8 minutes.

It runs where no Ray, MLflow, Optuna or open_clip is installed and nothing can be installed (a lent GPU machine:
Python 3.12, torch 2.11, peft, timm, huggingface_hub, pyarrow, safetensors): it uses the library layer and the
worker loop (``study.orchestration.worker``: ``setup``, ``train_epoch``, ``evaluate``, which import no Ray), and
``--wheels DIR`` adds carried wheels (open_clip_torch, datasets, ...; README "The GPU check") behind the machine's own
packages. Everything runs offline on the generated micrographs (``offline:micrographs``), with ViT-B-32 at random
initialisation (no weights can be downloaded there) and the study's default path, the frozen-prefix feature cache.

Rows (``ok``: an assertion, a failure exits 1; ``goal``: a speed, reported and never failed):

* ``precision``: a short trial of the worker (LoRA rank 8 on the last 2 blocks of both towers, projections,
  temperature, tether 0.5; 8 epochs of 3,000 pairs at batch 256) in fp32, bf16 autocast and fp16 autocast with its
  GradScaler, from the same initialisation on the same batches. ok: each one's final test top-1 and balanced
  accuracy (on 640 held-out micrographs) within 1 point of fp32's. The fp32 trial must have learned (balanced
  accuracy 10 points above chance), or the comparison says nothing and the row fails.
* ``worker``: training pairs/s of the worker's ``train_epoch`` (batches read from the feature store, as a trial
  reads them) against a bare CUDA loop doing the same steps with the same modules on features already on the GPU.
  goal >= 0.9.
* ``zero-shot``: images/s of ``study.library.zeroshot.evaluate_sets`` against CLIP_benchmark's evaluator
  (``zeroshot_classification.evaluate``, amp off) on the same model, images (read from the same store) and batch
  size, alternating, medians of 3. goal >= 1.0; ok: the same top-1.
* ``prefix``: one epoch of the same trial on images (the whole model; tether targets computed on the GPU) and on the
  frozen-prefix tokens built on the GPU: ok: the same loss within 1e-4 (relative) and the same trained weights
  within 1e-3, with TF32 off (fp32 round-off only).
* ``packing`` (only where Ray imports): 4 trials of the worker loop as Ray Tune trials (``TuneSession``, the
  one-worker runner's session) at 0.25 GPU each; ok: all 4 finish, on the one device, at once (their training
  intervals overlap).

Exit status: 0 all assertions hold; 1 a wrong result; 2 it cannot run here (no CUDA, a package missing).

    python bench/gpu.py --wheels gpu-wheels --json gpu.json     # on the GPU machine (README "The GPU check")
    python bench/gpu.py --cpu-smoke                             # the same code at tiny size on the CPU (fp32, bf16)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# import name -> the distribution to carry when it is missing
NEEDED = {"numpy": "numpy", "PIL": "pillow", "pydantic": "pydantic", "ruamel.yaml": "ruamel.yaml",
          "open_clip": "open_clip_torch", "peft": "peft", "datasets": "datasets", "clip_benchmark": "clip-benchmark"}
SIZES = {  # full: the GPU check; tiny: its code on the CPU, in about a minute
    "full": {"model": "ViT-B-32", "scale": 1.0, "batch": 256, "epochs": 8, "timed_epochs": 3,
             "precisions": ("fp32", "bf16", "fp16"), "repeats": 3, "packing_epochs": 2},
    "tiny": {"model": "clip-study-tiny", "scale": 0.05, "batch": 32, "epochs": 2, "timed_epochs": 1,
             "precisions": ("fp32", "bf16"), "repeats": 1, "packing_epochs": 1},
}
ROWS = ["precision", "worker", "zero-shot", "prefix", "packing"]
GENERAL = {"name": "micrographs-validation", "source": "offline:micrographs", "split": "validation",
           "templates": ["a micrograph of {c}."]}  # a stand-in general benchmark: this checks numbers, not meaning


def say(text: str) -> None:
    print(f"[gpu] {text}", flush=True)


# ------------------------------------------------------------------------------------------ the machine
def add_wheels(folder: Path) -> list[str]:
    """Unpack every wheel in ``folder`` (once) into ``folder/_site`` and put it at the END of ``sys.path``: the
    machine's own packages win, the carried ones fill the gaps. Returns the wheels' names."""
    site = folder / "_site"
    wheels = sorted(folder.glob("*.whl"))
    for whl in wheels:
        marker = site / f".{whl.name}.done"
        if not marker.exists():
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
            marker.write_text("")
    sys.path.append(str(site))
    return [w.name for w in wheels]


def missing_packages() -> list[str]:
    """The distributions whose import fails here (with why)."""
    out = []
    for module, dist in NEEDED.items():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if module == "clip_benchmark" and "sklearn" in str(exc):
                continue  # served by stand_in_sklearn()
            out.append(f"{dist} ({exc})")
    return out


def stand_in_sklearn() -> str:
    """CLIP_benchmark's zero-shot module imports ``sklearn.metrics`` (for ``balanced_accuracy_score`` and
    ``classification_report``, called after the timed embedding work); scikit-learn and SciPy outweigh what a GPU
    machine may carry. Where it is missing, a stand-in module gives the same balanced accuracy (the mean per-class
    recall) and an empty report. Returns "" when the real one imports."""
    try:
        import sklearn.metrics  # noqa: F401
        return ""
    except ImportError:
        import types

        import numpy as np

        def balanced_accuracy_score(y_true, y_pred):
            y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
            return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))

        metrics = types.ModuleType("sklearn.metrics")
        metrics.balanced_accuracy_score = balanced_accuracy_score
        metrics.classification_report = lambda *a, **k: ""
        sys.modules.setdefault("sklearn", types.ModuleType("sklearn")).metrics = metrics
        sys.modules["sklearn.metrics"] = metrics
        return "scikit-learn absent: CLIP_benchmark's two sklearn.metrics calls served by a stand-in (same formula)"


def no_cuda(torch) -> str:
    return (f"bench/gpu.py: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): it checks a GPU, so run it on "
            f"a machine with one (README, 'The GPU check'); --cpu-smoke runs its code at tiny size on the CPU")


# ------------------------------------------------------------------------------------------ the study's pieces
class LocalSession:
    """The worker loop's session without Ray: rank 0 of 1 on ``device``, nothing reported."""

    def __init__(self, device):
        self.device = device

    def quiet(self) -> None:
        pass

    def place(self):
        return 0, 1, self.device

    def checkpoint(self):
        return None

    def report(self, metrics: dict, directory) -> None:
        pass


class Context:
    """What every row shares: the size, the device, the cache (data, stores, prefix features) and the job."""

    def __init__(self, size: dict, device, cache: Path, threads: int):
        from study.config import DataSection
        from study.library.models import load_base_model
        from study.library.prefix import prefix_depths

        self.size, self.device, self.cache, self.threads = size, device, cache, threads
        self.data = DataSection(specialized=["micrographs"], general=[GENERAL],
                                offline_scale=size["scale"]).resolved("bench/gpu.py")
        self.depths = prefix_depths(load_base_model(size["model"], None).model, 2, {"image", "text"})

    def job(self, precision: str, prefix: bool = True, epochs: int | None = None):
        from study.config import EvaluationSection
        from study.orchestration.worker import WorkerJob
        from study.settings import TrialSettings

        s = TrialSettings(lora_blocks=2, lora_rank=8, learning_rate=2e-3, tether_weight=0.5, warmup_steps=10,
                          batch_size=self.size["batch"], epochs=epochs or self.size["epochs"], seed=0)
        return WorkerJob(settings=s, data=self.data, model_name=self.size["model"], model_pretrained=None,
                         precision=precision, cache_dir=str(self.cache), cpus_per_worker=self.threads,
                         evaluation=EvaluationSection(wiseft_alphas=[], validation_share=0.2),
                         prefix_depths=self.depths if prefix else None)

    def worker(self, precision: str, prefix: bool = True):
        """A trial's worker as ``run_worker`` builds it (``setup``, then ``distribute`` for one worker)."""
        from study.orchestration.worker import distribute, setup

        w = setup(self.job(precision, prefix), LocalSession(self.device))
        distribute(w)
        return w

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def row(name: str, check: str, baseline, measured, value: float, unit: str, goal: str, ok, note: str = "") -> dict:
    return {"row": name, "check": check, "baseline": baseline, "measured": measured, "value": value, "unit": unit,
            "goal": goal, "ok": ok, "note": note}


# ------------------------------------------------------------------------------------------ the rows
def trial(ctx: Context, precision: str) -> dict:
    """A short trial of the worker loop; its final metrics, losses and (fp16) the grad scaler's last scale."""
    from study.orchestration.worker import evaluate, train_epoch

    w = ctx.worker(precision)
    losses = [train_epoch(w, e)["train_loss"] for e in range(w.job.settings.epochs)]
    metrics = evaluate(w, final=True)
    scale = w.scaler.get_scale() if w.scaler.is_enabled() else None
    say(f"{precision}: losses {', '.join(f'{x:.3f}' for x in losses)}; test top-1 "
        f"{metrics['test/specialized_top1']:.1%}, balanced {metrics['test/specialized_balanced_accuracy']:.1%}")
    return {**metrics, "losses": losses, "grad_scale": scale}


def precision_rows(ctx: Context) -> list[dict]:
    results = {p: trial(ctx, p) for p in ctx.size["precisions"]}
    ref = results["fp32"]
    chance, learned = ref["test/specialized_chance_balanced_accuracy"], ref["test/specialized_balanced_accuracy"]
    tiny = ctx.size is SIZES["tiny"]
    rows = [row("precision", "fp32 trial learned: test balanced accuracy vs chance", chance, learned,
                (learned - chance) * 100, "points", ">= 10 points above chance",
                None if tiny else learned - chance >= 0.10, "a tiny CPU trial need not learn" if tiny else "")]
    for p, r in results.items():
        if p == "fp32":
            continue
        for metric in ("top1", "balanced_accuracy"):
            k = f"test/specialized_{metric}"
            gap = abs(r[k] - ref[k]) * 100
            note = f"last loss {r['losses'][-1]:.4f} vs {ref['losses'][-1]:.4f}"
            note += f"; grad scale {r['grad_scale']:g}" if r["grad_scale"] is not None else ""
            rows.append(row("precision", f"{p} vs fp32: test {metric}", ref[k], r[k], gap, "points", "<= 1 point",
                            gap <= 1.0, note))
    return rows


def bare_loop(ctx: Context, w, epochs: int) -> None:
    """The worker's training steps with nothing around them: every feature already on the GPU, no per-step sync."""
    import torch

    from study.library.finetune import FEATURE_COLUMNS
    from study.library.objective import alignment_loss, clamp_logit_scale

    p, s = w.pairs, w.job.settings
    feats = {k: v.to(w.device) for k, v in (p.loaded or p.features.read(slice(None), FEATURE_COLUMNS)).items()}
    tokens = p.tokens.to(w.device)
    w.net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch)).to(w.device)
        for step in range(w.steps_per_epoch):
            idx = perm[step * w.global_batch:(step + 1) * w.global_batch]
            with w.autocast:
                img_f, txt_f, scale = w.net(feats["image"][idx], feats["text"][idx], tokens[idx])
                loss = alignment_loss(w.loss_fn, img_f, txt_f, scale, s.tether_weight, feats["teacher_image"][idx],
                                      feats["teacher_text"][idx])
            w.opt.zero_grad(set_to_none=True)
            w.scaler.scale(loss).backward()
            w.scaler.step(w.opt)
            w.scaler.update()
            w.sched.step()
            clamp_logit_scale(w.clip.logit_scale)


def worker_rows(ctx: Context) -> list[dict]:
    from study.orchestration.worker import train_epoch

    n = ctx.size["timed_epochs"]
    rates = {}
    for name in ("bare", "worker", "bare2", "worker2"):  # alternating, one warm-up epoch each
        w = ctx.worker("fp32")
        run = (lambda e: bare_loop(ctx, w, 1)) if name.startswith("bare") else (lambda e: train_epoch(w, e))
        run(0)
        ctx.sync()
        t0 = time.perf_counter()
        for e in range(1, n + 1):
            run(e)
        ctx.sync()
        pairs = n * w.steps_per_epoch * w.global_batch
        rates.setdefault(name.rstrip("2"), []).append(pairs / (time.perf_counter() - t0))
    bare, worker = statistics.median(rates["bare"]), statistics.median(rates["worker"])
    return [row("worker", "training pairs/s: worker train_epoch vs bare CUDA loop", bare, worker, worker / bare,
                "ratio", ">= 0.9", None, "features streamed from the store each step vs resident on the GPU")]


def zeroshot_rows(ctx: Context) -> list[dict]:
    note = stand_in_sklearn()
    import clip_benchmark.metrics.zeroshot_classification as zsc
    from speed import StoreBatches, accuracy  # bench/speed.py's (standard library only at import), beside this file
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from study.library.benchmarks import decode
    from study.library.models import load_base_model
    from study.library.zeroshot import evaluate_sets

    zsc.accuracy = accuracy  # clip-benchmark 1.6.2 calls float() on an array, which numpy >= 2.4 refuses
    lm = load_base_model(ctx.size["model"], None, device=ctx.device)
    spec = ctx.data.specs("specialized")[0]
    s = decode(spec, "specialized", True, ctx.cache, lm.preprocess, ctx.data.seed, ctx.data.offline_scale)
    batch = ctx.size["batch"]
    loader = DataLoader(StoreBatches(s), batch_size=None,
                        sampler=BatchSampler(SequentialSampler(range(len(s.images))), batch, drop_last=False))
    passes = {"ours": lambda: evaluate_sets(lm.model, lm.tokenizer, [s], ctx.device.type,
                                            batch_size=batch)[0]["specialized_top1"],
              "clip_benchmark": lambda: zsc.evaluate(lm.model, loader, lm.tokenizer, s.classnames, list(spec.templates),
                                                     ctx.device.type, amp=False)["acc1"]}
    top1 = {k: fn() for k, fn in passes.items()}  # one unmeasured pass each
    seconds = {k: [] for k in passes}
    for r in range(ctx.size["repeats"]):
        for k in (list(passes) if r % 2 == 0 else list(passes)[::-1]):
            ctx.sync()
            t0 = time.perf_counter()
            passes[k]()
            ctx.sync()
            seconds[k].append(time.perf_counter() - t0)
    ours, theirs = (len(s.images) / statistics.median(seconds[k]) for k in ("ours", "clip_benchmark"))
    gap = abs(top1["ours"] - top1["clip_benchmark"])
    return [row("zero-shot", f"images/s on {len(s.images)} images: evaluate_sets vs CLIP_benchmark", theirs, ours,
                ours / theirs, "ratio", ">= 1.0", None, note),
            row("zero-shot", "top-1: evaluate_sets vs CLIP_benchmark", top1["clip_benchmark"], top1["ours"], gap,
                "abs", "same (<= 1e-6)", gap <= 1e-6)]


def prefix_rows(ctx: Context) -> list[dict]:
    import torch

    from study.library.alignment import trainable_state
    from study.orchestration.worker import train_epoch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 round-off only
    try:
        plain, cached = ctx.worker("fp32", prefix=False), ctx.worker("fp32", prefix=True)
        assert plain.depths is None and cached.depths, "one trial on images, one on the cache"
        a, b = train_epoch(plain, 0)["train_loss"], train_epoch(cached, 0)["train_loss"]
        wa, wb = trainable_state(plain.model), trainable_state(cached.model)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    loss_gap = abs(a - b) / abs(a)
    weight_gap = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    return [row("prefix", f"one epoch's loss: on images vs on the frozen-prefix cache ({ctx.device.type})", a, b,
                loss_gap, "relative", "<= 1e-4", loss_gap <= 1e-4),
            row("prefix", "trained weights after it: largest difference", 0.0, weight_gap, weight_gap, "abs", "<= 1e-3",
                weight_gap <= 1e-3)]


def packing_rows(ctx: Context, work: Path) -> list[dict]:
    """Four worker-loop trials as Ray Tune trials at 0.25 GPU (CPU: 0.5 CPU) each, all at once."""
    try:
        import ray
        from ray import tune
    except ImportError:
        return [row("packing", "4 trials at gpus_per_worker 0.25", None, None, float("nan"), "", "all finish, at once",
                    None, "skipped: Ray is not importable here")]
    from study.orchestration.worker import TuneSession, run_worker

    job = ctx.job("fp32", epochs=ctx.size["packing_epochs"])
    gpu = ctx.device.type == "cuda"

    def trainable(config):
        run_worker(job, TuneSession(), time.time())

    # Tune's workers import this checkout's study package as the driver does
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=4, num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="ERROR")
    try:
        res = {"cpu": 1, "gpu": 0.25} if gpu else {"cpu": 0.5}
        grid = tune.Tuner(tune.with_resources(trainable, res), param_space={"i": tune.grid_search([0, 1, 2, 3])},
                          tune_config=tune.TuneConfig(max_concurrent_trials=4),
                          run_config=tune.RunConfig(storage_path=str(work / "ray"), verbose=0)).fit()
    finally:
        ray.shutdown()
    done = [r for r in grid if r.error is None and r.metrics.get("epoch") == job.settings.epochs]
    starts = [float(r.metrics_dataframe["worker_start_time"].dropna().min()) for r in done]
    ends = [float(r.metrics_dataframe["timestamp"].max()) for r in done]
    together = bool(len(done) == 4 and max(starts) < min(ends))
    where = "one GPU" if gpu else "the CPU (--cpu-smoke: no GPU to share)"
    return [row("packing", f"4 trials at {res} on {where}: finished, overlapping", 4, len(done),
                max(starts) - min(ends) if done else float("nan"), "s (last start - first end)", "all finish, at once",
                together, "; ".join(f"{r.error}" for r in grid if r.error is not None)[:300])]


# ------------------------------------------------------------------------------------------ the command
def table(rows: list[dict]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| row | check | baseline | measured | value | goal | result |", "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        result = {True: "ok", False: "WRONG", None: "reported"}[r["ok"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['row']} | {r['check']} | {fmt(r['baseline'])} | {fmt(r['measured'])} | "
                     f"{fmt(r['value'])} {r['unit']} | {r['goal']} | {result}{note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="a folder of carried wheels, unpacked behind the machine's packages")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the checks' code at tiny size on the CPU")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, help="run only these rows (default: all)")
    args = ap.parse_args(argv)
    carried = add_wheels(args.wheels) if args.wheels else []
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(no_cuda(torch), file=sys.stderr)
        return 2
    if missing := missing_packages():
        print(f"bench/gpu.py: missing here: {'; '.join(missing)}; carry their wheels with --wheels (README, 'The GPU "
              f"check')", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    say(f"{name}; torch {torch.__version__}; python {sys.version.split()[0]}; carried wheels: {len(carried)}")
    size = SIZES["tiny" if args.cpu_smoke else "full"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(size, device, Path(tmp) / "cache", min(8, os.cpu_count() or 1))
        rows = []
        parts = {"precision": precision_rows, "worker": worker_rows, "zero-shot": zeroshot_rows,
                 "prefix": prefix_rows, "packing": lambda c: packing_rows(c, Path(tmp))}
        for step in args.rows:
            say(f"{step} ({time.time() - t0:.0f}s so far)")
            rows += parts[step](ctx)
    print(f"\nGPU check, {time.strftime('%Y-%m-%d')}, {name}, {time.time() - t0:.0f}s\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2,
                                        default=str))
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
