"""Starting (or joining) a study's Ray so that every Ray client in it finds this study's Ray, cheaply.

Ray Train's placement-group cleaner (a detached actor, one per trial) queries the state API with no
address, so Ray resolves one in the cleaner's process: ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``,
else every ``gcs_server`` that ``ps`` shows on this machine. With two studies' Rays on one machine that
last step fails ("Found multiple active Ray instances"), and next to a ``ray start`` cluster it would pick
that one.

A local Ray's raylet is started by ``ray.init`` with the driver's environment, and every worker process
inherits the raylet's. So for a local Ray the driver picks the dashboard's port itself and sets
``RAY_API_SERVER_ADDRESS`` to it just for ``ray.init``: every worker of this study then reaches this
study's dashboard, and no job-level ``runtime_env`` is needed. (A job-level ``runtime_env``, e.g. a
``worker_process_setup_hook``, makes Ray start every worker through the runtime-env agent and keeps the
prestarted workers idle: about 0.35 s more per actor, and a trial starts eight.) A joined cluster's
raylets were started elsewhere, so there each worker pins ``RAY_ADDRESS`` itself in a setup hook.

This module imports nothing but the standard library and ``ray``: the hook runs in every Ray worker.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# A local Ray is this one machine: no node of it is ever drained or preempted, so Ray Train's preemption
# watcher (one more actor process per trial) has nothing to watch.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
PORT_ATTEMPTS = 3


def pin_ray_address():
    """Worker setup hook on a joined cluster: set ``RAY_ADDRESS`` to the Ray this worker is connected to."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(address: str | None, **kwargs) -> None:
    """``ray.init``: join the cluster at ``address`` with the setup hook, or start a local Ray whose workers
    all inherit its dashboard's address (``address`` None or ``"local"``)."""
    import ray

    if address and address != "local":
        ray.init(address=address, runtime_env={"worker_process_setup_hook": pin_ray_address}, **kwargs)
        return
    # A local Ray says on every start that token authentication is on (it is: nothing to act on).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        try:
            with environ({API_SERVER_ENV: f"http://127.0.0.1:{port}", **LOCAL_RAY_ENV}):
                ray.init(address=address, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                         **kwargs)
            return
        except ValueError as exc:  # another process took the port between free_port() and ray.init
            if "already occupied" not in str(exc) or attempt + 1 == PORT_ATTEMPTS:
                raise
            ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def environ(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block, restored after (a study may run in-process)."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
