"""
The fault suite's oracle: expected replies and how a received reply is matched
against one, and a reference model of the documented protocol that gives the
expected replies to any input.

The model reads ``docs/protocol.rst`` and ``docs/gateway.rst``, not
:mod:`taskoffload.wire` (only its error-code constants are used): a bug in the
product's decoder must not become the oracle's too.
"""

from __future__ import annotations

import json
import math
from typing import Any

from taskoffload import wire

__all__ = [
    "ANY",
    "BAD",
    "compare",
    "documented_reply",
    "expect_error",
    "expect_failed",
    "expect_result",
    "expect_result_or",
    "matches",
    "same_json",
    "short",
]


class _Any:
    """Matches any value in an expected reply."""

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


#: A wildcard for expected replies.
ANY: Any = _Any()

#: In an expected reply: this error code is as good as the expected result (a
#: request over a documented bound is answered ``overloaded`` instead).
_OR_ERROR = "or_error"


def expect_error(code: str, request_id: Any = None) -> dict[str, Any]:
    """An expected error reply: its code and id compared, its message not."""
    return {"id": request_id, "error": code}


def expect_result(value: Any, request_id: Any = None) -> dict[str, Any]:
    """An expected result, compared exactly (as JSON values)."""
    return {"id": request_id, "result": value}


def expect_failed(message: str, error_type: str, request_id: Any = None) -> dict[str, Any]:
    """An expected ``task_failed`` reply, its message and type compared exactly."""
    return {
        "id": request_id,
        "error": wire.TASK_FAILED,
        "message": message,
        "type": error_type,
    }


def expect_result_or(value: Any, code: str, request_id: Any = None) -> dict[str, Any]:
    """An expected result, or else the error ``code``."""
    return {"id": request_id, "result": value, _OR_ERROR: code}


def matches(reply: dict[str, Any], expected: dict[str, Any]) -> bool:
    """
    Whether ``reply`` (as received) is ``expected`` (as :func:`expect_error`,
    :func:`expect_result`, :func:`expect_failed` or :func:`expect_result_or` give, or
    ``{"session": ANY}``).  Ids and results compare as JSON values: ``1`` and
    ``1.0`` differ, and so do ``1`` and ``true``.
    """
    if "session" in expected:
        return set(reply) == {"session"} and same_json(reply["session"], expected["session"])
    if "id" not in reply or not same_json(reply["id"], expected["id"]):
        return False
    error = reply.get("error")
    if "error" in expected:
        if set(reply) != {"id", "error"} or not isinstance(error, dict):
            return False
        if error.get("code") != expected["error"] or not isinstance(error.get("message"), str):
            return False
        if "message" in expected:
            return error.get("message") == expected["message"] and same_json(
                error.get("type"), expected["type"]
            )
        return True
    if "result" in reply:
        return set(reply) == {"id", "result"} and same_json(reply["result"], expected["result"])
    return (
        _OR_ERROR in expected
        and set(reply) == {"id", "error"}
        and isinstance(error, dict)
        and error.get("code") == expected[_OR_ERROR]
    )


def same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value (:data:`ANY` matching any):
    numbers are equal and both integers or both not, ``true`` is not ``1``."""
    if a is ANY or b is ANY:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def compare(replies: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """Problems with ``replies`` against ``expected``, matched in any order."""
    left = list(replies)
    problems = []
    for want in expected:
        for i, got in enumerate(left):
            if matches(got, want):
                del left[i]
                break
        else:
            problems.append(f"no reply like {want!r}")
    if left:
        problems.append(f"unexpected replies: {short(left)}")
    return problems


def short(value: Any, limit: int = 300) -> str:
    """``value``'s repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# The reference model of the documented protocol, for generated inputs.

#: The example tasks (``taskoffload.examples``), as the pool serves them by default.
_EXAMPLE_TASKS = frozenset({"noop", "echo", "sleep", "cpu", "fail", "whoami", "send_mail"})
#: A request's fields (docs/protocol.rst, Requests).
_REQUEST_FIELDS = frozenset({"id", "function", "args", "kwargs", "timeout", "batch"})
#: orjson reads integers in this range exactly, others as floats.
_EXACT_INTEGERS = range(-(2**63), 2**64)
#: Nesting the documents do not pin down ("deeper than a few hundred levels" is
#: refused; 300 levels are echoed, 1,000 read but not written): inputs nested
#: deeper than the first and not beyond the second are not judged.
_NESTING_DOCUMENTED = 200
_NESTING_REFUSED = 1100
#: The gateway's --max-inflight-per-client default, which a batch may not exceed.
_MAX_BATCH = 1000


