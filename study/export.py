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
from .vocabulary import WISEFT_BEST_ALPHA


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m study.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-id", help="a trial's MLflow run id (default: the best trial of the sweep below)")
    p.add_argument("--experiment", default="clip-alignment-study",
                   help="MLflow experiment (= study name; default: clip-alignment-study)")
    p.add_argument("--parent-run", help="the sweep's parent run id (default: the experiment's latest sweep "
                   "that is not a --smoke-test's, if it holds one)")
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


def find_trial(tracking_uri: str, experiment: str, parent_run: str | None, run_id: str | None):
    """The trial to export, with its model: ``(TrialRecord, model name, base weights)``: ``run_id``'s, else the best
    trial of the sweep (:meth:`study.tracking.SweepRecord.best`, the one rule). Raises :class:`ConfigError`."""
    from .tracking import read_sweep, read_trial_run

    try:
        if run_id:
            return read_trial_run(tracking_uri, run_id)
        sweep = read_sweep(tracking_uri, experiment, parent_run)
    except LookupError as exc:
        raise ConfigError(str(exc)) from None
    best = sweep.best()
    if best is None:
        raise ConfigError(f"--parent-run: sweep {sweep.parent_run_id} has no finished trial to export")
    return best, sweep.model_name, sweep.model_pretrained


def alpha_of(text: str, trial=None) -> float:
    """``--alpha``: a number in [0, 1], or ``best``: the alpha ``trial`` (a :class:`~study.tracking.TrialRecord`)
    chose on validation."""
    if text == "best":
        value = trial.metrics.get(WISEFT_BEST_ALPHA) if trial is not None else None
        if value is None:
            raise ConfigError(f"--alpha best: run {trial.run_id if trial else '?'} logged no {WISEFT_BEST_ALPHA}")
        return float(value)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--alpha: {text!r} is neither a number in [0, 1] nor 'best'") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"--alpha: {value:g} is outside [0, 1]")
    return value


def export_run(tracking_uri: str, trial, name: str, pretrained: str | None, alpha: float,
               out: Path) -> tuple[Path, dict]:
    """Write ``<out>/<trial id>.pt`` of ``trial`` (a :class:`~study.tracking.TrialRecord` of model ``name`` on base
    weights ``pretrained``), plus the model config for project models and ``<trial id>.json`` notes; returns the
    checkpoint's path and the notes."""
    import shutil

    from .library.export import merged_clip, trained_model, write_checkpoint
    from .library.models import CONFIG_DIR
    from .tracking import download

    if trial.settings is None:
        raise ConfigError(f"--run-id: run {trial.run_id} holds no readable trial_config.json")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = download(tracking_uri, trial.run_id, "adapter", Path(tmp))
        lm = trained_model(name, pretrained, trial.settings, adapter, alpha)
    stem = trial.trial_id + (f"-alpha{alpha:g}" if alpha != 1 else "")
    path = write_checkpoint(merged_clip(lm.model), out / f"{stem}.pt")
    if (CONFIG_DIR / f"{name}.json").exists():  # a project model: open_clip needs its config too
        shutil.copy(CONFIG_DIR / f"{name}.json", out / f"{name}.json")
    notes = {"run_id": trial.run_id, "trial_id": trial.trial_id, "model": name, "base_pretrained": pretrained,
             "alpha": alpha, "settings": trial.settings.model_dump(),
             # the trial as trained (alpha 1); at its chosen alpha, its val/ and test/ wiseft_best_* ones
             "logged_final_metrics": {k: v for k, v in trial.metrics.items() if "/wiseft/" not in k}}
    (out / f"{stem}.json").write_text(json.dumps(notes, indent=2))
    return path, notes


def log_model(uri: str, trial, path: Path, model_name: str, register: str | None) -> str:
    """Log the exported model to the trial's run as an ``mlflow.pytorch`` model and optionally register it
    (:func:`study.tracking.log_trial_model`); returns the URI to load it by."""
    import open_clip
    import torch

    from .library.models import register_configs
    from .tracking import log_trial_model

    register_configs()
    model = open_clip.create_model(model_name, pretrained=str(path), weights_only=True)
    return log_trial_model(uri, trial.run_id, model, register,
                           [f"torch=={torch.__version__.split('+')[0]}", f"open_clip_torch=={open_clip.__version__}"])


def export_best(tracking_uri: str, experiment: str, parent_run: str | None, out: Path, alpha: str = "1",
                register: str | None = None, run_id: str | None = None) -> tuple[Path, dict, float, str | None]:
    """Export a sweep's best trial (or ``run_id``'s) at WiSE-FT ``alpha`` (a number or ``best``) into ``out``; with
    ``register``, also log it as an MLflow model and register it. Returns the checkpoint, its notes, the alpha
    and the MLflow model's URI (None without ``register``). Raises :class:`ConfigError` on bad input."""
    trial, name, pretrained = find_trial(tracking_uri, experiment, parent_run, run_id)
    value = alpha_of(alpha, trial)
    path, notes = export_run(tracking_uri, trial, name, pretrained, value, out)
    uri = log_model(tracking_uri, trial, path, name, register) if register else None
    return path, notes, value, uri


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small downloads
    try:
        args = build_parser().parse_args(argv)
        args.tracking_uri = existing_store(args.tracking_uri)
        out = check_folder(args.out, "--out")
        if args.alpha != "best":
            alpha_of(args.alpha)  # a bad number fails before MLflow is read
        trial, name, pretrained = find_trial(args.tracking_uri, args.experiment, args.parent_run, args.run_id)
        alpha = alpha_of(args.alpha, trial)
        path, notes = export_run(args.tracking_uri, trial, name, pretrained, alpha, out)
    except (ConfigError, ExportError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uri = log_model(args.tracking_uri, trial, path, name, args.register) if args.log_model or args.register else None
    print("\n".join(described(path, notes, alpha, out, uri, args.register)))
    return 0


def described(path: Path, notes: dict, alpha: float, out: Path, uri: str | None, register: str | None) -> list[str]:
    """What an export wrote and how to load it, in lines."""
    lines = [f"wrote {path} (trial {notes['trial_id']}, run {notes['run_id']}, WiSE-FT alpha {alpha:g})"]
    if alpha == 0:
        lines.append("  note: at alpha 0 the trained change is scaled away: this is the base model itself")
    config_hint = (f"open_clip.add_model_config({str(out)!r}); " if (out / f"{notes['model']}.json").exists() else "")
    lines.append(f"  load: {config_hint}open_clip.create_model_and_transforms({notes['model']!r}, "
                 f"pretrained={str(path)!r})")
    if uri:
        lines.append(f"  MLflow model: {uri}" + (f" (registered as {register!r}; load it with "
                                                 f"mlflow.pytorch.load_model({uri!r}))" if register else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
