"""``python -m study.evaluate``: zero-shot evaluation of any open_clip model on benchmark specs.

The same evaluator the study runs on every trial and on its baseline, alone:
CLIP_benchmark's protocol (its numbers, within 1e-6, with AMP off), plus 95%
bootstrap intervals and retrieval recall@k. Exit 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .checks import Parser, check_folder, positive_int
from .config import ConfigError
from .library.benchmarks import SpecError, decode, load_spec, shipped_specs
from .library.export import ExportError
from .library.models import OFFLINE_MODEL, ModelError, check_model, load_base_model, weights_source
from .library.sources import DataError
from .library.webdataset import COLLECTIONS

EXAMPLES = """examples:
  python -m study.evaluate --benchmark micrographs --benchmark shapes     # the offline base model
  python -m study.evaluate --model ViT-B-32 --pretrained laion2b_s34b_b79k --benchmark pcam --benchmark cifar10
  python -m study.evaluate --model hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \\
      --benchmark pathmnist --json results.json
  python -m study.evaluate --model ViT-B-32 --pretrained ./finetuned.pt --benchmark my_spec.yaml
  python -m study.evaluate --run-id 3f2a... --benchmark micrographs      # a trial's fine-tuned model
  python -m study.evaluate --model ViT-B-32 --pretrained openai --benchmark wds/vtab/pcam   # CLIP_benchmark's, by name
  python -m study.evaluate --model ViT-B-32 --pretrained openai --benchmark vtab --benchmark retrieval  # collections
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m study.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Zero-shot classification (top-1, top-5, balanced accuracy, per-class recall, 95% bootstrap "
                    "intervals) and image-text retrieval (recall@1/5/10 both ways) of an open_clip model on "
                    "benchmark specs. Shipped specs: " + ", ".join(shipped_specs()) + ".")
    p.add_argument("--model", default=OFFLINE_MODEL, help="open_clip model name or hf-hub:org/repo "
                   f"(default: {OFFLINE_MODEL}, the offline base model, pretrained once and cached)")
    p.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint path")
    p.add_argument("--benchmark", action="append", required=True, metavar="SPEC",
                   help="a shipped spec name, a spec YAML path, a CLIP_benchmark WebDataset by its name (wds/vtab/pcam: "
                        "the Hub repo clip-benchmark/wds_vtab-pcam, through huggingface_hub and its cache), or a "
                        f"CLIP_benchmark collection of them ({', '.join(COLLECTIONS)}); repeatable")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: cpu)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("CLIP_STUDY_CACHE", Path.home() / ".cache" / "clip-study")),
                   help="cache of generated domains and the offline base model (env CLIP_STUDY_CACHE)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated offline domains (default: 0)")
    p.add_argument("--offline-scale", type=float, default=1.0, help="size of the generated domains, (0, 1]")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--run-id", help="evaluate this trial run's fine-tuned model (LoRA merged; see python -m "
                                    "study.export) instead of --model/--pretrained")
    p.add_argument("--alpha", default="1", help="with --run-id: WiSE-FT alpha in [0, 1], or 'best' (default: 1)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="with --run-id: the MLflow store (env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db here)")
    return p


def run_model(args, tmp: Path) -> tuple[str, str]:
    """``--run-id``: the trial's model exported into ``tmp``, as (open_clip model name, checkpoint path)."""
    from .checks import existing_store
    from .export import alpha_of, export_run, find_trial

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args.tracking_uri = existing_store(args.tracking_uri)
    trial, name, pretrained = find_trial(args.tracking_uri, "", None, args.run_id)
    args.alpha = f"{alpha_of(args.alpha, trial):g}"
    path, _ = export_run(args.tracking_uri, trial, name, pretrained, float(args.alpha), tmp)
    return name, str(path)


def resolve_weights(model: str, pretrained: str | None, cache_dir: Path) -> str | None:
    """The weights to load; for the offline model, the same cached checkpoint the default study uses."""
    from .config import ModelSection

    check_model(model, pretrained, where="--model/--pretrained")
    return ModelSection(name=model, pretrained=pretrained).weights(cache_dir)


def evaluate_specs(model_name: str, pretrained: str | None, specs, cache_dir: Path, device: str = "cpu",
                   batch_size: int = 256, seed: int = 0, scale: float = 1.0) -> dict:
    """Metrics ``{"<spec name>_<metric>": value}`` of one model on ``specs``."""
    from .library.zeroshot import evaluate_sets

    lm = load_base_model(model_name, pretrained, device=device)
    sets = [decode(spec, spec.name, True, cache_dir, lm.preprocess, seed, scale) for spec in specs]
    metrics, _, _ = evaluate_sets(lm.model, lm.tokenizer, sets, device, detailed=True, batch_size=batch_size)
    return metrics


def benchmark_refs(refs: list[str]) -> list[str]:
    """``--benchmark`` values with CLIP_benchmark's collection names (``vtab``, ``retrieval``...) spelled out as the
    ``wds/`` names of their WebDatasets, in its order; a name given twice is evaluated once."""
    out = [f"wds/{n}" if ref in COLLECTIONS else ref for ref in refs for n in COLLECTIONS.get(ref, [ref])]
    return list(dict.fromkeys(out))


def check_device(name: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``); :class:`ConfigError` if not."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device: {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device: {name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device: {name!r}, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device: {name!r}: use cpu, cuda[:N] or mps")
    return name


