"""What the study's machinery costs: ratios against a bare baseline measured side by side in the same run.

Each row is a ratio against a baseline measured in this same run, with both raw numbers beside it:

* (a) ``python -m study.run`` with ONE trial (a copy of search_spaces/default.yaml with every knob fixed:
  learning_rate 2e-3, lora_rank 4, data_fraction 1.0, tether_weight 1.0, lora_blocks 2, batch_size 64,
  epochs 8, or 2 with --quick) against a BARE loop in a plain process doing the same training and
  evaluation with the same library functions (base model, baseline, nested data subset, tether targets,
  alignment module, AdamW and the LR schedule, per-epoch validation, the test part and the WiSE-FT curve
  at the end), without Ray, Tune, Optuna or MLflow. Wall time of the whole process, N pairs run
  alternately, medians. The study also runs its preflight, the contamination check and the trade-off
  report: they count as its cost. Both train the same (the last train_loss is printed for each).
* (b) training steps/s inside the Ray Train worker (``steps`` over the sum of ``epoch_seconds -
  eval_seconds``, read back from MLflow) against the same in the bare loop.
* (c) zero-shot images/s of ``study.library.zeroshot.evaluate_sets`` against CLIP_benchmark's
  ``zeroshot_classification.evaluate`` on the same model (the offline base model), the same images (the
  test part of the specialized headline benchmark, read from the same store in batches), the same batch
  size and torch threads as a worker (``resources.cpus_per_worker``); medians of alternating repeats.
* (d) the frozen-prefix feature cache on/off: the rows of ``bench/prefix_cache.py`` when it exists.
* (e) per-trial overhead, from the trial's MLflow run (opened at the start of ``trial_driver``, closed at
  its end) and the ``worker_start_time``/``setup_seconds``/``process_start_time`` its worker reports with its
  first epoch (a trial that trains in Tune starts when its process did, if that is earlier than its run):
  (e0) the study process outside its trial (preflight, baseline, Ray/Tune start, report), (e1) trial
  start until the worker function runs, (e2) the worker's setup against the bare loop's, (e3)
  checkpoint + report between epochs, (e4) teardown from the last epoch's metrics until the trial's run
  is closed, (e5) the whole trial; each against the trial's own epoch time (sum of ``epoch_seconds``).
  The full mode also runs the default study once (8 trials, 2 at once) and gives the medians per trial.

Before measuring, one unmeasured 1-epoch study warms the caches (generated data, decoded stores, the
base model's baseline features, Ray's files), so the ratios measure orchestration, not decoding. The
offline base model is pretrained once per cache dir (4-6 minutes on 2 cores the first time); the default
cache dir is the study's own, so it is usually there already. The exit status is 0 whatever the
numbers: this reports, it asserts nothing.

    python bench/speed.py                    # 3 pairs of 8 epochs + the default study (about 25 min, 2 cores)
    python bench/speed.py --quick            # 1 pair of 2 epochs, no default study (about 5 min)
    python bench/speed.py --pairs 5 --json out.json --cache-dir /tmp/clip-cache
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout this file belongs to, in this process and (PYTHONPATH) its children

KNOBS = {"learning_rate": 2e-3, "lora_rank": 4, "data_fraction": 1.0, "tether_weight": 1.0, "lora_blocks": 2,
         "lora_targets": "attn+mlp", "lora_towers": "image+text", "batch_size": 64}
EPOCHS, QUICK_EPOCHS = 8, 2
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"


def say(text: str) -> None:
    print(f"[speed] {text}", flush=True)


# ------------------------------------------------------------------------------------------ the runs
def write_space(folder: Path, epochs: int, name: str) -> Path:
    """The default space with one trial and every knob fixed (learning_rate as a one-choice categorical:
    a space must search something)."""
    import yaml

    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["name"] = name
    raw["search"].update(trials=1, max_concurrent=1)
    raw["params"] = {**KNOBS, "epochs": epochs,
                     "learning_rate": {"distribution": "categorical", "choices": [KNOBS["learning_rate"]]}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def child_env() -> dict:
    """This checkout first on the path; no inherited Ray address, tracking server or storage."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CLIP_STUDY_STORAGE_PATH", "CLIP_STUDY_CACHE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["TQDM_DISABLE"] = "1"  # progress bars only clutter the logs
    return env


