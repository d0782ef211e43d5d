"""
The hostile inputs: a hand-written corpus, each case as one line (worker port)
and as one text frame (gateway) with the replies each must get, and a
fixed-seed generator of random bytes, mutated requests and requests whose
fields hold random JSON values.
"""

from __future__ import annotations

import json
import random
from typing import Any

from harness.faults.oracle import (
    ANY,
    BAD,
    expect_error,
    expect_result,
)
from taskoffload import wire

__all__ = ["DEEP", "HUGE_INT", "NOOP", "Case", "corpus", "encode_request", "generated_inputs"]


def _nested(depth: int) -> Any:
    """``0`` inside ``depth`` nested arrays."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def encode_request(request_id: Any, function: str, args: Any = None, **fields: Any) -> bytes:
    """A request as JSON bytes (no newline): ``args`` only when given, then ``fields``."""
    message: dict[str, Any] = {"id": request_id, "function": function, **fields}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode()


class Case:
    """
    One hand-written input: ``payload`` as one line (worker port) and as one text
    frame (gateway), and the replies each must get.
    """

    def __init__(
        self,
        name: str,
        payload: bytes,
        expected: list[dict[str, Any]],
        gateway: list[dict[str, Any]] | None = None,
        gateway_close: int | None = None,
    ) -> None:
        self.name = name
        self.payload = payload
        self.expected = expected
        self.gateway = expected if gateway is None else gateway
        self.gateway_close = gateway_close


NOOP = b'{"id": 1, "function": "noop"}'
DEEP = b"[" * 10000 + b"]" * 10000
HUGE_INT = b"1" + b"0" * 5000


def corpus() -> list[Case]:
    """The hand-written inputs sent, each alone, on both ports."""
    return [
        *_structure_cases(),
        *_encoding_cases(),
        *_message_cases(),
        *_call_cases(),
        *_id_cases(),
    ]


def _structure_cases() -> list[Case]:
    """Deep nesting and huge numbers."""
    nested_300 = _nested(300)
    return [
        # Deep nesting.
        Case("10000 [ then 10000 ]", DEEP, BAD),
        Case("10000 [ unclosed", b"[" * 10000, BAD),
        Case(
            "10000 levels in args",
            b'{"id": 1, "function": "echo", "args": {"x": ' + DEEP + b"}}",
            BAD,
        ),
        Case(
            "300 levels echoed",
            encode_request(1, "echo", {"x": nested_300}),
            [expect_result({"x": nested_300}, 1)],
        ),
        # Read, but too deep to write again: the worker runs the task and cannot
        # encode its result; the gateway cannot encode the request for the pool.
        Case(
            "1000 levels",
            b'{"id": 1, "function": "echo", "args": {"x": '
            + b"[" * 1000
            + b"0"
            + b"]" * 1000
            + b"}}",
            [expect_error(wire.TASK_FAILED, 1)],
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
        # Huge numbers.
        Case("1e999999 as the id", b'{"id": 1e999999, "function": "noop"}', BAD),
        Case(
            "1e999999 as an argument",
            b'{"id": 1, "function": "echo", "args": {"x": 1e999999}}',
            BAD,
        ),
        Case(
            "a 5001-digit integer as the id", b'{"id": ' + HUGE_INT + b', "function": "noop"}', BAD
        ),
        Case(
            "a 5001-digit integer as an argument",
            b'{"id": 1, "function": "echo", "args": {"x": ' + HUGE_INT + b"}}",
            BAD,
        ),
        Case("NaN", b'{"id": 1, "function": "echo", "args": {"x": NaN}}', BAD),
        Case("Infinity", b'{"id": 1, "function": "echo", "args": {"x": -Infinity}}', BAD),
        Case(
            "1e-400 underflows to 0",
            b'{"id": 1, "function": "echo", "args": {"x": 1e-400}}',
            [expect_result({"x": 0.0}, 1)],
        ),
        Case(
            "2**64 - 1 exactly", encode_request(2**64 - 1, "noop"), [expect_result(None, 2**64 - 1)]
        ),
        Case("-2**63 exactly", encode_request(-(2**63), "noop"), [expect_result(None, -(2**63))]),
    ]


def _encoding_cases() -> list[Case]:
    """NUL bytes and invalid UTF-8."""
    return [
        # NUL bytes.
        Case("a NUL after the object", NOOP + b"\x00", BAD),
        Case("100 NULs", b"\x00" * 100, BAD),
        Case("a raw NUL in a string", b'{"id": "a\x00b", "function": "noop"}', BAD),
        Case(
            "an escaped NUL in the id and the arguments",
            b'{"id": "a\\u0000b", "function": "echo", "args": {"s": "\\u0000"}}',
            [expect_result({"s": "\x00"}, "a\x00b")],
        ),
        # Invalid UTF-8: bad_request on the worker port; a text frame that is not
        # UTF-8 fails the WebSocket connection (RFC 6455 section 8.1: close code 1007).
        Case(
            "\\xff in a string",
            b'{"id": 1, "function": "echo", "args": {"s": "\xff\xfe"}}',
            BAD,
            [],
            1007,
        ),
        Case(
            "an overlong encoding",
            b'{"id": 1, "function": "echo", "args": {"s": "\xc0\xaf"}}',
            BAD,
            [],
            1007,
        ),
        Case(
            "an encoded surrogate",
            b'{"id": 1, "function": "echo", "args": {"s": "\xed\xa0\x80"}}',
            BAD,
            [],
            1007,
        ),
        Case("a truncated sequence", b'{"id": 1, "function": "noop"}\xe2\x82', BAD, [], 1007),
        Case(
            "an escaped lone surrogate",
            b'{"id": 1, "function": "echo", "args": {"s": "\\ud800"}}',
            BAD,
        ),
        Case("a byte-order mark", b"\xef\xbb\xbf" + NOOP, BAD),
    ]


def _message_cases() -> list[Case]:
    """Messages that are not requests, and requests with missing or bad fields."""
    return [
        # Not requests.
        Case("an empty message", b"", BAD),
        Case("blanks", b" \t ", BAD),
        Case("an array", b"[]", BAD),
        Case("a string", b'"noop"', BAD),
        Case("a number", b"1", BAD),
        Case("null", b"null", BAD),
        Case("true", b"true", BAD),
        Case("garbage after the object", NOOP + b" x", BAD),
        Case("two objects on one line", NOOP + NOOP, BAD),
        Case("no function", b'{"id": 1}', [expect_error(wire.BAD_REQUEST, 1)]),
        Case(
            "function not a string",
            b'{"id": 1, "function": 7}',
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
        Case(
            "an unknown field",
            b'{"id": 1, "function": "noop", "method": "x"}',
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
        Case(
            "timeout 0",
            b'{"id": 1, "function": "noop", "timeout": 0}',
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
        Case(
            "timeout true",
            b'{"id": 1, "function": "noop", "timeout": true}',
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
    ]


def _call_cases() -> list[Case]:
    """Huge timeouts, unknown functions, arguments that do not bind, batches,
    cancels, session lines, a repeated key and long text."""
    long_text = "a" * 900_000
    return [
        Case("timeout 1e300", encode_request(1, "noop", timeout=1e300), [expect_result(None, 1)]),
        Case(
            "timeout 2**64 - 1",
            encode_request(1, "noop", timeout=2**64 - 1),
            [expect_result(None, 1)],
        ),
        Case(
            "an unknown function",
            encode_request(1, "nope"),
            [expect_error(wire.UNKNOWN_FUNCTION, 1)],
        ),
        Case(
            "a dotted function name",
            encode_request(1, "os.system", ["true"]),
            [expect_error(wire.UNKNOWN_FUNCTION, 1)],
        ),
        Case(
            "arguments that do not bind",
            encode_request(1, "sleep", {"secs": 1}),
            [expect_error(wire.BAD_ARGUMENTS, 1)],
        ),
        Case(
            "progress passed by the caller",
            encode_request(1, "noop", {"progress": 1}),
            [expect_error(wire.BAD_ARGUMENTS, 1)],
        ),
        Case(
            "a batch",
            encode_request(1, "echo", batch=[{"a": 1}]),
            [expect_error(wire.BAD_REQUEST, 1)],
            [expect_result([{"result": {"a": 1}}], 1)],
        ),
        Case(
            "an empty batch",
            encode_request(1, "echo", batch=[]),
            [expect_error(wire.BAD_REQUEST, 1)],
        ),
        Case("a cancel of nothing", b'{"cancel": "nope"}', []),
        Case("a cancel of true", b'{"cancel": true}', BAD),
        Case("a cancel with more fields", b'{"cancel": 1, "id": 1}', BAD),
        Case(
            "a session line",
            b'{"session": {}}',
            [{"session": ANY}],
            [expect_error(wire.BAD_REQUEST)],
        ),
        Case("a bad session option", b'{"session": {"reject_when_busy": 1}}', BAD),
        Case(
            "a key given twice", b'{"id": 1, "id": 2, "function": "noop"}', [expect_result(None, 2)]
        ),
        Case(
            "900 kB of text echoed",
            encode_request(1, "echo", {"s": long_text}),
            [expect_result({"s": long_text}, 1)],
        ),
        Case("a \\r before the newline", NOOP + b"\r", [expect_result(None, 1)]),
    ]


def _id_cases() -> list[Case]:
    """A noop with an id of every JSON type."""
    cases = []
    # Ids of every JSON type: strings and numbers come back unchanged; null is
    # "no id"; booleans, objects and arrays are refused.
    for request_id, expected in [
        ("abc", [expect_result(None, "abc")]),
        ("", [expect_result(None, "")]),
        (7, [expect_result(None, 7)]),
        (-3, [expect_result(None, -3)]),
        (1.5, [expect_result(None, 1.5)]),
        (1e300, [expect_result(None, 1e300)]),
        (None, [expect_result(None, None)]),
        (True, BAD),
        (False, BAD),
        ({"a": 1}, BAD),
        ([1], BAD),
    ]:
        cases.append(
            Case(f"id {json.dumps(request_id)}", encode_request(request_id, "noop"), expected)
        )
    return cases


_TOKENS = [
    b"\x00", b"\xff", b"\xc0\x80", b"\\u0000", b"\\ud800", b"[" * 2000, b"]", b"{", b"}",
    b'"', b"\\", b"1e999", b"-0", b"NaN", b"null", b"true", b",", b":", b"\r", b" " * 10,
    b'"id"', b'"function"', b'"args"', b'"batch"', b'"cancel"', b'"session"', b'"timeout"',
    b"18446744073709551616", b"1" * 400,
]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**63), 2**64 - 1, rng.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 5e-324, rng.uniform(-1e9, 1e9)])
    if kind in (4, 5):
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFF)]))
            for _ in range(rng.randrange(8))
        )
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def generated_inputs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` hostile inputs from a fixed-seed generator: random bytes, mutated
    requests, and requests whose fields hold random JSON values."""
    rng = random.Random(seed)
    functions = ["noop", "echo", "fail", "nope", "", "sleep"]
    inputs = []
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120)))
        elif kind == 1:
            mutated = bytearray(
                encode_request(rng.randrange(100), rng.choice(functions), {"a": [1, "x"]})
            )
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(mutated) + 1)
                action = rng.randrange(3)
                if action == 0:
                    mutated[at:at] = rng.choice(_TOKENS)
                elif action == 1:
                    del mutated[at : at + rng.randrange(1, 5)]
                else:
                    mutated[at:at] = bytes([rng.randrange(256)])
            data = bytes(mutated)
        elif kind == 2:
            field = rng.choice(["id", "args", "kwargs", "timeout", "batch", "function", "cancel"])
            message: dict[str, Any] = {"id": 1, "function": "echo"}
            if field == "cancel":
                message = {"cancel": _random_value(rng)}
            else:
                message[field] = _random_value(rng)
            data = wire.dumps(message)
        elif kind == 3:
            data = wire.dumps(_random_value(rng))
        else:
            data = json.dumps(
                {"id": rng.randrange(100), "function": "echo", "args": {"v": _random_value(rng)}}
            ).encode()
        inputs.append(data.replace(b"\n", b" "))
    return inputs
