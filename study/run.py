"""``python -m study.run``: sweep LoRA fine-tuning of a CLIP alignment module, logged to MLflow.

The one entry point. It validates everything first (exit 2 on bad input, before
Ray starts or MLflow is touched), prepares the base model and baseline, runs the
Ray Tune + Optuna sweep (a one-worker trial trains in its Tune trial, a DDP trial over
Ray Train workers), and prints the answer.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]):
    # Within the first second: the imports and checks below take several (torch alone about 2 s).
    print("[study] checking the configuration, data, model and tracking store; nothing starts until they pass",
          flush=True)

from .checks import Parser, count_or_auto, model_name, positive_int
from .config import SPACES_DIR, Blame, ConfigError, load_study_config, parse_override
from .library.models import ModelError
from .library.sources import DataError

SMOKE_OVERRIDES = [(k, v, "--smoke-test") for k, v in (  # the tiniest real study: 2 trials, one short epoch
    ("search.trials", 2), ("search.max_concurrent", 2), ("params.epochs", 1), ("params.batch_size", 32),
    ("data.offline_scale", 0.1), ("model.pretrain.steps", 60), ("model.pretrain.data_scale", 0.1),
    ("model.pretrain.batch_size", 128))]


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show a default only where there is one worth reading."""

    def _get_help_string(self, action):
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


EXAMPLES = """examples:
  python -m study.run                                  # the default offline study
  python -m study.run --smoke-test                     # 2 tiny trials, about a minute
  python -m study.run --space pareto --trials 16 --max-concurrent 2   # a shipped space, by name
  python -m study.run --set lora_rank=8 --set params.learning_rate.high=0.02
  python -m study.run --seeds 3 --replicate-top 2       # then rerun the best 2 with 3 seeds each
  python -m study.run --resume                         # continue an interrupted sweep
  python -m study.run --register clip-cells            # then the best trial -> MLflow Model Registry
  python -m study.run --space my_cells.yaml            # your own labelled image folder (README: "Your own data")
  mlflow ui --backend-store-uri sqlite:///mlflow.db    # browse the runs
"""


def space_path(text: str) -> Path:
    """argparse type for ``--space``: a path, else a space shipped in ``search_spaces/`` by name (``pareto``,
    ``pareto.yaml``, ``search_spaces/pareto.yaml`` from any directory); a path that is neither is kept, so
    the config check names it."""
    path = Path(text).expanduser()
    if path.exists() or path.parts[:-1] not in ((), (SPACES_DIR.name,)):
        return path
    shipped = SPACES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.exists() else path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m study.run",
        description="Fine-tune the image-text alignment module (LoRA adapters, or full, BitFit or attention-only "
                    "tuning of the last K blocks; projection heads, temperature) of a CLIP model on a domain dataset, "
                    "searching hyperparameters with Ray Tune + Optuna (a trial trains in its Tune trial, or over Ray "
                    "Train workers with DDP), and record every trial in MLflow. "
                    "With no arguments: the offline default study.",
        epilog=EXAMPLES, formatter_class=_Help)
    p.add_argument("--space", type=space_path, default=SPACES_DIR / "default.yaml",
                   help="search-space YAML (distributions, fixed values, trials, concurrency, resources, objective): "
                        "a path, or the name of one the project ships (default, pareto, methods, kshot)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the space, e.g. --set search.trials=4, --set lora_rank=8 "
                        "(a bare parameter name fixes it), --set params.learning_rate.high=0.1; repeatable")
    p.add_argument("--trials", type=positive_int, help="number of trials (same as --set search.trials=N); with "
                   "--resume, a larger number extends the sweep")
    p.add_argument("--max-concurrent", type=count_or_auto, metavar="N|auto",
                   help="trials running at once; auto: as many as the free CPUs/GPUs hold")
    p.add_argument("--workers", type=positive_int,
                   help="Ray Train workers per trial (DDP; gloo on CPU, nccl on GPU)")
    p.add_argument("--seeds", type=positive_int, metavar="N",
                   help="after the sweep, rerun the best configurations until each has N seeds and report mean +/- "
                        "sd (same as --set search.replicate_seeds=N); the sweep trial counts as the first seed")
    p.add_argument("--replicate-top", metavar="K|all",
                   help="how many of the best trials --seeds replicates (default: the space's "
                        "search.replicate_top, 3); 'all' for every finished trial")
    p.add_argument("--name", help="study name = MLflow experiment name (default: the space's 'name')")
    p.add_argument("--smoke-test", action="store_true",
                   help="the tiniest real study: 2 trials, 1 short epoch, tiny data; finishes in about a minute")
    p.add_argument("--resume", action="store_true",
                   help="continue this study's last interrupted sweep: finished trials are kept, unfinished ones "
                        "resume from their checkpoints, each trial keeps its one MLflow run")
    p.add_argument("--tracking-uri",
                   help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default: sqlite:///mlflow.db in the current "
                        "directory, MLflow's own embedded store")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"),
                   help="Ray Tune/Train storage (checkpoints, experiment state) and sweep state; on a cluster, "
                        "a shared path or s3:// URI is set with --storage-path")
    p.add_argument("--storage-path",
                   help="Ray storage_path for checkpoints and sweep state, shared by all nodes (e.g. "
                        "s3://bucket/prefix on a cluster; env CLIP_STUDY_STORAGE_PATH); default: under --output-dir")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("CLIP_STUDY_CACHE", Path.home() / ".cache" / "clip-study")),
                   help="where the generated domains, the pretrained offline base model and the decoded image "
                        "stores (<cache>/stores, bounded by data.cache_max_gb) are cached (env CLIP_STUDY_CACHE)")
    p.add_argument("--address",
                   help="Ray cluster address (env RAY_ADDRESS); default: start a local Ray")
    p.add_argument("--register", metavar="NAME", type=model_name,
                   help="once the sweep is done, export its best trial (chosen on validation) to "
                        "<output-dir>/<study>/exports as an open_clip checkpoint, log it to the trial's run as an "
                        "MLflow model and register it as NAME (python -m study.export --register NAME does the "
                        "same for any sweep)")
    return p


