"""Unit tests for :mod:`taskoffload.settings`: a worker's settings, read from the pool's."""

from __future__ import annotations

import attrs

from taskoffload.config import PoolConfig
from taskoffload.settings import WorkerSettings, WorkerSettingsFields
from tests._trial_bridge import pytest_module


def test_from_config() -> None:
    """A worker serves with the pool's limits and secret, tells clients the pool's
    size (workers times concurrency), and names itself by the id it is given."""
    config = PoolConfig(
        count=3,
        concurrency=2,
        max_message=4096,
        idle_timeout=5.0,
        task_timeout=9.0,
        secret=b"s3cret",
    )
    assert WorkerSettings.from_config(config, worker_id=77) == WorkerSettings(
        concurrency=2,
        max_message=4096,
        idle_timeout=5.0,
        task_timeout=9.0,
        worker_id=77,
        pool_slots=6,
        secret=b"s3cret",
    )


def test_pool_of_no_workers_tells_no_size() -> None:
    """A pool configured with no workers gives its clients no slot count."""
    assert WorkerSettings.from_config(PoolConfig(count=0), worker_id=1).pool_slots is None


def test_secret_not_in_repr() -> None:
    """The secret does not show in the settings' repr (and so in no log of them)."""
    assert "s3cret" not in repr(WorkerSettings(secret=b"s3cret"))


def test_keyword_fields_name_every_setting() -> None:
    """The keywords a factory takes as overrides are exactly the settings' fields."""
    assert set(WorkerSettingsFields.__annotations__) == set(attrs.fields_dict(WorkerSettings))


testSuite = pytest_module(__file__)