class _NotJSON(Exception):
    """The input is not what the protocol reads as JSON."""


def _reference_loads(text: str) -> Any:
    """
    Read ``text`` as the protocol documents JSON: ``NaN``, infinities and numbers
    too large for a double refused, integers outside -2**63..2**64-1 read as
    floats, lone surrogates refused, the last of a repeated key winning.

    :raises _NotJSON: if it is not.
    """

    def constant(name: str) -> Any:
        raise _NotJSON(name)

    def real(digits: str) -> float:
        value = float(digits)
        if math.isinf(value):
            raise _NotJSON(digits)
        return value

    def integer(digits: str) -> int | float:
        if len(digits) <= 40 and int(digits) in _EXACT_INTEGERS:
            return int(digits)
        return real(digits)

    try:
        value = json.loads(text, parse_constant=constant, parse_float=real, parse_int=integer)
    except ValueError as e:  # json.JSONDecodeError is one
        raise _NotJSON(str(e)) from None
    _refuse_surrogates(value)
    return value


def _refuse_surrogates(value: Any) -> None:
    """:raises _NotJSON: if a string in ``value`` holds a lone surrogate (not UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _NotJSON("a lone surrogate") from None
    elif isinstance(value, list):
        for item in value:
            _refuse_surrogates(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key)
            _refuse_surrogates(item)


def _raw_nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of ``text``, strings skipped (valid JSON or not)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _is_id(value: Any) -> bool:
    """A valid request id: a string, a number or null (not a boolean)."""
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def _reference_call(
    function: str, args: list[Any], kwargs: dict[str, Any], request_id: Any
) -> dict[str, Any] | None:
    """
    The documented final reply to ``function(*args, **kwargs)`` for the example
    tasks whose outcome the docs fix: ``noop()`` returns null, ``echo(**kwargs)``
    its keywords, ``fail(message="failed on purpose")`` raises ``TaskRaised`` with
    that message.  Arguments that do not bind get ``bad_arguments``.  ``None``
    for the other tasks (slow, or not fixed by their arguments).
    """
    if function == "noop":
        if args or kwargs:
            return expect_error(wire.BAD_ARGUMENTS, request_id)
        return expect_result(None, request_id)
    if function == "echo":
        if args:
            return expect_error(wire.BAD_ARGUMENTS, request_id)
        return expect_result(kwargs, request_id)
    if function == "fail":
        if len(args) > 1 or set(kwargs) - {"message"} or (args and kwargs):
            return expect_error(wire.BAD_ARGUMENTS, request_id)
        message = args[0] if args else kwargs.get("message", "failed on purpose")
        # The exception's text, as Python gives it for TaskRaised(message).
        return expect_failed(str(message), "TaskRaised", request_id)
    return None


#: The expected reply to an input refused before its id was read.
BAD = [expect_error(wire.BAD_REQUEST)]


def documented_reply(payload: bytes, port: str) -> list[dict[str, Any]] | None:
    """
    What ``docs/protocol.rst`` (and ``docs/gateway.rst``) say the answer to
    ``payload`` is, worked out without :mod:`taskoffload.wire`.

    :param payload: one line without its ``\\n`` (``port="worker"``), or one
        text frame's payload (``port="gateway"``), against a pool serving the
        example tasks.
    :return: the expected replies (for :func:`compare`): exact results, exact
        ``task_failed`` replies, error codes with their ids; ``[]`` for what gets
        no reply (a cancel, an ``auth`` line on a pool without a secret).
        ``None`` when the documents do not say exactly what the reply is, or it
        would run a slow task; such inputs are not judged.
    """
    if port not in ("worker", "gateway"):
        raise ValueError(f"port is worker or gateway, not {port!r}")
    gateway = port == "gateway"
    bad = [expect_error(wire.BAD_REQUEST)]
    try:
        text = payload.decode("utf-8")  # strict: overlong forms, surrogates refused
    except UnicodeDecodeError:
        return bad
    nesting = _raw_nesting(text)
    if nesting > _NESTING_REFUSED:
        return bad
    if nesting > _NESTING_DOCUMENTED:
        return None
    try:
        message = _reference_loads(text)  # an empty or blank message is not JSON either
    except _NotJSON:
        return bad
    if not isinstance(message, dict):
        return bad
    if message.keys() & {"cancel", "session", "auth"}:
        return _control_reply(message, gateway)
    return _request_reply(message, gateway)


def _control_reply(message: dict[str, Any], gateway: bool) -> list[dict[str, Any]] | None:
    """:func:`documented_reply` to a message with a ``cancel``, ``session`` or ``auth`` field."""
    bad = [expect_error(wire.BAD_REQUEST)]
    # Cancel, session and auth lines must be alone; a malformed cancel is
    # bad_request with a null id.  (A malformed session or auth line with an id
    # is not said to be answered with or without it.)
    if "cancel" in message:
        cancel = message["cancel"]
        alone = len(message) == 1 and cancel is not None and _is_id(cancel)
        return [] if alone else bad
    line = "session" if "session" in message else "auth"
    if len(message) > 1 and message.get("id") is not None and _is_id(message["id"]):
        return None
    if gateway:
        return bad  # session and auth lines are for the worker port
    value = message[line]
    if len(message) > 1:
        return bad
    if line == "auth":
        return [] if isinstance(value, str) else None
    if not isinstance(value, dict):
        return bad
    if not isinstance(value.get("reject_when_busy", False), bool):
        return bad
    return [{"session": ANY}]


def _request_reply(message: dict[str, Any], gateway: bool) -> list[dict[str, Any]] | None:
    """:func:`documented_reply` to a message that is no cancel, session or auth line."""
    request_id = message.get("id")
    if not _is_id(request_id):
        return [expect_error(wire.BAD_REQUEST)]
    refused = [expect_error(wire.BAD_REQUEST, request_id)]
    function = message.get("function")
    args = message.get("args")
    kwargs = message.get("kwargs")
    timeout = message.get("timeout")
    if set(message) - _REQUEST_FIELDS:
        return refused
    if not isinstance(function, str) or not function:
        return refused
    if args is not None and not isinstance(args, (dict, list)):
        return refused
    if kwargs is not None and not isinstance(kwargs, dict):
        return refused
    if isinstance(args, dict) and isinstance(kwargs, dict) and args.keys() & kwargs.keys():
        return refused
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        return refused
    if "batch" in message:
        return _batch_reply(message["batch"], function, args, kwargs, request_id, gateway)
    if function not in _EXAMPLE_TASKS:
        return [expect_error(wire.UNKNOWN_FUNCTION, request_id)]
    positional = args if isinstance(args, list) else []
    keywords = {**(args if isinstance(args, dict) else {}), **(kwargs or {})}
    reply = _reference_call(function, positional, keywords, request_id)
    return None if reply is None else [reply]


def _batch_reply(
    batch: Any, function: str, args: Any, kwargs: Any, request_id: Any, gateway: bool
) -> list[dict[str, Any]] | None:
    """:func:`documented_reply` to a well-formed request with a ``batch`` field."""
    refused = [expect_error(wire.BAD_REQUEST, request_id)]
    if batch is None:
        return None  # "must be an array": whether null is refused is not said
    if not isinstance(batch, list) or not gateway:
        return refused  # a worker refuses every batch
    if not batch or len(batch) > _MAX_BATCH:
        return refused
    if args is not None or kwargs or function not in _EXAMPLE_TASKS:
        return None  # a batch's args, kwargs, unknown name: not documented
    items = []
    for item in batch:
        if not isinstance(item, (dict, list)):
            return None
        reply = _reference_call(
            function,
            item if isinstance(item, list) else [],
            item if isinstance(item, dict) else {},
            request_id,
        )
        if reply is None:
            return None
        if "result" in reply:
            items.append({"result": reply["result"]})
        else:
            error = {"code": reply["error"], "message": reply.get("message", ANY)}
            if "type" in reply:
                error["type"] = reply["type"]
            items.append({"error": error})
    return [expect_result(items, request_id)]