def config_from_args(args):
    overrides = [parse_override(o) for o in args.overrides]
    if args.smoke_test:  # the space as the real run will read it must be valid too, not only its smoke version
        load_study_config(args.space, overrides)
        overrides = SMOKE_OVERRIDES + overrides
    top = args.replicate_top
    if top is not None:
        if top != "all" and not (top.isdigit() and int(top) >= 1):
            raise ConfigError(f"--replicate-top: expected an integer >= 1 or 'all', got {top!r}")
        overrides.append(("search.replicate_top", None if top == "all" else int(top), "--replicate-top"))
    for flag, key, value in (("--trials", "search.trials", args.trials),
                             ("--max-concurrent", "search.max_concurrent", args.max_concurrent),
                             ("--workers", "resources.workers_per_trial", args.workers), ("--name", "name", args.name),
                             ("--seeds", "search.replicate_seeds", args.seeds)):
        if value is not None:
            overrides.append((key, value, flag))
    return load_study_config(args.space, overrides), Blame(str(args.space), overrides)


def _given(value, env: str) -> tuple:
    """A flag's value, else its environment variable's: ``(value, the name to blame)``."""
    return (value, None) if value else (os.environ.get(env) or None, env)


def options_from_args(args):
    """The run's typed options (the one place the argparse namespace is read below ``main``)."""
    from .orchestration.sweep import RunOptions

    uri, env = _given(args.tracking_uri, "MLFLOW_TRACKING_URI")
    return RunOptions(output_dir=args.output_dir.resolve(), cache_dir=args.cache_dir.expanduser().absolute(),
                      tracking_uri=uri, storage_path=_given(args.storage_path, "CLIP_STUDY_STORAGE_PATH")[0],
                      address=_given(args.address, "RAY_ADDRESS")[0], resume=args.resume,
                      tracking_flag=env if uri and env else "--tracking-uri", smoke_test=args.smoke_test)


def checked(args):
    """Everything before the sweep: the config, the preflight, the inputs and the baseline. Raises on bad
    input; returns ``(config, prepared, options)``."""
    from .orchestration.preflight import preflight
    from .orchestration.prepare import prepare
    from .orchestration.sweep import SweepState

    cfg, blame = config_from_args(args)
    opts = options_from_args(args)
    state = SweepState.load(opts.state_file(cfg.name)) if opts.resume else None
    opts = preflight(cfg, blame, opts, state)
    return cfg, prepare(cfg, opts.cache_dir), opts


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 the sweep finished with at least one trial; 1 every trial failed; 2 bad input (one
    ``error:`` line, nothing started or written); 130 interrupted (continue with ``--resume``)."""
    from .orchestration.tuner import term_as_interrupt

    previous = signal.signal(signal.SIGTERM, term_as_interrupt)  # a `kill` stops as gracefully as Ctrl-C
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the report reads a file per trial
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        cfg, prepared, opts = checked(args)
    except (ConfigError, DataError, ModelError, OSError) as exc:  # each names the file or flag and the field at fault
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[study] interrupted before the sweep started; nothing was recorded", file=sys.stderr)
        return 130
    from .orchestration.sweep import run_study

    code = run_study(cfg, prepared, opts)
    return register_best(args.register, cfg.name, opts) if code == 0 and args.register else code


def register_best(name: str, study: str, opts) -> int:
    """``--register``: the finished sweep's best trial exported and registered (:func:`study.export.export_best`);
    0, or 1 when that fails (the sweep and its records stand)."""
    from .export import described, export_best
    from .orchestration.sweep import SweepState

    state, out = SweepState.load(opts.state_file(study)), opts.output_dir / study / "exports"
    print(f"[study] registering the best trial as {name!r}", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        path, notes, alpha, uri = export_best(state.tracking_uri, study, state.parent_run_id, out, register=name)
    except Exception as exc:  # noqa: BLE001 - the sweep and its records stand; say why the export did not
        print(f"error: --register: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(described(path, notes, alpha, out, uri, name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
