"""cluster.yaml is a valid Ray cluster-launcher config that installs and runs this project."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.glob("cluster*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_validates_against_ray_schema(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**raw, "not_a_field": 1}))


def test_gpu_workers_install_and_run_the_project():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instance families
    assert "2.60.0" in cfg["docker"]["image"]
    assert any("pip install" in c and "clip-study" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/clip-study"] == "."


def test_nothing_listens_on_all_interfaces():
    text = (ROOT / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    cfg = yaml.safe_load(text)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "mlflow server --host $(hostname -I" in head