def timed(cmd: list[str], work: Path, tag: str) -> float:
    """Wall seconds of ``cmd`` as a whole process (output to ``<work>/<tag>.log``); exits on failure."""
    log = work / f"{tag}.log"
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=work, env=child_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if code != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
        raise SystemExit(f"[speed] {tag}: exit status {code}; the log is {log}")
    return wall


def run_study(space: Path, work: Path, cache_dir: Path, tag: str) -> dict:
    """One ``python -m study.run`` with a fresh output folder and MLflow store; its trials' timings."""
    db = work / f"{tag}.db"
    wall = timed([sys.executable, "-m", "study.run", "--space", str(space), "--cache-dir", str(cache_dir),
                  "--output-dir", str(work / f"{tag}-out"), "--tracking-uri", f"sqlite:///{db}"], work, tag)
    return {"wall": wall, "trials": trial_timings(db)}


def run_job(job: str, space: Path, work: Path, cache_dir: Path, tag: str, *extra: str) -> dict:
    """One of this file's jobs (``bare``, ``zeroshot``) in a process of its own; its JSON and wall time."""
    out = work / f"{tag}.json"
    wall = timed([sys.executable, str(Path(__file__).resolve()), "--job", job, "--space", str(space),
                  "--cache-dir", str(cache_dir), "--job-out", str(out), *extra], work, tag)
    return {"wall": wall, **json.loads(out.read_text())}


def trial_timings(db: Path) -> list[dict]:
    """Per trial run of the store: its times, from the run's start/end and its metric histories."""
    from mlflow.tracking import MlflowClient

    from study.vocabulary import KIND_TAG, TRIAL

    c = MlflowClient(f"sqlite:///{db}")
    runs = [r for e in c.search_experiments()
            for r in c.search_runs([e.experiment_id], f"tags.`{KIND_TAG}` = '{TRIAL}'", max_results=10000)]
    return [trial_timing(c, r) for r in runs]


def trial_timing(c, run) -> dict:
    names = ("epoch_seconds", "eval_seconds", "steps", "train_loss", "worker_start_time", "setup_seconds",
             "process_start_time")
    h = {k: sorted(c.get_metric_history(run.info.run_id, k), key=lambda m: m.step) for k in names}
    epochs = [m.value for m in h["epoch_seconds"]]
    evals = [m.value for m in h["eval_seconds"]]
    start, end = run.info.start_time / 1000, run.info.end_time / 1000
    # A trial that trains in Tune opens its run inside its own process: its start is that process's.
    start = min(start, h["process_start_time"][0].value) if h["process_start_time"] else start
    last = max(m.timestamp for m in h["epoch_seconds"]) / 1000  # logged after the last evaluation, before its report
    worker, setup = h["worker_start_time"][0].value, h["setup_seconds"][0].value
    return {"trial": end - start, "to_worker": worker - start, "setup": setup, "epochs": sum(epochs),
            "train": sum(e - v for e, v in zip(epochs, evals)), "steps": h["steps"][-1].value,
            "between_epochs": last - worker - setup - sum(epochs), "teardown": end - last,
            "train_loss": h["train_loss"][-1].value}


