"""Each Ray worker's own cluster address, for the Ray clients that resolve one by themselves.

Imported in every Ray worker process of a study (Ray's ``worker_process_setup_hook``), so it imports
nothing but ``os`` and ``ray``: no torch, no project module.
"""

from __future__ import annotations

import os


def pin_ray_address():
    """Set ``RAY_ADDRESS`` to the Ray instance this worker is connected to.

    Ray Train's placement-group cleaner (a detached actor) queries the state API with no address, so Ray
    resolves one: ``RAY_ADDRESS``, else every ``gcs_server`` that ``ps`` shows on this machine; with two
    studies' Rays on one machine that fails ("Found multiple active Ray instances"), and next to a
    ``ray start`` cluster it would pick that one. Workers are started by the raylet, so an ``os.environ``
    the driver sets after ``ray.init`` never reaches them; this hook runs in each worker once connected.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
