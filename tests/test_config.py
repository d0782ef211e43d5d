"""The pool's configuration line, from the supervisor to the fork server and workers."""

from __future__ import annotations

import sys

import pytest

from taskoffload.config import PoolConfig
from tests._trial_bridge import pytest_module

#: A configuration with every field away from its default.
FIELDS = dict(
    count=3,
    concurrency=2,
    tasks=("mytasks", "othertasks"),
    max_message=4096,
    stop_timeout=7.5,
    env={"TASKOFFLOAD_SMTP_HOST": "mail.example.org"},
    idle_timeout=5.0,
    max_tasks_per_child=10,
    max_memory_per_child=200,
    task_timeout=2.5,
    kill_grace=0.5,
    secret=b"\x00\xffsecret",
)


def test_the_line_reads_back_as_the_same_config() -> None:
    """``from_json`` gives back every field ``to_json`` sent, and the sender's import path."""
    read = PoolConfig.from_json(PoolConfig(**FIELDS).to_json())
    assert read.import_path == tuple(p for p in sys.path if p)
    assert read == PoolConfig(**FIELDS, import_path=read.import_path)


def test_no_secret_reads_back_as_none() -> None:
    """A pool without a shared secret sends none, and its workers read none."""
    assert PoolConfig.from_json(PoolConfig().to_json()).secret is None


@pytest.mark.parametrize("line", [b"[1]", b'{"count": 1}', b'{"count": "many"}'])
def test_a_garbled_line_is_a_value_error(line: bytes) -> None:
    """A line that is not a whole configuration raises ValueError, not KeyError."""
    with pytest.raises(ValueError):
        PoolConfig.from_json(line)


testSuite = pytest_module(__file__)
