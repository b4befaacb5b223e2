"""The shipped cluster configs are valid Ray cluster-launcher configs, install and run this project,
and are secure: nothing binds to all interfaces, no control port is open to the world, no secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "cluster.yaml", *sorted((ROOT / "study" / "clusters").glob("*.yaml"))]
CONTROL_PORTS = {6379, 8265, 10001, 5000}  # GCS, dashboard, Ray client, MLflow
SECRET_PATTERNS = [
    (r"AKIA[0-9A-Z]{16}", "an AWS access key id"),
    (r"(?i)aws_secret_access_key|secret_access_key\s*[:=]", "an AWS secret key"),
    (r"-----BEGIN [A-Z ]*PRIVATE KEY-----", "a private key"),
    (r"(?i)\b(password|passwd|api[_-]?key)\s*[:=]\s*\S+", "a password or API key"),
    (r"(?i)RAY_AUTH_TOKEN\s*=", "a Ray token value"),
    (r"[a-z]+://[^/\s:@]+:[^/\s@]+@", "credentials inside a URI"),
    (r"(?i)\bghp_[A-Za-z0-9]{20,}|xox[bp]-[A-Za-z0-9-]+", "an access token"),
]


def security_problems(text: str) -> list[str]:
    """Every way ``text`` (a cluster config) is insecure; empty when it is fine."""
    problems = []
    if re.search(r"0\.0\.0\.0|::/0|\[::\]", text):
        problems.append("binds to or opens all interfaces (0.0.0.0 or ::/0)")
    cfg = yaml.safe_load(text)
    commands = " ".join(str(c) for key in ("head_start_ray_commands", "worker_start_ray_commands",
                                          "setup_commands", "head_setup_commands") for c in cfg.get(key) or [])
    for host in re.findall(r"--dashboard-host[= ](\S+)", commands):
        if host != "127.0.0.1":
            problems.append(f"dashboard listens on {host}")
    if "ray start --head" in commands.replace("~/clip-study-venv/bin/", "") and "--dashboard-host=127.0.0.1" not in commands:
        problems.append("the head's dashboard is not bound to 127.0.0.1")
    for host in re.findall(r"mlflow server[^&]*?--host\s+(\S+)", commands):
        if not (host == "127.0.0.1" or host.startswith("$(hostname")):  # loopback or the private address
            problems.append(f"mlflow server listens on {host}")
    for host in re.findall(r"--ray-client-server-host[= ](\S+)|--node-ip-address[= ](0\S*)", commands):
        problems.append(f"a Ray service bound to {host}")
    rules = (cfg.get("provider", {}).get("security_group") or {}).get("IpPermissions", [])
    for rule in rules:
        ports = set(range(int(rule.get("FromPort", 0)), int(rule.get("ToPort", 65535)) + 1))
        if ports & CONTROL_PORTS:
            problems.append(f"security group opens control port(s) {sorted(ports & CONTROL_PORTS)}")
    for pattern, what in SECRET_PATTERNS:
        if re.search(pattern, text):
            problems.append(f"holds what looks like {what}")
    return problems


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_validates_against_ray_schema(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config({**raw, "not_a_field": 1}))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_secure(path):
    assert security_problems(path.read_text()) == []


@pytest.mark.parametrize("mutation,problem", [
    (("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), "all interfaces"),
    (("--port 5000", "--port 5000 --host 0.0.0.0"), "all interfaces"),
    (("CidrIp: 203.0.113.7/32", "CidrIp: 0.0.0.0/0"), "all interfaces"),
    (("FromPort: 22\n", "FromPort: 22\n        # x\n"), None),
    (("ToPort: 22", "ToPort: 8265"), "control port"),
    (("ssh_user: ubuntu", "ssh_user: ubuntu\n  password: hunter2"), "password"),
    (("region: us-west-2 ", "region: us-west-2 # AKIAABCDEFGHIJKLMNOP "), "AWS access key"),
    (("echo sqlite:////home/ray/mlflow.db", "echo postgresql://study:s3cret@db:5432/mlflow"), "credentials inside a URI"),
])
def test_security_check_catches_what_it_should(mutation, problem):
    text = (ROOT / "cluster.yaml").read_text()
    assert mutation[0] in text
    found = security_problems(text.replace(mutation[0], mutation[1], 1))
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_gpu_workers_token_auth_object_storage():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instance families
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert "2.60.0" in cfg["docker"]["image"]
    assert any("pip install" in c and "clip-study" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ray/clip-study"] == "."
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--artifacts-destination s3://" in head and "--backend-store-uri" in head
    assert any("CLIP_STUDY_STORAGE_PATH=s3://" in c for c in cfg["setup_commands"])


def test_onprem_config_uses_the_local_provider_with_token_auth():
    cfg = yaml.safe_load((ROOT / "study" / "clusters" / "onprem.yaml").read_text())
    assert cfg["provider"]["type"] == "local" and cfg["provider"]["worker_ips"]
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray st" in c)
