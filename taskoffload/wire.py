"""
The wire format: newline-delimited UTF-8 JSON objects, the same on the worker port
and (one object per text frame) on the gateway's WebSocket.

Everything here is pure: bytes in, records out, and back.  Bad input raises
:class:`BadMessage`, which carries the error code and, where it could be read, the
request's ``id`` so that the error reply reaches the right caller.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

import attrs
import orjson

from taskoffload import lost
from taskoffload.catalogue import read_catalogue
from taskoffload.challenge import Auth, Challenge, auth_digest, encode_auth, encode_challenge
from taskoffload.codes import (
    BAD_ARGUMENTS,
    BAD_REQUEST,
    CANCELLED,
    ERROR_CODES,
    OVERLOADED,
    POISONED,
    TASK_FAILED,
    TIMEOUT,
    UNAUTHORIZED,
    UNKNOWN_FUNCTION,
    UNKNOWN_RESUME,
    WORKER_LOST,
    WRONG_LANE,
)
from taskoffload.extensions import EXTENSION_FIELDS, Resume, read_extensions, read_resume
from taskoffload.lanes import DEFAULT_LANE, LaneInfo, read_ack_lanes

__all__ = [
    "BAD_ARGUMENTS",
    "BAD_REQUEST",
    "CANCELLED",
    "DEFAULT_MAX_MESSAGE",
    "ERROR_CODES",
    "OVERLOADED",
    "POISONED",
    "TASK_FAILED",
    "TIMEOUT",
    "UNAUTHORIZED",
    "UNKNOWN_FUNCTION",
    "UNKNOWN_RESUME",
    "WORKER_LOST",
    "WRONG_LANE",
    "Auth",
    "BadMessage",
    "Cancel",
    "Challenge",
    "ErrorReply",
    "Goodbye",
    "Message",
    "Progress",
    "Reply",
    "Request",
    "RequestId",
    "Result",
    "Resume",
    "Session",
    "SessionAck",
    "auth_digest",
    "decode_message",
    "decode_reply",
    "dumps",
    "encode_auth",
    "encode_cancel",
    "encode_challenge",
    "encode_goodbye",
    "encode_reply",
    "encode_request",
    "encode_session",
    "encode_session_ack",
    "error_object",
]

#: Default bound on one line or frame, in bytes: 1 MiB.
DEFAULT_MAX_MESSAGE: Final = 1024 * 1024

#: A caller's request id: any JSON string or number, or ``None`` when absent.
RequestId: TypeAlias = str | int | float | None

_REQUEST_KEYS: Final = frozenset({"id", "function", "args", "kwargs", "timeout"}) | EXTENSION_FIELDS


class BadMessage(Exception):
    """
    A message that cannot be served.

    :ivar code: one of :data:`ERROR_CODES`, ``bad_request`` for anything the
        decoder rejects.
    :ivar message: what was wrong, for a person.
    :ivar request_id: the request's ``id`` if it could be read, else ``None``.
    """

    def __init__(self, message: str, request_id: RequestId = None, code: str = BAD_REQUEST):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_reply(self) -> ErrorReply:
        """
        :return: the error reply this rejection is answered with.
        """
        return ErrorReply(id=self.request_id, code=self.code, message=self.message, type=None)


@attrs.frozen
class Request:
    """
    Run ``function`` with ``args`` (positional) and ``kwargs`` (keywords).

    :ivar id: the caller's id, echoed on every reply; ``None`` when it sent none.
    :ivar timeout: seconds the caller will wait, or ``None``.
    :ivar batch: for the gateway's batch extension, the items' keyword arguments
        (or argument lists); ``None`` for an ordinary request.
    """

    id: RequestId
    function: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    timeout: float | None = None
    batch: tuple[Any, ...] | None = None
    #: The gateway's single flight: join the running call of ``function`` with this key.
    key: str | None = None
    #: The gateway's detach: seconds the call outlives its WebSocket, or ``None``.
    detach: float | None = None


@attrs.frozen
class Cancel:
    """Cancel the in-flight request whose id is ``id``."""

    id: RequestId


@attrs.frozen
class Session:
    """
    Connection options, sent as a connection's first line by clients that want them
    (``{"session": {"reject_when_busy": true}}``); no reply is sent.

    :ivar reject_when_busy: a request arriving while the worker already runs as
        many tasks as it may is answered at once with ``overloaded`` (type
        ``WorkerBusy``) instead of waiting: it did not run, and the client sends it
        on another connection, which an idle worker will accept.
    """

    reject_when_busy: bool = False


#: Error ``type`` of the ``overloaded`` reply to a rejected request (see :class:`Session`).
WORKER_BUSY: Final = "WorkerBusy"


Message: TypeAlias = Request | Cancel | Session | Auth | Resume | lost.LostQuery


@attrs.frozen
class Result:
    """The final, successful reply to request ``id``."""

    id: RequestId
    result: Any


@attrs.frozen
class ErrorReply:
    """
    The final, failed reply to request ``id``.

    :ivar code: one of :data:`ERROR_CODES`.
    :ivar type: the exception class name for ``task_failed``, else ``None``.
    :ivar cause: for ``worker_lost``, why the worker died (:mod:`taskoffload.lost`).
    """

    id: RequestId
    code: str
    message: str
    type: str | None = None
    cause: dict[str, Any] | None = None


@attrs.frozen
class Progress:
    """A progress report for request ``id``; any number may precede its final reply."""

    id: RequestId
    progress: Any


@attrs.frozen
class SessionAck:
    """
    A worker's answer to a :class:`Session` line, sent once it has accepted the
    connection: until it comes, the client's connection is still waiting in the
    listening socket's queue and no request should be sent on it.

    :ivar worker: the worker's process id.
    :ivar retry: the names of the worker's idempotent tasks (``@task(retry=True)``),
        which a client may send once more if the worker is lost before replying.
    """

    worker: int | None
    retry: tuple[str, ...] = ()
    #: How many tasks the connection's lane runs at once (its workers x
    #: concurrency): the whole pool's, for a pool without lanes.
    slots: int | None = None
    #: How many tasks this worker process runs at once (``--concurrency``).
    concurrency: int | None = None
    #: The lane this worker serves.
    lane: str = DEFAULT_LANE
    #: The pool's lanes other than the default, and where they listen.
    lanes: tuple[LaneInfo, ...] = ()
    #: The lane of each task not on the default lane.
    routes: Mapping[str, str] = attrs.field(factory=dict)
    #: The pool's tasks described (:mod:`taskoffload.catalogue`); ``None`` if not told.
    tasks: tuple[dict[str, Any], ...] | None = None
    #: The pool keeps a death journal: ``{"lost": PID}`` gets why worker PID ended.
    deaths: bool = False


@attrs.frozen
class Goodbye:
    """
    The worker is closing the connection and reads nothing more from it: a request
    still unanswered when this arrives was never run, and may be sent elsewhere.
    """

    reason: str


Reply: TypeAlias = Result | ErrorReply | Progress | SessionAck | Goodbye | Challenge


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadMessage(f"not valid JSON: {e}") from None


def dumps(value: Any) -> bytes:
    """
    Serialize ``value`` as compact JSON.

    Falls back to the standard library for what orjson refuses but JSON allows
    (integers beyond 64 bits, non-string keys, nesting deeper than orjson's limit).
    orjson writes NaN and infinities as ``null``.

    :raises TypeError: if ``value`` is not JSON-serializable.
    :raises ValueError: if the fallback meets NaN or an infinity.
    :raises RecursionError: if ``value`` is nested too deeply for the fallback.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _is_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def decode_message(data: bytes) -> Message:
    """
    Decode one line or frame (without its delimiter) into a request or a cancel.

    :raises BadMessage: with code ``bad_request`` for anything else; never any
        other exception, whatever the bytes.
    """
    if data.endswith(b"\r"):
        data = data[:-1]
    if not data.strip():
        raise BadMessage("empty message")
    obj = _loads(data)
    if not isinstance(obj, dict):
        raise BadMessage(f"a message must be a JSON object, not {_json_type(obj)}")
    raw_id = obj.get("id")
    request_id = raw_id if _is_id(raw_id) else None
    if "auth" in obj:
        if len(obj) != 1 or not isinstance(obj["auth"], str):
            raise BadMessage('an answer to a challenge is {"auth": HEX}')
        return Auth(digest=obj["auth"])
    if "session" in obj:
        options = obj["session"]
        if len(obj) != 1 or not isinstance(options, dict):
            raise BadMessage('a session is {"session": {OPTIONS}}')
        reject = options.get("reject_when_busy", False)
        if not isinstance(reject, bool):
            raise BadMessage('"reject_when_busy" must be true or false')
        return Session(reject_when_busy=reject)
    if "cancel" in obj:
        target = obj["cancel"]
        if len(obj) != 1 or not _is_id(target) or target is None:
            raise BadMessage('a cancel is {"cancel": ID} with a string or number ID')
        return Cancel(id=target)
    if "lost" in obj and (query := lost.read_lost_query(obj)) is not None:
        return query
    if "resume" in obj:
        return _extension(read_resume, obj, None)
    if not _is_id(raw_id):
        raise BadMessage("id must be a JSON string or number")
    function = obj.get("function")
    if not isinstance(function, str) or not function:
        raise BadMessage('missing "function": the name of a task, as a string', request_id)
    extra = obj.keys() - _REQUEST_KEYS
    if extra:
        raise BadMessage(f"unknown fields: {', '.join(sorted(extra))}", request_id)
    args_value = obj.get("args", {})
    kwargs: dict[str, Any]
    if isinstance(args_value, dict):
        args: tuple[Any, ...] = ()
        kwargs = args_value
    elif isinstance(args_value, list):
        args = tuple(args_value)
        kwargs = {}
    elif args_value is None:
        args, kwargs = (), {}
    else:
        raise BadMessage('"args" must be an object (keywords) or a list (positional)', request_id)
    more = obj.get("kwargs")
    if more is not None:
        if not isinstance(more, dict):
            raise BadMessage('"kwargs" must be an object', request_id)
        clash = kwargs.keys() & more.keys()
        if clash:
            raise BadMessage(f"arguments given twice: {', '.join(sorted(clash))}", request_id)
        kwargs = {**kwargs, **more}
    timeout = obj.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise BadMessage('"timeout" must be a positive number of seconds', request_id)
    return Request(
        id=request_id,
        function=function,
        args=args,
        kwargs=kwargs,
        timeout=float(timeout) if timeout is not None else None,
        **_extension(read_extensions, obj, request_id),
    )


def _extension(read: Any, obj: dict[str, Any], request_id: RequestId) -> Any:
    try:
        return read(obj)
    except ValueError as e:
        raise BadMessage(str(e), request_id) from None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"


def encode_request(request: Request) -> bytes:
    """
    Encode a request as one line, delimiter included.

    Positional ``args`` go in ``args`` as a list with keywords in ``kwargs``;
    keyword-only calls send ``args`` as an object.
    """
    obj: dict[str, Any] = {"id": request.id, "function": request.function}
    if request.args:
        obj["args"] = list(request.args)
        if request.kwargs:
            obj["kwargs"] = request.kwargs
    else:
        obj["args"] = request.kwargs
    if request.timeout is not None:
        obj["timeout"] = request.timeout
    if request.batch is not None:
        obj["batch"] = list(request.batch)
    return dumps(obj) + b"\n"


def encode_session(session: Session) -> bytes:
    """Encode connection options as one line, delimiter included."""
    return dumps({"session": {"reject_when_busy": session.reject_when_busy}}) + b"\n"


def encode_session_ack(ack: SessionAck) -> bytes:
    """Encode a worker's session acknowledgement as one line."""
    session: dict[str, Any] = {"worker": ack.worker}
    if ack.retry:
        session["retry"] = list(ack.retry)
    if ack.slots:
        session["slots"] = ack.slots
    if ack.concurrency:
        session["concurrency"] = ack.concurrency
    if ack.lanes or ack.lane != DEFAULT_LANE:
        session["lane"] = ack.lane
        session["lanes"] = {lane.name: lane.to_json() for lane in ack.lanes}
        session["routes"] = dict(ack.routes)
    if ack.tasks is not None:
        session["tasks"] = list(ack.tasks)
    if ack.deaths:
        session["deaths"] = True
    return dumps({"session": session}) + b"\n"


def encode_goodbye(goodbye: Goodbye) -> bytes:
    """Encode a worker's goodbye as one line."""
    return dumps({"goodbye": goodbye.reason}) + b"\n"


def encode_cancel(cancel: Cancel) -> bytes:
    """Encode a cancel as one line, delimiter included."""
    return dumps({"cancel": cancel.id}) + b"\n"


def encode_reply(reply: Reply) -> bytes:
    """
    Encode a reply as one line, delimiter included.

    A result that JSON cannot carry becomes a ``task_failed`` error, so the
    caller always gets a reply it can read.
    """
    if isinstance(reply, Result):
        try:
            return dumps({"id": reply.id, "result": reply.result}) + b"\n"
        except (TypeError, ValueError, RecursionError) as e:
            return encode_reply(
                ErrorReply(
                    id=reply.id,
                    code=TASK_FAILED,
                    message=f"the task's result is not JSON-serializable: {e}",
                    type=type(e).__name__,
                )
            )
    if isinstance(reply, Progress):
        try:
            return dumps({"id": reply.id, "progress": reply.progress}) + b"\n"
        except (TypeError, ValueError, RecursionError):
            # reprlib bounds depth and length, where repr would recurse as deep as dumps.
            return dumps({"id": reply.id, "progress": reprlib.repr(reply.progress)}) + b"\n"
    if isinstance(reply, SessionAck):
        return encode_session_ack(reply)
    if isinstance(reply, Goodbye):
        return encode_goodbye(reply)
    if isinstance(reply, Challenge):
        return encode_challenge(reply)
    return dumps({"id": reply.id, "error": error_object(reply)}) + b"\n"


def error_object(reply: ErrorReply) -> dict[str, Any]:
    """:return: the ``error`` object of ``reply`` (of a batch item, too)."""
    error: dict[str, Any] = {"code": reply.code, "message": reply.message}
    if reply.type is not None:
        error["type"] = reply.type
    if reply.cause is not None:
        error["cause"] = reply.cause
    return error


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def decode_reply(data: bytes) -> Reply | lost.LostAnswer:
    """
    Decode one reply line (without its delimiter), as a client reads it.

    :raises BadMessage: if the line is not a reply.
    """
    obj = _loads(data)
    if isinstance(obj, dict) and "id" not in obj:
        if isinstance(obj.get("session"), dict):
            worker = obj["session"].get("worker")
            retry = obj["session"].get("retry")
            slots = obj["session"].get("slots")
            concurrency = obj["session"].get("concurrency")
            return SessionAck(
                **read_ack_lanes(obj["session"]),
                worker=worker if isinstance(worker, int) else None,
                retry=tuple(n for n in retry if isinstance(n, str))
                if isinstance(retry, list)
                else (),
                slots=slots if _is_positive_int(slots) else None,
                concurrency=concurrency if _is_positive_int(concurrency) else None,
                tasks=read_catalogue(obj["session"].get("tasks")),
                deaths=obj["session"].get("deaths") is True,
            )
        if isinstance(obj.get("goodbye"), str):
            return Goodbye(reason=obj["goodbye"])
        if isinstance(obj.get("challenge"), str):
            return Challenge(nonce=obj["challenge"])
        if "lost" in obj and (answer := lost.read_lost_answer(obj)) is not None:
            return answer
    if not isinstance(obj, dict) or "id" not in obj or not _is_id(obj["id"]):
        raise BadMessage("a reply must be an object with an id")
    request_id = obj["id"]
    if "result" in obj:
        return Result(id=request_id, result=obj["result"])
    if "progress" in obj:
        return Progress(id=request_id, progress=obj["progress"])
    error = obj.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        message = error.get("message")
        kind, cause = error.get("type"), error.get("cause")
        return ErrorReply(
            id=request_id,
            code=error["code"],
            message=message if isinstance(message, str) else "",
            type=kind if isinstance(kind, str) else None,
            cause=cause if isinstance(cause, dict) else None,
        )
    raise BadMessage("a reply holds one of result, error or progress", request_id)
