"""Shared fixtures: one local Ray (num_cpus=2), one smoke-scale cache of the offline world."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> Path:
    """One cache of the smoke-scale offline world (data + tiny pretrained base), shared by all tests."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke_world(smoke_cache):
    """The smoke study config, with its data and base model built in ``smoke_cache``."""
    from study.config import load_study_config
    from study.orchestration.prepare import prepare
    from study.run import SMOKE_OVERRIDES

    cfg = load_study_config(None, SMOKE_OVERRIDES)
    return cfg, prepare(cfg, smoke_cache)