def check_args(args) -> None:
    """Everything about the flags that can be known before loading anything."""
    if args.run_id and (args.model != OFFLINE_MODEL or args.pretrained):
        raise ConfigError("--run-id: the trial's run names its own model; drop --model/--pretrained")
    if not 0 < args.offline_scale <= 1:
        raise ConfigError(f"--offline-scale: must be in (0, 1], got {args.offline_scale}")
    check_device(args.device)
    check_folder(args.cache_dir, "--cache-dir")
    if args.json is not None:
        if args.json.is_dir():
            raise ConfigError(f"--json: {args.json} is a folder; give a file name, e.g. {args.json / 'results.json'}")
        check_folder(args.json.absolute().parent, "--json")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        specs = [load_spec(ref) for ref in benchmark_refs(args.benchmark)]
        with tempfile.TemporaryDirectory() as tmp:
            if args.run_id:
                args.model, pretrained = run_model(args, Path(tmp))
            else:
                pretrained = resolve_weights(args.model, args.pretrained, args.cache_dir.resolve())
            t0 = time.time()
            metrics = evaluate_specs(args.model, pretrained, specs, args.cache_dir.resolve(), args.device,
                                     args.batch_size, args.data_seed, args.offline_scale)
        source = (f"fine-tuned: run {args.run_id}, WiSE-FT alpha {args.alpha}" if args.run_id
                  else weights_source(args.model, args.pretrained))
        pretrained = source if args.run_id else pretrained  # the exported file was temporary
    except (ConfigError, SpecError, DataError, ModelError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"{args.model} ({source}), {time.time() - t0:.1f}s")
    for spec in specs:
        m = {k.removeprefix(f"{spec.name}_"): v for k, v in metrics.items() if k.startswith(f"{spec.name}_")}
        if spec.task == "classification":
            line = (f"  {spec.name:<24} top-1 {m['top1']:.2%} [{m['top1_ci_low']:.2%}, {m['top1_ci_high']:.2%}]  "
                    f"balanced {m['balanced_accuracy']:.2%}")
            line += f"  top-5 {m['top5']:.2%}" if "top5" in m else ""
        else:
            line = (f"  {spec.name:<24} image->text R@1/5/10 {m['i2t_recall_at_1']:.2%} / {m['i2t_recall_at_5']:.2%} / "
                    f"{m['i2t_recall_at_10']:.2%}  text->image {m['t2i_recall_at_1']:.2%} / "
                    f"{m['t2i_recall_at_5']:.2%} / {m['t2i_recall_at_10']:.2%}")
        print(line + f"  ({int(m['images'])} images)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "pretrained": pretrained, "weights": source, "metrics": metrics}
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
