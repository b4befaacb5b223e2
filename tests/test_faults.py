"""Multi-node sweeps that survive faults, on one machine (CI's cluster stage: ``pytest -m cluster``).

A head node with no CPUs plus three one-CPU Ray nodes (``ray.cluster_utils.Cluster``), a real
``mlflow server`` on 127.0.0.1, and a shared ``storage_path``. Two concurrent trials therefore run
on two different nodes. Each test injects one fault mid-sweep and checks what MLflow holds after:
every trial finished, exactly one run per trial, and a step history with no gaps or repeats.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.tracking import run_metrics
from study.orchestration.ray_address import free_port

pytestmark = pytest.mark.cluster
EPOCHS = 8
EXPERIMENT = "clip-alignment-study"


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store and proxied artifacts; stop() and start() again
    on the same port and store to simulate an outage."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start: " + (self.root / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # uvicorn waits for open keep-alive connections; an outage need not be graceful
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(3):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")  # this test process watches the cluster
    yield c
    ray.shutdown()
    c.shutdown()


def start_sweep(tmp_path: Path, cache: Path, address: str, tracking_uri: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "study.run", "--smoke-test", "--set", f"params.epochs={EPOCHS}",
           "--address", address, "--tracking-uri", tracking_uri, "--storage-path", str(tmp_path / "shared"),
           "--output-dir", str(tmp_path / "outputs"), "--cache-dir", str(cache), *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=open(tmp_path / "sweep.log", "ab"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 420) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    log = (tmp_path / "sweep.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    return log


def trial_runs(uri: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return c, []
    return c, [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("study.kind") == "trial"]


def wait_for_epoch(uri: str, epoch: int, trials: int = 1, timeout: float = 300) -> None:
    """Block until ``trials`` trials have each recorded ``epoch``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c, runs = trial_runs(uri)
            reached = [r for r in runs
                       if max((m.step for m in c.get_metric_history(r.info.run_id, "train_loss")), default=0) >= epoch]
            if len(reached) >= trials:
                return
        except Exception:  # the store is being created
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no trial reached epoch {epoch}")


