"""Turn a trial back into a model: ``python -m study.export`` writes an open_clip checkpoint of a trial run, or of
a sweep's best trial (chosen on validation, as the study's summary chooses), with LoRA merged, the trained
projections and temperature, and an optional WiSE-FT alpha.

    python -m study.export                                  # the latest sweep's best trial -> exports/
    python -m study.export --run-id 3f2a... --alpha best    # one trial, at its WiSE-FT alpha
    python -m study.export --register clip-micrographs      # also log it as an MLflow model and register it

``open_clip.create_model_and_transforms(name, pretrained="exports/<run>.pt")`` then loads it (for the project's
offline model, first ``open_clip.add_model_config("exports")``: its config is written beside the checkpoint).
Exit 0 written; 2 bad input (one ``error:`` line, nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .checks import Parser, check_folder, existing_store, model_name
from .config import ConfigError
from .library.export import ExportError
from .library.models import ModelError
from .vocabulary import FINISHED, KIND_TAG, PARENT_TAG, STATUS_TAG, SWEEP, TRIAL, TRIAL_TAG, WISEFT_BEST_ALPHA


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-id", help="a trial's MLflow run id (default: the best trial of the sweep below)")
    p.add_argument("--experiment", default="clip-alignment-study",
                   help="MLflow experiment (= study name; default: clip-alignment-study)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the experiment's latest sweep)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking URI (env MLFLOW_TRACKING_URI); default sqlite:///mlflow.db here")
    p.add_argument("--alpha", default="1", help="WiSE-FT alpha in [0, 1] (1: the trained model, 0: the base "
                                                "model), or 'best' for the alpha the trial chose on validation "
                                                "(default: 1)")
    p.add_argument("--out", type=Path, default=Path("exports"),
                   help="folder for <trial id>.pt (<trial id>-alpha<a>.pt below alpha 1), its notes <trial id>.json "
                        "and, for the offline model, its open_clip config (default: ./exports)")
    p.add_argument("--log-model", action="store_true",
                   help="also log the merged model to the trial's run as an MLflow model (mlflow.pytorch)")
    p.add_argument("--register", metavar="NAME", type=model_name,
                   help="log it (as --log-model) and register it as NAME in the MLflow Model Registry")
    return p


def find_trial(c, args):
    """The trial run to export: ``--run-id``, else the best finished trial of the sweep (first objective on
    validation, :func:`study.selection.best_trial`). Raises :class:`ConfigError`."""
    from mlflow.exceptions import MlflowException

    from analysis.records import run_metrics

    from .selection import best_trial

    if args.run_id:
        try:
            run = c.get_run(args.run_id)
        except MlflowException:
            raise ConfigError(f"--run-id: no run {args.run_id!r} at {args.tracking_uri}") from None
        if run.data.tags.get(KIND_TAG) not in (TRIAL, "replicate"):
            raise ConfigError(f"--run-id: run {args.run_id!r} is not a trial run (study.kind "
                              f"{run.data.tags.get(KIND_TAG)!r})")
        return run
    parent = find_parent(c, args)
    metric, _, mode = parent.data.params.get("search.objective", "specialized_top1:max").split(",")[0].partition(":")
    runs = c.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and "
                                                      f"tags.`{KIND_TAG}` = '{TRIAL}'", max_results=50000)
    finals = [(r.data.tags[TRIAL_TAG], run_metrics(c, r)) for r in runs if r.data.tags.get(STATUS_TAG) == FINISHED]
    best = best_trial(finals, f"val/{metric}", mode or "max")
    if best is None:
        raise ConfigError(f"--parent-run: sweep {parent.info.run_id} has no finished trial to export")
    return next(r for r in runs if r.data.tags[TRIAL_TAG] == best)


def find_parent(c, args):
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        raise ConfigError(f"--experiment: no MLflow experiment named {args.experiment!r} at {args.tracking_uri}")
    query = f"attributes.run_id = '{args.parent_run}'" if args.parent_run else f"tags.`{KIND_TAG}` = '{SWEEP}'"
    runs = c.search_runs([exp.experiment_id], query, order_by=["start_time DESC"], max_results=1)
    if not runs or runs[0].data.tags.get(KIND_TAG) != SWEEP:
        raise ConfigError(f"--parent-run: no sweep (parent) run {args.parent_run or ''} in {args.experiment!r}")
    return runs[0]


def alpha_of(text: str, run) -> float:
    if text == "best":
        value = run.data.metrics.get(WISEFT_BEST_ALPHA)
        if value is None:
            raise ConfigError(f"--alpha best: run {run.info.run_id} logged no {WISEFT_BEST_ALPHA}")
        return float(value)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--alpha: {text!r} is neither a number in [0, 1] nor 'best'") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"--alpha: {value:g} is outside [0, 1]")
    return value


def export_run(c, run, alpha: float, out: Path) -> tuple[Path, dict]:
    """Write ``<out>/<run name>.pt`` (+ the model config for project models, + ``<name>.json`` notes); returns
    the checkpoint's path and the notes."""
    import shutil

    from analysis.records import run_metrics

    from .library.export import merged_clip, trained_model, write_checkpoint
    from .library.models import CONFIG_DIR
    from .settings import TrialSettings

    parent = c.get_run(run.data.tags[PARENT_TAG])
    name, pretrained = parent.data.params["model.name"], parent.data.params.get("model.pretrained")
    pretrained = None if pretrained in (None, "None") else pretrained
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(c.download_artifacts(run.info.run_id, "trial_config.json", tmp))
        settings = TrialSettings.model_validate(json.loads(config.read_text()))
        adapter = Path(c.download_artifacts(run.info.run_id, "adapter", tmp))
        lm = trained_model(name, pretrained, settings, adapter, alpha)
    stem = f"{run.data.tags.get(TRIAL_TAG, run.info.run_id)}" + (f"-alpha{alpha:g}" if alpha != 1 else "")
    path = write_checkpoint(merged_clip(lm.model), out / f"{stem}.pt")
    if (CONFIG_DIR / f"{name}.json").exists():  # a project model: open_clip needs its config too
        shutil.copy(CONFIG_DIR / f"{name}.json", out / f"{name}.json")
    notes = {"run_id": run.info.run_id, "trial_id": run.data.tags.get(TRIAL_TAG), "model": name,
             "base_pretrained": pretrained, "alpha": alpha, "settings": settings.model_dump(),
             # the trial as trained (alpha 1); at its chosen alpha, its val/ and test/ wiseft_best_* ones
             "logged_final_metrics": {k: v for k, v in run_metrics(c, run).items() if "/wiseft/" not in k}}
    (out / f"{stem}.json").write_text(json.dumps(notes, indent=2))
    return path, notes


