"""
Unit tests for :mod:`taskoffload.lost`: the ``{"lost": PID}`` line and its
answer on the wire, the worker's answer from the death journal, and the
``cause`` an error reply carries.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from taskoffload import wire
from taskoffload.errors import TaskError
from taskoffload.lost import (
    JOURNAL_ENV,
    LostAnswer,
    LostQuery,
    encode_lost_answer,
    encode_lost_query,
    worker_answer,
)
from tests._trial_bridge import pytest_module
from tests.test_worker import Server


def test_lost_query_decodes() -> None:
    """``{"lost": PID}`` is a lost query; it round-trips."""
    assert wire.decode_message(b'{"lost": 4242}') == LostQuery(pid=4242)
    assert wire.decode_message(encode_lost_query(LostQuery(7))[:-1]) == LostQuery(7)


@pytest.mark.parametrize(
    "line", [b'{"lost": "x"}', b'{"lost": 0}', b'{"lost": true}', b'{"lost": 1, "id": 2}']
)
def test_malformed_lost_query_is_bad_request(line: bytes) -> None:
    """A lost query with anything but a positive whole pid, alone, is refused."""
    with pytest.raises(wire.BadMessage):
        wire.decode_message(line)


def test_lost_answer_decodes() -> None:
    """The worker's answer, with a cause or null, is read as a LostAnswer."""
    cause = {"exit_status": 3, "rss_mib": 1.5}
    line = encode_lost_answer(LostAnswer(pid=9, cause=cause))
    assert orjson.loads(line) == {"lost": 9, "cause": cause}
    assert wire.decode_reply(line[:-1]) == LostAnswer(pid=9, cause=cause)
    assert wire.decode_reply(b'{"lost": 9, "cause": null}') == LostAnswer(pid=9, cause=None)


def test_error_reply_carries_a_cause() -> None:
    """``cause`` goes through the error reply, and TaskError, both ways."""
    cause = {"signal": "SIGKILL", "oom": True}
    reply = TaskError(wire.WORKER_LOST, "lost", cause=cause).to_reply(5)
    line = wire.encode_reply(reply)
    assert orjson.loads(line)["error"] == {"code": "worker_lost", "message": "lost", "cause": cause}
    decoded = wire.decode_reply(line[:-1])
    assert isinstance(decoded, wire.ErrorReply)
    assert TaskError.from_reply(decoded).cause == cause
    plain = wire.encode_reply(TaskError(wire.WORKER_LOST, "lost").to_reply(5))
    assert "cause" not in orjson.loads(plain)["error"]


def test_worker_answers_from_the_journal(tmp_path: Path) -> None:
    """A worker answers with the journal's record, or null without one."""
    (tmp_path / "4242.json").write_bytes(b'{"exit_status": 3}')
    assert orjson.loads(worker_answer(4242, str(tmp_path))) == {
        "lost": 4242,
        "cause": {"exit_status": 3},
    }
    assert orjson.loads(worker_answer(4243, str(tmp_path))) == {"lost": 4243, "cause": None}


def test_task_server_answers_a_lost_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On its port, a worker answers ``{"lost": PID}`` at once, from the journal the
    environment names, and holds no slot for the connection."""
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path))
    (tmp_path / "77.json").write_bytes(b'{"signal": "SIGKILL"}')
    server = Server()
    connection = server.connect()
    connection.send({"session": {"reject_when_busy": True}})
    assert not server.factory.has_capacity  # held for the request to come
    connection.send({"lost": 77})
    connection.send({"lost": 78})
    ack, *answers = connection.replies()
    assert ack["session"]["deaths"] is True  # it says it answers them
    assert answers == [
        {"lost": 77, "cause": {"signal": "SIGKILL"}},
        {"lost": 78, "cause": None},
    ]
    assert server.factory.has_capacity


def test_without_a_journal_the_ack_says_no_deaths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with no death journal named (one not under a supervisor) does not
    say ``deaths``, so clients do not ask it; the ack decodes as saying so."""
    monkeypatch.delenv(JOURNAL_ENV, raising=False)
    server = Server()
    connection = server.connect()
    connection.send({"session": {"reject_when_busy": True}})
    [ack] = connection.replies()
    assert "deaths" not in ack["session"]
    told = wire.decode_reply(orjson.dumps({"session": {"worker": 1, "deaths": True}}))
    assert isinstance(told, wire.SessionAck) and told.deaths
    line = wire.encode_session_ack(wire.SessionAck(worker=1, deaths=True))
    assert orjson.loads(line)["session"]["deaths"] is True


testSuite = pytest_module(__file__)