# --------------------------------------------------------------------------------- the bare loop (job)
def bare_loop(space: Path, cache_dir: Path) -> dict:
    """The study's one trial as a plain PyTorch loop: the same library calls as the driver's baseline and
    the worker's setup, epochs and evaluation (study/orchestration/worker.py), no Ray and no MLflow."""
    import torch

    from study.config import load_study_config
    from study.library.benchmarks import eval_sets
    from study.library.cache import feature_cache
    from study.library.models import load_base_model
    from study.library.zeroshot import evaluate_sets

    cfg = load_study_config(space)
    t0 = time.time()
    pretrained = cfg.model.weights(cache_dir)
    base = load_base_model(cfg.model.name, pretrained)  # the baseline, as the driver's prepare() scores it
    sets = eval_sets(cfg.data, cache_dir, base.preprocess, validation_share=cfg.evaluation.validation_share)
    baseline, _, predictions = evaluate_sets(
        base.model, base.tokenizer, sets, "cpu", detailed=True, frozen_image=True, frozen_text=True,
        cache=feature_cache(cache_dir, cfg.model.name, pretrained), collapse_share=cfg.evaluation.collapse_share)
    out = {"baseline_seconds": time.time() - t0, "epochs": []}
    t0 = time.time()
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))  # as the worker does
    b = bare_setup(cfg, pretrained, cache_dir)
    out["setup_seconds"] = time.time() - t0
    for epoch in range(b["s"].epochs):
        t0 = time.time()
        loss = bare_epoch(b, epoch)
        t1 = time.time()
        final = epoch + 1 == b["s"].epochs
        metrics = bare_evaluate(b, cfg, pretrained, cache_dir, baseline, predictions, final)
        out["epochs"].append({"train_seconds": t1 - t0, "eval_seconds": time.time() - t1, "train_loss": loss,
                              "steps": b["steps_per_epoch"], "val_specialized_top1": metrics["val/specialized_top1"]})
        print(f"[bare] epoch {epoch + 1}: loss {loss:.4f}, train {t1 - t0:.1f}s, eval {time.time() - t1:.1f}s",
              flush=True)
    return out


def bare_setup(cfg, pretrained, cache_dir: Path) -> dict:
    """What the worker's ``setup`` builds, for one process on the CPU, with the frozen-prefix cache as the study
    uses it (the driver built its stores already)."""
    import torch
    from open_clip.loss import ClipLoss

    from study.library.alignment import apply_alignment_module, trainable_state
    from study.library.benchmarks import eval_sets
    from study.library.models import load_base_model
    from study.library.objective import autocast_for, lr_lambda
    from study.library.prefix import SuffixCLIP, prefix_sets
    from study.orchestration.prepare import prefix_plan
    from study.orchestration.worker import WorkerJob, cached_depths, training_pairs
    # The bench's space fixes every knob but one single-choice categorical (a space must search something).
    s = cfg.space.settings({k: v.choices[0] for k, v in cfg.space.searched.items()})
    device = torch.device("cpu")
    torch.manual_seed(s.seed)
    lm = load_base_model(cfg.model.name, pretrained)
    job = WorkerJob(settings=s, data=cfg.data, model_name=cfg.model.name, model_pretrained=pretrained,
                    cache_dir=str(cache_dir), prefix_depths=prefix_plan(cfg, lm.model))
    depths = cached_depths(job, lm.model)
    pairs = training_pairs(job, lm, depths, device)
    sets = eval_sets(cfg.data, cache_dir, lm.preprocess, validation_share=cfg.evaluation.validation_share)
    if depths:
        sets = prefix_sets(lm, cfg.model.name, pretrained, depths, sets, cache_dir)
    model = apply_alignment_module(lm.model, s).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate,
                            weight_decay=s.weight_decay)
    batch = min(s.batch_size, len(pairs))
    steps = max(1, len(pairs) // batch)
    autocast, scaler = autocast_for(device, cfg.model.precision)
    return {"s": s, "device": device, "tokenizer": lm.tokenizer, "pairs": pairs, "depths": depths, "memo": {},
            "model": model, "net": SuffixCLIP(model, depths) if depths else model, "initial": trainable_state(model),
            "opt": opt, "sched": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.warmup_steps, steps * s.epochs)),
            "batch": batch, "steps_per_epoch": steps, "autocast": autocast, "scaler": scaler, "loss_fn": ClipLoss(),
            "sets": sets}


