"""``bench/gpu.py``, the prepared GPU check: where CUDA is absent it stops at once with one clear line, and its code
runs here at tiny size on the CPU (``--cpu-smoke``), so the script a lent GPU runs is not untested. The check itself
runs on a GPU (README, "The GPU check"); the test that needs one skips cleanly elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def _run(args: list[str], tmp_path: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1", **env})


def test_without_cuda_it_stops_at_once_with_one_clear_line(tmp_path):
    proc = _run(["--json", str(tmp_path / "out.json")], tmp_path, 120, CUDA_VISIBLE_DEVICES="")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("bench/gpu.py: no CUDA device here"), proc.stderr
    assert "--cpu-smoke" in lines[0] and not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_its_code_runs_at_tiny_size_on_the_cpu(tmp_path):
    """Every row but packing (about a minute; packing starts Ray and four trials: ``-m slow`` runs it below)."""
    proc = _run(["--cpu-smoke", "--rows", "precision", "worker", "zero-shot", "prefix", "--json",
                 str(tmp_path / "out.json")], tmp_path, 900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert {r["row"] for r in rows} == {"precision", "worker", "zero-shot", "prefix"}
    by = {r["check"]: r for r in rows}
    assert by["bf16 vs fp32: test top1"]["ok"] is True  # CPU autocast in bf16 through the worker's own step
    assert by["top-1: evaluate_sets vs CLIP_benchmark"]["ok"] is True
    assert all(r["ok"] for r in rows if r["row"] == "prefix")
    assert "| zero-shot |" in proc.stdout and "WRONG" not in proc.stdout


@pytest.mark.slow
def test_packing_runs_four_worker_trials_at_once_under_ray_tune(tmp_path):
    proc = _run(["--cpu-smoke", "--rows", "packing", "--json", str(tmp_path / "out.json")], tmp_path, 1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (packing,) = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert packing["ok"] is True and packing["measured"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU check runs on a lent GPU")
def test_the_gpu_check_passes_on_this_gpu(tmp_path):
    proc = _run(["--json", str(tmp_path / "out.json")], tmp_path, 600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
