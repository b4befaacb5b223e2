"""A trial back as a model: the exported open_clip checkpoint reproduces the trial's logged metrics, and the live
peft model, the merged checkpoint and the logged ‖ΔW‖ describe the same change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import mlflow_runs, run_cli

from study.tracking import run_metrics


def _lora_model(seed: int = 0):
    """The offline model (random init) with LoRA on attention and MLP of its last 2 blocks in both towers, the
    projections and temperature trainable, every LoRA B and the projections moved away from their init."""
    from study.library.alignment import apply_alignment_module, trainable_state
    from study.library.models import load_base_model
    from study.settings import TrialSettings

    torch.manual_seed(seed)
    lm = load_base_model("clip-study-tiny", None)
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s = TrialSettings(lora_blocks=2, lora_rank=4, lora_targets=["attn", "mlp"], lora_towers=["image", "text"])
    model = apply_alignment_module(lm.model, s)
    initial = trainable_state(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.05 if "lora_" in n else 0.01))
    return lm, model, base, initial


def test_live_model_merged_checkpoint_and_weight_change_norm_agree(tmp_path):
    """peft <= 0.21 applies a LoRA nn.MultiheadAttention's out_proj delta twice (huggingface/peft#3774), in the
    forward as in the merge; ‖ΔW‖ must measure what the model computes, not the sum of get_delta_weight."""
    import open_clip

    from study.library.alignment import weight_change_norm
    from study.library.export import merged_clip, write_checkpoint
    from study.library.models import register_configs

    lm, model, base, initial = _lora_model()
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = lm.tokenizer(["a rod-shaped bacterium", "a red circle", "cocci in chains"])
    with torch.no_grad():
        live = [model.encode_image(images), model.encode_text(tokens)]
    logged = weight_change_norm(model, initial)

    path = write_checkpoint(merged_clip(model), tmp_path / "merged.pt")
    register_configs()
    loaded, _, _ = open_clip.create_model_and_transforms("clip-study-tiny", pretrained=str(path), weights_only=True)
    loaded.eval()
    with torch.no_grad():
        merged = [loaded.encode_image(images), loaded.encode_text(tokens)]
    for a, b in zip(live, merged):
        assert (a - b).abs().max().item() < 1e-5

    state = loaded.state_dict()
    real = sum(float((state[k].float() - base[k].float()).pow(2).sum()) for k in base if k in state) ** 0.5
    assert real > 0.1
    assert logged == pytest.approx(real, rel=1e-5)


def _export(cwd, *argv):
    proc = subprocess.run([sys.executable, "-m", "study.export", "--out", "exports", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "open_clip.create_model_and_transforms" in proc.stdout
    return proc.stdout


def _evaluate_checkpoint(ckpt: Path, cache: Path) -> dict:
    """The checkpoint alone, through open_clip's own loader, on the smoke study's benchmark parts."""
    import open_clip

    from study.config import load_study_config
    from study.library.benchmarks import eval_sets
    from study.library.zeroshot import evaluate_sets
    from study.run import SMOKE_OVERRIDES

    cfg = load_study_config(None, SMOKE_OVERRIDES)
    open_clip.add_model_config(str(ckpt.parent))
    model, _, preprocess = open_clip.create_model_and_transforms("clip-study-tiny", pretrained=str(ckpt),
                                                                 weights_only=True)
    sets = eval_sets(cfg.data, cache, preprocess, validation_share=cfg.evaluation.validation_share)
    metrics, _, _ = evaluate_sets(model.eval(), open_clip.get_tokenizer("clip-study-tiny"), sets, "cpu", detailed=True)
    return metrics


def test_export_reproduces_the_trials_logged_metrics_and_registers_the_model(tmp_path, smoke_cache, monkeypatch):
    # The sweep registers its best trial as trained (alpha 1): exported, logged as an MLflow model, registered.
    proc = run_cli(["--smoke-test", "--trials", "1", "--set", "params.epochs=2", "--register", "clip-smoke"],
                   tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "registered as 'clip-smoke'" in proc.stdout
    c, runs = mlflow_runs(tmp_path)
    trial = next(r for r in runs if r.data.tags["study.kind"] == "trial")
    m, tid = run_metrics(c, trial), trial.data.tags["study.trial_id"]  # every final metric the trial logged
    assert (tmp_path / "outputs" / "clip-alignment-study" / "exports" / f"{tid}.pt").is_file()

    # study.export on its own: the latest sweep's best trial.
    _export(tmp_path)
    ckpt = tmp_path / "exports" / f"{tid}.pt"
    assert json.loads(ckpt.with_suffix(".json").read_text())["run_id"] == trial.info.run_id
    metrics = _evaluate_checkpoint(ckpt, smoke_cache)
    compared = [k for k in metrics if k in m and not k.endswith("images") and "/wiseft" not in k]
    assert len(compared) >= 40
    for k in compared:
        assert metrics[k] == pytest.approx(m[k], abs=1e-5), k

    from mlflow.tracking import MlflowClient

    registry = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = registry.get_latest_versions("clip-smoke")[0]
    assert version.run_id == trial.info.run_id
    import mlflow

    # (mlflow.set_tracking_uri would leak into later tests' subprocesses: it exports MLFLOW_TRACKING_URI)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"models:/clip-smoke/{version.version}")  # the registered model, back
    exported = torch.load(tmp_path / "outputs" / "clip-alignment-study" / "exports" / f"{tid}.pt", weights_only=True)
    assert model.state_dict().keys() == exported.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    after = registry.get_run(trial.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == trial.info.end_time

    # The alpha the trial chose on validation reproduces its logged WiSE-FT numbers.
    alpha = m["wiseft_best_alpha"]
    _export(tmp_path, "--run-id", trial.info.run_id, "--alpha", "best")
    wise = _evaluate_checkpoint(tmp_path / "exports" / (f"{tid}-alpha{alpha:g}.pt" if alpha != 1 else f"{tid}.pt"),
                                smoke_cache)
    for part in ("val", "test"):
        for name in ("specialized_top1", "general_top1"):
            assert wise[f"{part}/{name}"] == pytest.approx(m[f"{part}/wiseft_best_{name}"], abs=1e-5), (part, name)


@pytest.mark.parametrize("argv, message", [
    (["--run-id", "nope"], "--run-id: no run 'nope'"),
    (["--alpha", "2"], "--alpha: 2 is outside [0, 1]"),
    (["--experiment", "absent"], "--experiment: no MLflow experiment named 'absent'"),
])
def test_export_bad_input_exits_2_with_one_line(tmp_path, argv, message):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("clip-alignment-study")
    proc = subprocess.run([sys.executable, "-m", "study.export", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), proc.stderr
    assert not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_every_methods_export_reproduces_its_trials_logged_metrics(tmp_path, smoke_cache):
    """One smoke trial per method (search_spaces/methods.yaml, stratified over the methods): each trial's exported
    checkpoint, loaded by open_clip alone, reproduces every metric the trial logged within 1e-5; its adapter
    artifact holds the tensors the method trains and no peft adapter unless the method is LoRA."""
    proc = run_cli(["--space", "methods", "--smoke-test", "--trials", "5", "--set", "lora_blocks=1"], tmp_path,
                   smoke_cache, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c, runs = mlflow_runs(tmp_path, "clip-alignment-methods")
    trials = [r for r in runs if r.data.tags["study.kind"] == "trial"]
    assert sorted(r.data.params["method"] for r in trials) == ["attention", "bitfit", "full", "lora", "projections"]
    for trial in trials:
        m, tid = run_metrics(c, trial), trial.data.tags["study.trial_id"]
        adapter = {a.path for a in c.list_artifacts(trial.info.run_id, "adapter")}
        assert ("adapter/adapter_model.safetensors" in adapter) == (trial.data.params["method"] == "lora")
        _export(tmp_path, "--run-id", trial.info.run_id)
        metrics = _evaluate_checkpoint(tmp_path / "exports" / f"{tid}.pt", smoke_cache)
        compared = [k for k in metrics if k in m and not k.endswith("images") and "/wiseft" not in k]
        assert len(compared) >= 40
        for k in compared:
            assert metrics[k] == pytest.approx(m[k], abs=1e-5), (trial.data.params["method"], k)