def bare_epoch(b: dict, epoch: int) -> float:
    """One epoch of the worker's ``train_epoch`` (one process): the mean training loss."""
    import torch

    from study.library.alignment import unwrap
    from study.library.objective import alignment_loss, clamp_logit_scale

    s, net, dev = b["s"], b["net"], b["device"]
    net.train()
    perm = torch.randperm(len(b["pairs"]), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
    total = 0.0
    for step in range(b["steps_per_epoch"]):
        idx = perm[step * b["batch"]:(step + 1) * b["batch"]]
        inputs, teacher_img, teacher_txt = b["pairs"].batch(idx, dev)
        with b["autocast"]:
            img_f, txt_f, scale = net(*inputs)
            loss = alignment_loss(b["loss_fn"], img_f, txt_f, scale, s.tether_weight, teacher_img, teacher_txt)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
        b["opt"].zero_grad(set_to_none=True)
        b["scaler"].scale(loss).backward()
        b["scaler"].step(b["opt"])
        b["scaler"].update()
        b["sched"].step()
        clamp_logit_scale(unwrap(b["model"]).logit_scale)
        total += loss.item()
    return total / b["steps_per_epoch"]


def bare_evaluate(b: dict, cfg, pretrained, cache_dir: Path, baseline: dict, predictions: dict, final: bool) -> dict:
    """The worker's ``evaluate``: validation parts every epoch; at the last, the test parts and WiSE-FT."""
    from study.library.alignment import tower_is_frozen, trainable_state, unwrap, weight_change_norm
    from study.library.cache import feature_cache
    from study.library.prefix import SuffixEncoder
    from study.library.wiseft import wiseft_curve
    from study.library.zeroshot import evaluate_sets
    from study.vocabulary import VAL, changes

    s, ev = b["s"], cfg.evaluation
    sets = b["sets"] if final else [x for x in b["sets"] if x.split == VAL]
    clip = unwrap(b["model"])
    values, _, _ = evaluate_sets(SuffixEncoder(clip, b["depths"], b["memo"]) if b["depths"] else clip, b["tokenizer"],
                                 sets, b["device"], detailed=final,
                                 cache=feature_cache(cache_dir, cfg.model.name, pretrained),
                                 baseline_predictions=predictions, seed=s.seed, collapse_share=ev.collapse_share,
                                 frozen_image=tower_is_frozen(s, "image"), frozen_text=tower_is_frozen(s, "text"))
    metrics = {**values, **changes(values, baseline),
               "weight_change_norm": weight_change_norm(b["model"], b["initial"])}
    if final and ev.wiseft_alphas:
        metrics.update(wiseft_curve(cfg.model.name, pretrained, s, trainable_state(b["model"]), b["initial"], b["sets"],
                                    b["device"], ev.wiseft_alphas, ev.wiseft_metric, baseline, ev.collapse_share,
                                    depths=b["depths"], memo=b["memo"]))
    return metrics


# ------------------------------------------------------------------------ zero-shot throughput (job)
def accuracy(output, target, topk=(1,)):
    """clip-benchmark 1.6.2's ``accuracy`` with ``[0]`` before ``float()``: numpy >= 2.4 refuses ``float()`` of a
    one-element array (the same workaround as tests/test_parity.py)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / len(target) for k in topk]


class StoreBatches:
    """A map-style dataset over an :class:`EvalSet` that gives whole batches (indexed by a list of positions)
    from its on-disk store, as ``evaluate_sets`` reads it; ``classes`` for clip-benchmark."""

    def __init__(self, s):
        self.s, self.classes = s, s.classnames

    def __len__(self):
        return len(self.s.images)

    def __getitem__(self, idx):
        return self.s.images[idx], self.s.labels[idx]


def zeroshot_speed(space: Path, cache_dir: Path, batch: int, repeats: int) -> dict:
    """Seconds per pass of ours and clip-benchmark's evaluator over the same test part, alternating."""
    import clip_benchmark.metrics.zeroshot_classification as zsc
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from study.config import load_study_config
    from study.library.benchmarks import validation_and_test
    from study.library.models import load_base_model
    from study.library.zeroshot import evaluate_sets

    zsc.accuracy = accuracy
    cfg = load_study_config(space)
    threads = max(1, int(cfg.resources.cpus_per_worker))
    torch.set_num_threads(threads)
    lm = load_base_model(cfg.model.name, cfg.model.weights(cache_dir))
    lm.model.eval()
    spec = next(x for x in cfg.data.specs("specialized") if x.task == "classification")
    test = validation_and_test(spec, "specialized", True, cache_dir, lm.preprocess, cfg.data.seed,
                               cfg.data.offline_scale, cfg.evaluation.validation_share)[1]
    loader = DataLoader(StoreBatches(test), batch_size=None,
                        sampler=BatchSampler(SequentialSampler(range(len(test.images))), batch, drop_last=False))
    templates = dict(spec.templates) if isinstance(spec.templates, dict) else list(spec.templates)
    passes = {"ours": lambda: evaluate_sets(lm.model, lm.tokenizer, [test], "cpu",
                                            batch_size=batch)[0][f"{test.key}top1"],
              "clip_benchmark": lambda: zsc.evaluate(lm.model, loader, lm.tokenizer, test.classnames, templates, "cpu",
                                                     amp=False)["acc1"]}
    seconds, top1 = {k: [] for k in passes}, {}
    for name, fn in passes.items():  # one unmeasured pass each
        top1[name] = fn()
    for r in range(repeats):
        for name in (list(passes) if r % 2 == 0 else list(passes)[::-1]):
            t0 = time.time()
            passes[name]()
            seconds[name].append(time.time() - t0)
    return {"images": len(test.images), "benchmark": f"{spec.name} (test part)", "batch": batch, "threads": threads,
            "seconds": seconds, "top1": top1}


# ----------------------------------------------------------------------------------------- the report
def row(key: str, name: str, against: str, baseline: float, measured: float, unit: str) -> dict:
    return {"key": key, "name": name, "against": against, "baseline": baseline, "measured": measured,
            "ratio": measured / baseline if baseline else float("nan"), "unit": unit}


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def bare_steps_per_s(b: dict) -> float:
    return sum(e["steps"] for e in b["epochs"]) / sum(e["train_seconds"] for e in b["epochs"])


def study_rows(studies: list[dict], bares: list[dict], zs: dict) -> list[dict]:
    """Rows (a), (b), (c) and (e) from the one-trial studies, the bare loops and the zero-shot passes."""
    trials = [s["trials"][0] for s in studies]
    n = len(trials)
    rows = [row("a", f"one-trial study, whole process (median of {n})", "bare loop", med(b["wall"] for b in bares),
                med(s["wall"] for s in studies), "s"),
            row("b", "training steps/s in the trial's worker", "bare loop", med(bare_steps_per_s(b) for b in bares),
                med(t["steps"] / t["train"] for t in trials), "steps/s")]
    z = zs["seconds"]
    rows.append(row("c", f"zero-shot images/s, evaluate_sets ({zs['images']} images, batch {zs['batch']})",
                    "clip_benchmark evaluate", zs["images"] / med(z["clip_benchmark"]), zs["images"] / med(z["ours"]),
                    "images/s"))
    outside = [s["wall"] - s["trials"][0]["trial"] for s in studies]
    return rows + [row("e0", "study process outside its trial", "trial epoch time", med(t["epochs"] for t in trials),
                       med(outside), "s")] + overhead_rows(trials, bares, "")


def overhead_rows(trials: list[dict], bares: list[dict], label: str) -> list[dict]:
    """(e1)-(e5): medians over ``trials`` of each part of a trial's overhead."""
    epochs = med(t["epochs"] for t in trials)
    parts = [("e1", "trial start (its process or run) -> worker function runs", "to_worker"),
             ("e3", "checkpoint + report between epochs", "between_epochs"),
             ("e4", "teardown: last epoch's metrics -> trial closed", "teardown"), ("e5", "whole trial", "trial")]
    rows = [row(k, f"{label}{name}", "trial epoch time", epochs, med(t[field] for t in trials), "s")
            for k, name, field in parts]
    rows.insert(1, row("e2", f"{label}worker setup (model, data, tether, stores)", "bare loop setup",
                       med(b["setup_seconds"] for b in bares), med(t["setup"] for t in trials), "s"))
    return rows


def prefix_cache_rows(quick: bool) -> list[dict] | None:
    """(d): ``bench/prefix_cache.py``'s ``rows(quick)``, when that file exists and defines it."""
    path = ROOT / "bench" / "prefix_cache.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("bench_prefix_cache", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        rows = module.rows(quick) if callable(getattr(module, "rows", None)) else None
    except Exception as exc:  # noqa: BLE001 - its failure is reported, the other rows still are
        say(f"(d) bench/prefix_cache.py failed: {type(exc).__name__}: {exc}")
        return None
    return [{"key": "d", **r} for r in rows] if rows is not None else None


def fmt(v) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    if v != v:
        return "n/a"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def print_table(rows: list[dict], d_missing: bool) -> None:
    head = ("row", "measurement", "baseline is", "baseline", "measured", "ratio", "unit")
    body = [(r.get("key", ""), r.get("name", ""), r.get("against", ""), fmt(r.get("baseline", "")),
             fmt(r.get("measured", "")), f"{fmt(r['ratio'])}x" if isinstance(r.get("ratio"), (int, float)) else "",
             r.get("unit", "")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print("\n" + line(head) + "\n" + "  ".join("-" * w for w in widths))
    for cells in body:
        print(line(cells))
    if d_missing:
        print("(d) not available")


# ------------------------------------------------------------------------------------------------ main
def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"1 pair of {QUICK_EPOCHS} epochs, no default study (CI)")
    p.add_argument("--pairs", type=int, default=3, help="study/bare pairs, run alternately (default 3; --quick: 1)")
    p.add_argument("--epochs", type=int,
                   help=f"epochs of the measured trial (default {EPOCHS}; --quick: {QUICK_EPOCHS})")
    p.add_argument("--repeats", type=int, help="zero-shot passes of each evaluator (default 20; --quick: 5)")
    p.add_argument("--eval-batch", type=int, default=256, help="zero-shot batch size of both evaluators "
                   "(default 256, what evaluate_sets uses in a trial)")
    p.add_argument("--skip-default-study", action="store_true",
                   help="full mode without the default study (8 trials, 2 at once) for (e)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("CLIP_STUDY_CACHE") or "~/.cache/clip-study"),
                   help="one cache for every run (the offline base model is pretrained there once if missing); "
                        "default: the study's own, $CLIP_STUDY_CACHE or ~/.cache/clip-study")
    p.add_argument("--workdir", type=Path, help="where spaces, logs, outputs and MLflow stores go (kept); "
                   "default: a temporary folder, removed at the end")
    p.add_argument("--json", type=Path, help="also write the table (and the raw numbers) as JSON")
    p.add_argument("--job", choices=["bare", "zeroshot"], help=argparse.SUPPRESS)  # this file's child processes
    p.add_argument("--space", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--job-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cache_dir = args.cache_dir.expanduser().absolute()
    if args.quick:
        args.pairs = 1
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    args.repeats = args.repeats or (5 if args.quick else 20)
    return args


def child(args) -> int:
    if args.job == "bare":
        result = bare_loop(args.space, args.cache_dir)
    else:
        result = zeroshot_speed(args.space, args.cache_dir, args.eval_batch, args.repeats)
    args.job_out.write_text(json.dumps(result, indent=2))
    return 0


def pairs(args, space: Path, work: Path) -> tuple[list[dict], list[dict]]:
    """The one-trial study and the bare loop, alternately (study first in odd pairs, bare first in even)."""
    studies, bares = [], []
    for i in range(args.pairs):
        for kind in (("study", "bare") if i % 2 == 0 else ("bare", "study")):
            if kind == "study":
                studies.append(run_study(space, work, args.cache_dir, f"study-{i + 1}"))
                t = studies[-1]["trials"][0]
                say(f"pair {i + 1}/{args.pairs}: study {studies[-1]['wall']:.1f}s (trial {t['trial']:.1f}s, "
                    f"epochs {t['epochs']:.1f}s, last train_loss {t['train_loss']:.4f})")
            else:
                bares.append(run_job("bare", space, work, args.cache_dir, f"bare-{i + 1}"))
                b = bares[-1]
                say(f"pair {i + 1}/{args.pairs}: bare  {b['wall']:.1f}s (setup {b['setup_seconds']:.1f}s, epochs "
                    f"{sum(e['train_seconds'] + e['eval_seconds'] for e in b['epochs']):.1f}s, last train_loss "
                    f"{b['epochs'][-1]['train_loss']:.4f})")
    return studies, bares


def measure(args, work: Path) -> tuple[list[dict], dict]:
    space = write_space(work, args.epochs, "speed-bench")
    say(f"cache {args.cache_dir}; work {work}")
    say("warm-up: one unmeasured 1-epoch study (caches, the baseline's features, Ray's files) ...")
    warm = run_study(write_space(work, 1, "speed-bench-warmup"), work, args.cache_dir, "warmup")
    say(f"warm-up done in {warm['wall']:.1f}s")
    studies, bares = pairs(args, space, work)
    say(f"zero-shot: {args.repeats} passes of each evaluator, alternating ...")
    zs = run_job("zeroshot", space, work, args.cache_dir, "zeroshot", "--eval-batch", str(args.eval_batch),
                 "--repeats", str(args.repeats))
    say(f"zero-shot: top-1 ours {zs['top1']['ours']:.4f}, clip_benchmark {zs['top1']['clip_benchmark']:.4f}")
    rows = study_rows(studies, bares, zs)
    raw = {"studies": studies, "bares": bares, "zeroshot": zs, "warmup": warm}
    if not args.quick and not args.skip_default_study:
        say("(e) the default study once (8 trials, 2 at once) ...")
        default = run_study(DEFAULT_SPACE, work, args.cache_dir, "default-study")
        say(f"default study: {default['wall']:.1f}s, {len(default['trials'])} trials")
        rows += overhead_rows(default["trials"], bares, f"[default study, {len(default['trials'])} trials] ")
        raw["default_study"] = default
    loss_s, loss_b = studies[-1]["trials"][0]["train_loss"], bares[-1]["epochs"][-1]["train_loss"]
    say(f"check: last-epoch train_loss study {loss_s:.6f}, bare {loss_b:.6f} "
        "(the same training: equal up to round-off)")
    return rows, raw


def main(argv=None) -> int:
    args = parse(argv)
    if args.job:
        return child(args)
    t0 = time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-speed-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    say(f"{'quick: ' if args.quick else ''}{args.pairs} pair(s) of {args.epochs} epochs")
    rows, raw = measure(args, work)  # a failed run exits here, leaving its logs in the work folder
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    d = prefix_cache_rows(args.quick)
    rows = rows[:3] + (d or []) + rows[3:]
    print_table(rows, d is None)
    say(f"done in {time.time() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": raw, "quick": args.quick, "pairs": args.pairs,
                                         "epochs": args.epochs, "seconds": time.time() - t0}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
