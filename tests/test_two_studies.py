"""Two studies started at once on one machine: each runs on its own local Ray, and both finish cleanly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import mlflow_runs, run_cli

pytestmark = pytest.mark.cluster


def test_two_studies_at_once_each_on_its_own_ray(tmp_path, smoke_cache, smoke_world):
    # smoke_world fills the cache first, so the two studies only read it.
    names = ("study-a", "study-b")
    dirs = [tmp_path / n for n in names]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda nd: run_cli(["--smoke-test", "--trials", "1", "--name", nd[0]], nd[1],
                                                 smoke_cache, timeout=600), zip(names, dirs)))
    for name, d, proc in zip(names, dirs, procs):
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out and "Found multiple active Ray instances" not in out, out[-6000:]
        _, runs = mlflow_runs(d, name)
        trials = [r for r in runs if r.data.tags.get("study.kind") == "trial"]
        assert len(trials) == 1 and trials[0].info.status == "FINISHED", name
        assert trials[0].data.tags["study.status"] == "FINISHED", name
