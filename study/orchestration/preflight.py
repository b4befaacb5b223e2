"""The preflight: everything about a study's environment checked before anything is written or started.

:func:`preflight` runs after the config is validated and before the data is decoded, Ray starts or MLflow is
touched. Each check raises :class:`~study.config.ConfigError` with one line naming the flag (or the file and
field) at fault, so ``study.run`` exits 2 having changed nothing. It returns the settings it normalised: the
tracking URI (absolute, so Ray workers in other folders find the same store).
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..checks import ANSWER_S, check_folder, optuna_storage, tracking_uri
from ..config import ConfigError, StudyConfig

STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow.fs opens


def storage_path(path: str) -> None:
    """``--storage-path``: a local folder this process can write, or a URI of a file system Ray Train's
    storage (pyarrow.fs) knows; the bucket itself is not contacted here."""
    if "://" not in path:
        check_folder(path, "--storage-path")
        return
    scheme = path.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"--storage-path: unknown file system {scheme + '://'!r} in {path!r}; use a shared folder "
                          f"or one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    if scheme == "file":
        check_folder(path.removeprefix("file://"), "--storage-path")


def check_address(address: str) -> None:
    """``--address`` (or ``RAY_ADDRESS``): a Ray GCS ``host:port`` (or ``ray://host:port``) that accepts a
    connection within a few seconds; ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address: {address!r} is not host:port (e.g. 10.0.0.5:6379), 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=ANSWER_S).close()
    except OSError as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} within {ANSWER_S:g} s "
                          f"({exc.strerror or exc}); start one with `ray start --head` or `ray up cluster.yaml`") from None


def check_resources(cfg: StudyConfig, address: Optional[str], blame) -> None:
    """Refuse a trial that no machine can ever hold: the GPUs and CPUs one worker asks for against this
    machine (a local Ray) or against the cluster's nodes (``--address``), so that the sweep cannot wait
    forever on a placement group. A cluster with an autoscaler (``ray up``) may still add nodes; there
    only the node types it can launch would tell, so the check is skipped."""
    r = cfg.resources
    if address:
        nodes = _cluster_nodes(address)
        if nodes is None:
            return
        label = f"the Ray cluster at {address}"
    else:
        nodes = [_this_machine()]
        label = "this machine (a local Ray; give --address to use a cluster)"
    fits = sum(min(int(n.get("CPU", 0) // r.cpus_per_worker) if r.cpus_per_worker else 10**6,
                   int(n.get("GPU", 0) // r.gpus_per_worker) if r.gpus_per_worker else 10**6) for n in nodes)
    if fits >= r.workers_per_trial:
        return
    cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    field = "gpus_per_worker" if r.gpus_per_worker and gpus < r.gpus_per_worker * r.workers_per_trial else (
        "cpus_per_worker" if fits == 0 else "workers_per_trial")
    raise ConfigError(f"{blame('resources.' + field)}: resources.{field}: a trial asks for {r.workers_per_trial} worker(s) x "
                      f"({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU), but {label} has {cpus:g} CPUs and "
                      f"{gpus:g} GPUs in all, so the trial could never start")


def _this_machine() -> dict:
    """What a local ``ray.init()`` would offer: Ray's own CPU count (it honours cgroup limits) and the
    CUDA devices torch sees."""
    import torch

    try:
        from ray._private.utils import get_num_cpus  # the count ray.init() uses; private, hence the fallback

        cpus = get_num_cpus()
    except (ImportError, AttributeError):
        cpus = os.cpu_count() or 1
    return {"CPU": cpus, "GPU": torch.cuda.device_count()}


def _cluster_nodes(address: str) -> Optional[list[dict]]:
    """The alive nodes' resources of the cluster at ``address``, or None when it has an autoscaler."""
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # written on the head by `ray up`
        return None
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({str(exc).splitlines()[0]})") from None
    try:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def preflight(cfg: StudyConfig, blame, opts, state=None):
    """Check the environment of a study (see the module docstring). ``opts`` are the command's
    ``RunOptions``; ``blame(field)`` names the file or flag that set a field; ``state`` the saved
    ``SweepState`` of the sweep ``--resume`` continues (its tracking URI is the default). Returns ``opts`` with
    the tracking URI checked and absolute; a SQLite ``search.optuna_storage`` is made absolute in ``cfg``."""
    check_folder(opts.output_dir, "--output-dir")
    check_folder(opts.cache_dir, "--cache-dir")
    if opts.storage_path:
        storage_path(opts.storage_path)
    if opts.address:
        check_address(opts.address)
    given = opts.tracking_uri or (state.tracking_uri if state else None)
    uri = tracking_uri(given, opts.tracking_flag if opts.tracking_uri else "--tracking-uri")
    if cfg.search.optuna_storage:
        cfg.search.optuna_storage = optuna_storage(cfg.search.optuna_storage,
                                                   f"{blame('search.optuna_storage')}: search.optuna_storage")
    else:
        optuna_storage(os.environ.get("OPTUNA_STORAGE"), "OPTUNA_STORAGE")
    check_resources(cfg, opts.address, blame)
    return replace(opts, tracking_uri=uri)