def wait_for_checkpoints(shared: Path, count: int, trials: int, timeout: float = 300) -> None:
    """Block until ``trials`` trials each have ``count`` results with a checkpoint recorded by Tune (its
    ``result.json``: a trial that trains in Tune reports each epoch's checkpoint with its result, a Ray Train run
    passes each result on once Train registered its checkpoint)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = 0
        for log in shared.glob("sweep-*/trial_driver_*/result.json"):
            try:
                done += sum('"epoch"' in line for line in log.read_text().splitlines()) >= count
            except OSError:  # being written
                pass
        if done >= trials:
            return
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {trials} trials recorded {count} checkpoints")


def checkpoint_dirs(shared: Path) -> list[Path]:
    """Checkpoints stored so far: Tune's per trial, or Ray Train's per Train run."""
    return [*shared.glob("sweep-*/trial_driver_*/checkpoint_*"), *shared.glob("sweep-*/train/train-*/checkpoint_*")]


def assert_complete(uri: str, trials: int) -> list:
    """Every trial FINISHED, one run per trial id, epochs 1..EPOCHS each recorded exactly once."""
    c, runs = trial_runs(uri)
    live = [r for r in runs if r.data.tags.get("study.status") != "ORPHANED"]
    ids = [r.data.tags["study.trial_id"] for r in live]
    assert len(ids) == len(set(ids)) == trials, ids
    for r in live:
        assert r.info.status == "FINISHED" and r.data.tags["study.status"] == "FINISHED", r.data.tags
        for key in ("train_loss", "val/specialized_top1"):
            steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (r.data.tags["study.trial_id"], key, steps)
        final = run_metrics(c, r)  # its final records: metrics/final.json
        assert final["epoch"] == EPOCHS and "val/wiseft/alpha_0/specialized_top1" in final
        assert {a.path for a in c.list_artifacts(r.info.run_id, "adapter")} >= {"adapter/adapter_model.safetensors"}
    return live


def resumed_from(c, run) -> list[int]:
    return [int(m.value) for m in c.get_metric_history(run.info.run_id, "resumed_from_epoch")]


# A one-worker trial trains in its Tune trial (the default) or in a Ray Train run (resources.trial_runner).
RUNNERS = {"auto": "ImplicitFunc", "ray_train": "RayTrainWorker"}  # runner -> the actor class that trains


@pytest.mark.parametrize("runner", RUNNERS)
def test_node_killed_mid_trial_resumes_from_checkpoint_on_a_surviving_node(tmp_path, smoke_cache, server, cluster,
                                                                          runner):
    import ray

    proc = start_sweep(tmp_path, smoke_cache, cluster.address, server.uri, "--trials", "2", "--max-concurrent", "2",
                       "--set", f"resources.trial_runner={runner}")
    wait_for_checkpoints(tmp_path / "shared", 2, trials=2)  # both trials can resume, whichever node dies
    # Where the training processes live, from the GCS (the state API would need the dashboard).
    workers = [a for a in ray._private.state.actors().values()
               if a["ActorClassName"].endswith(RUNNERS[runner]) and a["State"] == "ALIVE"]
    assert workers, f"no {RUNNERS[runner]} actor alive"
    victim_id = workers[0]["Address"]["NodeID"]
    victim = next(n for n in cluster.list_all_nodes() if n.node_id == victim_id)
    assert not victim.head
    cluster.remove_node(victim, allow_graceful=False)  # the node and its worker die at once
    log = finish(proc, tmp_path)

    runs = assert_complete(server.uri, trials=2)
    c, _ = trial_runs(server.uri)
    resumed = {r.data.tags["study.trial_id"]: resumed_from(c, r) for r in runs}
    assert any(v and v[0] >= 2 for v in resumed.values()), resumed  # from a checkpoint, not from scratch
    # The GCS marks a SIGKILLed raylet dead after its health checks fail (about 30 s by Ray's defaults), which a
    # sweep of fast trials can outrun; the node must be gone by then, not necessarily when the sweep ends.
    deadline = time.time() + 90
    while victim_id in {n["NodeID"] for n in ray.nodes() if n["Alive"]} and time.time() < deadline:
        time.sleep(1)
    assert victim_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    print(f"node kill: trials finished 2/2, runs per trial 1, resumed from epochs {resumed}")
    assert "Study summary" in log


def test_tracking_server_down_mid_sweep_loses_nothing(tmp_path, smoke_cache, server, cluster):
    proc = start_sweep(tmp_path, smoke_cache, cluster.address, server.uri, "--trials", "2", "--max-concurrent", "2")
    wait_for_epoch(server.uri, 1)
    checkpoints = lambda: len(checkpoint_dirs(tmp_path / "shared"))  # noqa: E731
    before = checkpoints()
    server.stop()
    time.sleep(12)
    during = checkpoints()
    server.start()
    log = finish(proc, tmp_path)
    assert during > before, (before, during)  # training went on while MLflow was unreachable
    assert_complete(server.uri, trials=2)
    print(f"server outage: checkpoints written while down {during - before}; trials finished 2/2")
    assert "Study summary" in log


def test_driver_killed_then_resume_creates_no_duplicate_runs(tmp_path, smoke_cache, server, cluster):
    proc = start_sweep(tmp_path, smoke_cache, cluster.address, server.uri, "--trials", "3", "--max-concurrent", "2")
    wait_for_checkpoints(tmp_path / "shared", 2, trials=2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    time.sleep(3)  # let Ray reap the dead driver's actors
    _, before = trial_runs(server.uri)
    proc = start_sweep(tmp_path, smoke_cache, cluster.address, server.uri, "--trials", "3", "--max-concurrent", "2",
                       "--resume")
    log = finish(proc, tmp_path)
    runs = assert_complete(server.uri, trials=3)
    c, _ = trial_runs(server.uri)
    started = {r.data.tags["study.trial_id"] for r in before}
    assert started <= {r.data.tags["study.trial_id"] for r in runs}  # the runs opened before the kill were reused
    resumed = {r.data.tags["study.trial_id"]: resumed_from(c, r) for r in runs}
    assert any(resumed.values()), resumed
    print(f"driver kill: trials finished 3/3, runs per trial 1, resumed from epochs {resumed}")
    assert "resuming sweep" in log
