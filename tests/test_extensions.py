"""
Unit tests for :mod:`taskoffload.extensions`: the gateway's request fields
``key`` and ``detach`` and the ``resume`` message, as :func:`wire.decode_message`
reads them, and a worker's refusal of them.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from taskoffload import wire
from taskoffload.extensions import MAX_KEY_LENGTH, gateway_only
from tests._trial_bridge import pytest_module
from tests.test_worker import Server


def decode(message: dict[str, Any]) -> wire.Message:
    return wire.decode_message(orjson.dumps(message))


def test_key_and_detach_are_read() -> None:
    """A request's key and detach reach the Request."""
    request = decode({"id": 1, "function": "f", "key": "k", "detach": 30})
    assert isinstance(request, wire.Request)
    assert (request.key, request.detach) == ("k", 30.0)
    assert decode({"function": "f"}) == wire.Request(None, "f")


@pytest.mark.parametrize(
    "fields",
    [
        {"key": ""},
        {"key": "k" * (MAX_KEY_LENGTH + 1)},
        {"key": 3},
        {"key": "k", "batch": [{}]},
        {"detach": 0},
        {"detach": -1},
        {"detach": True},
        {"detach": "10"},
    ],
)
def test_bad_key_or_detach_is_bad_request_with_the_id(fields: dict[str, Any]) -> None:
    """An ill-typed or out-of-range key or detach, or a keyed batch, is
    bad_request with the request's id."""
    with pytest.raises(wire.BadMessage) as caught:
        decode({"id": 7, "function": "f", **fields})
    assert (caught.value.code, caught.value.request_id) == (wire.BAD_REQUEST, 7)


def test_a_key_of_the_longest_length_is_read() -> None:
    """A key of MAX_KEY_LENGTH characters is accepted."""
    request = decode({"function": "f", "key": "k" * MAX_KEY_LENGTH})
    assert isinstance(request, wire.Request) and len(request.key or "") == MAX_KEY_LENGTH


def test_resume_is_read() -> None:
    """{"resume": TOKEN} and {"resume": TOKEN, "after": SEQ} are resumes."""
    assert decode({"resume": "t"}) == wire.Resume("t")
    assert decode({"resume": "t", "after": 4}) == wire.Resume("t", 4)
    assert decode({"resume": "t", "after": None}) == wire.Resume("t")


@pytest.mark.parametrize(
    "message",
    [
        {"resume": ""},
        {"resume": 5},
        {"resume": "t" * 201},
        {"resume": "t", "after": -1},
        {"resume": "t", "after": 1.5},
        {"resume": "t", "after": True},
        {"resume": "t", "id": 1},
    ],
)
def test_bad_resume_is_bad_request(message: dict[str, Any]) -> None:
    """A malformed resume is bad_request with id null."""
    with pytest.raises(wire.BadMessage) as caught:
        decode(message)
    assert (caught.value.code, caught.value.request_id) == (wire.BAD_REQUEST, None)


def test_gateway_only_names_what_a_worker_refuses() -> None:
    """What a worker answers bad_request: batches, keys, detach, resumes."""
    assert gateway_only(wire.Request(1, "f")) is None
    assert gateway_only(wire.Request(1, "f", batch=())) == "batches"
    assert gateway_only(wire.Request(1, "f", key="k")) == "keyed requests (single flight)"
    assert gateway_only(wire.Request(1, "f", detach=1.0)) == "detached requests"
    assert gateway_only(wire.Resume("t")) == "resumes"


@pytest.mark.parametrize(
    ("message", "what"),
    [
        ({"id": 1, "function": "add", "key": "k"}, "keyed requests (single flight)"),
        ({"id": 1, "function": "add", "detach": 5}, "detached requests"),
        ({"resume": "t"}, "resumes"),
    ],
)
def test_a_worker_refuses_them(message: dict[str, Any], what: str) -> None:
    """A worker answers a key, a detach or a resume with bad_request, running nothing."""
    connection = Server().connect()
    connection.send(message)
    [reply] = connection.replies()
    assert reply == {
        "id": message.get("id"),
        "error": {
            "code": "bad_request",
            "message": f"{what} are served by the gateway, not by a worker",
        },
    }


testSuite = pytest_module(__file__)
