"""The cluster launcher end to end, on one machine (CI's cluster stage: ``pytest -m cluster``).

An ``sshd`` on 127.0.0.1 with a throwaway key stands in for the on-premises head. The shipped
on-premises config (``study/clusters/onprem.yaml``) is brought up with ``ray up -y``, the smoke
study runs on it (``ray exec``) and logs to the MLflow server the config started, the runs are
checked, ``ray down`` tears it down, and every process the test started is stopped.

Made to fit one machine, and nothing else: the head is 127.0.0.1 with no workers, SSH goes through
``nc`` to the test's port (``ssh_proxy_command``), ports are free ones, the MLflow server binds to
127.0.0.1 instead of the machine's first address, and the project's existing virtual environment
stands in for the one ``setup_commands`` would build (a fresh one would download every package).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from study.orchestration.ray_address import free_port

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOOLS = ("sshd", "ssh-keygen", "rsync", "nc")


def which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert path, f"{tool} is missing: .ci/run installs openssh-server, rsync and netcat-openbsd"
    return path


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:<free port>, accepting only a throwaway key; yields (port, private key)."""
    for tool in TOOLS:
        which(tool)
    d = tmp_path / "ssh"
    d.mkdir()
    subprocess.run([which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run([which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        "AllowTcpForwarding yes\n")
    proc = subprocess.Popen([which("sshd"), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=open(d / "sshd.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield port, d / "id"
    proc.terminate()
    proc.wait(10)


def onprem_config(tmp_path: Path, ssh_port: int, key: Path, gcs_port: int, mlflow_port: int, ray_tmp: str) -> Path:
    """The shipped on-premises config, pointed at this machine (see the module docstring)."""
    text = (ROOT / "study" / "clusters" / "onprem.yaml").read_text()
    text = (text.replace("~/clip-study-venv/bin/", f"{VENV_BIN}/")
                .replace("--port=6379", f"--port={gcs_port} --dashboard-port={free_port()} --num-cpus=2 "
                                        f"--temp-dir={ray_tmp}")
                .replace("$RAY_HEAD_IP:6379", f"$RAY_HEAD_IP:{gcs_port}")
                .replace("--port 5000", f"--port {mlflow_port}")
                .replace(":5000/health", f":{mlflow_port}/health")
                .replace("$(hostname -I | awk '{print $1}')", "127.0.0.1")
                .replace("$HOME/mlflow.db", str(tmp_path / "mlflow.db"))
                .replace("$HOME/mlartifacts", str(tmp_path / "mlartifacts"))
                .replace("~/mlflow-server.", f"{tmp_path}/mlflow-server."))
    cfg = yaml.safe_load(text)
    cfg["cluster_name"] = f"clip-study-test-{gcs_port}"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg.update(min_workers=0, max_workers=0)
    cfg["auth"] = {"ssh_user": os.environ.get("USER") or "root", "ssh_private_key": str(key),
                   "ssh_proxy_command": f"{which('nc')} 127.0.0.1 {ssh_port}"}
    cfg["file_mounts"] = {str(tmp_path / "clip-study"): str(ROOT)}
    cfg["setup_commands"] = [f"{VENV_BIN}/ray get-auth-token --generate >/dev/null 2>&1 || true"]
    path = tmp_path / "onprem-test.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ray_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(VENV_BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def kill_matching(*needles: str) -> list[int]:
    """SIGKILL every process whose command line holds one of ``needles``; returns their pids."""
    import psutil

    killed = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != os.getpid() and any(n in cmd for n in needles):
            try:
                p.kill()
                killed.append(p.info["pid"])
            except psutil.Error:
                pass
    return killed


def test_ray_up_runs_the_smoke_study_on_an_onprem_cluster(tmp_path, sshd, smoke_cache):
    from mlflow.tracking import MlflowClient

    ssh_port, key = sshd
    gcs_port, mlflow_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cfg = onprem_config(tmp_path, ssh_port, key, gcs_port, mlflow_port, ray_tmp)
    timings = {}
    try:
        t0 = time.time()
        up = ray_cli("up", "-y", "--no-config-cache", str(cfg), timeout=600)
        (tmp_path / "ray-up.log").write_text(up.stdout + up.stderr)
        timings["ray up"] = time.time() - t0
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]

        t0 = time.time()
        study = (f"cd {tmp_path / 'clip-study'} && RAY_AUTH_MODE=token PYTHONUNBUFFERED=1 "
                 f"{VENV_BIN}/python -m study.run --smoke-test --address 127.0.0.1:{gcs_port} "
                 f"--tracking-uri http://127.0.0.1:{mlflow_port} --cache-dir {smoke_cache} "
                 f"--output-dir {tmp_path / 'outputs'}")
        run = ray_cli("exec", str(cfg), study, timeout=600)
        timings["smoke study on the cluster"] = time.time() - t0
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "Study summary" in run.stdout + run.stderr

        c = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        exp = c.get_experiment_by_name("clip-alignment-study")
        runs = c.search_runs([exp.experiment_id])
        kinds = sorted(r.data.tags.get("study.kind") for r in runs)
        assert kinds == ["baseline", "sweep", "trial", "trial"], kinds
        trials = [r for r in runs if r.data.tags["study.kind"] == "trial"]
        assert all(r.info.status == "FINISHED" and "test/specialized_top1" in r.data.metrics for r in trials)
        finals = {a.path for a in c.list_artifacts(trials[0].info.run_id, "metrics")}
        assert "metrics/final.json" in finals and "metrics/per_class.csv" in finals  # proxied too
        artifacts = {a.path for a in c.list_artifacts(trials[0].info.run_id, "adapter")}
        assert "adapter/adapter_model.safetensors" in artifacts  # proxied by the server the config started
        assert (tmp_path / "mlartifacts").is_dir()

        t0 = time.time()
        down = ray_cli("down", "-y", str(cfg), timeout=300)
        timings["ray down"] = time.time() - t0
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        print("launcher stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    finally:
        # `ray down` with the local provider can leave the head's Ray processes (and the MLflow
        # server it never started) running: stop everything this test started, by pid.
        kill_matching(ray_tmp, f"--port {mlflow_port}", f"--port={gcs_port}", f"127.0.0.1:{gcs_port}")
        # ray up copies its config and the (throwaway) key to the head's home: remove our copies only.
        for leftover, ours in ((Path.home() / "ray_bootstrap_config.yaml", str(tmp_path)),
                               (Path.home() / "ray_bootstrap_key.pem", key.read_text())):
            if leftover.exists() and ours in leftover.read_text(errors="ignore"):
                leftover.unlink()
    import psutil

    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"])
                if ray_tmp in " ".join(p.info["cmdline"] or [])], "Ray processes left running"
    shutil.rmtree(ray_tmp, ignore_errors=True)