def log_model(uri: str, run, path: Path, model_name: str, register: str | None) -> str:
    """Log the exported model to the trial's run as an ``mlflow.pytorch`` model (the run's status and end time
    kept) and optionally register it; returns the URI to load it by (``models:/NAME/<version>`` when
    registered)."""
    import mlflow
    import open_clip
    import torch

    from .library.models import register_configs

    register_configs()
    model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True)
    mlflow.set_tracking_uri(uri)
    c = mlflow.MlflowClient(uri)
    status, end = run.info.status, run.info.end_time
    with mlflow.start_run(run_id=run.info.run_id):
        # pickle: MLflow 3's default (pt2) traces the forward with an example input; CLIP's takes two.
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=register,
                                        serialization_format="pickle",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                          f"open_clip_torch=={open_clip.__version__}"])
    c.set_terminated(run.info.run_id, status=status, end_time=end)
    return f"models:/{register}/{info.registered_model_version}" if register else info.model_uri


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small downloads
    try:
        args = build_parser().parse_args(argv)
        args.tracking_uri = existing_store(args.tracking_uri)
        out = check_folder(args.out, "--out")
        if args.alpha != "best":
            alpha_of(args.alpha, None)  # a bad number fails before MLflow is read
        from mlflow.tracking import MlflowClient

        c = MlflowClient(args.tracking_uri)
        run = find_trial(c, args)
        alpha = alpha_of(args.alpha, run)
        path, notes = export_run(c, run, alpha, out)
    except (ConfigError, ExportError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} (trial {notes['trial_id']}, run {notes['run_id']}, WiSE-FT alpha {alpha:g})")
    if alpha == 0:
        print("  note: at alpha 0 the trained change is scaled away: this is the base model itself")
    config_hint = (f"open_clip.add_model_config({str(out)!r}); " if (out / f"{notes['model']}.json").exists() else "")
    print(f"  load: {config_hint}open_clip.create_model_and_transforms({notes['model']!r}, pretrained={str(path)!r})")
    if args.log_model or args.register:
        uri = log_model(args.tracking_uri, run, path, notes["model"], args.register)
        print(f"  MLflow model: {uri}" + (f" (registered as {args.register!r}; load it with "
                                           f"mlflow.pytorch.load_model({uri!r}))" if args.register else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
