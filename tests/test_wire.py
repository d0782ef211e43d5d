"""Tests for taskoffload.wire: the JSON lines both hops speak."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskoffload import wire
from taskoffload.wire import (
    BadMessage,
    Cancel,
    ErrorReply,
    Progress,
    Request,
    Result,
    Session,
    decode_message,
    decode_reply,
    encode_cancel,
    encode_reply,
    encode_request,
    encode_session,
)
from tests._trial_bridge import pytest_module


def line(obj: Any) -> bytes:
    """One message as the protocol hands it over: JSON, without its delimiter."""
    return json.dumps(obj).encode("utf-8")


# -- decoding requests ---------------------------------------------------------------


def test_decode_keyword_request() -> None:
    """The design's example request decodes to keyword arguments and a float timeout."""
    message = decode_message(
        b'{"id": "42", "function": "send_mail", "args": {"to": "a@example.org"}, "timeout": 30}'
    )
    assert message == Request(
        id="42", function="send_mail", args=(), kwargs={"to": "a@example.org"}, timeout=30.0
    )
    assert isinstance(message.timeout, float)


@pytest.mark.parametrize("request_id", ["42", "", 42, -7, 0, 4.5])
def test_decode_echoes_string_and_number_ids(request_id: Any) -> None:
    """Any JSON string or number is accepted as an id and kept unchanged."""
    message = decode_message(line({"id": request_id, "function": "noop"}))
    assert isinstance(message, Request)
    assert message.id == request_id
    assert type(message.id) is type(request_id)


def test_decode_without_id() -> None:
    """A request with no id (the Workerman FAQ shape) is served with id None."""
    message = decode_message(b'{"function":"echo","args":{"a":1}}')
    assert message == Request(id=None, function="echo", kwargs={"a": 1})


def test_decode_null_id() -> None:
    """An explicit null id is the same as no id."""
    assert decode_message(b'{"id":null,"function":"noop"}') == Request(id=None, function="noop")


def test_decode_positional_args() -> None:
    """A list of args becomes positional arguments."""
    message = decode_message(b'{"id":1,"function":"cpu","args":[10, "x", null]}')
    assert message == Request(id=1, function="cpu", args=(10, "x", None), kwargs={})


def test_decode_absent_args() -> None:
    """Without args the call has no arguments."""
    message = decode_message(b'{"id":1,"function":"noop"}')
    assert isinstance(message, Request)
    assert (message.args, message.kwargs, message.timeout, message.batch) == ((), {}, None, None)


def test_decode_null_args() -> None:
    """args null is the same as no args."""
    message = decode_message(b'{"id":1,"function":"noop","args":null}')
    assert isinstance(message, Request)
    assert (message.args, message.kwargs) == ((), {})


def test_decode_positional_args_with_kwargs() -> None:
    """kwargs adds keyword arguments to a positional list."""
    message = decode_message(b'{"id":1,"function":"f","args":[1,2],"kwargs":{"c":3}}')
    assert message == Request(id=1, function="f", args=(1, 2), kwargs={"c": 3})


def test_decode_keyword_args_with_kwargs() -> None:
    """kwargs next to an args object adds to the same keywords."""
    message = decode_message(b'{"id":1,"function":"f","args":{"a":1},"kwargs":{"b":2}}')
    assert message == Request(id=1, function="f", kwargs={"a": 1, "b": 2})


def test_decode_null_kwargs() -> None:
    """kwargs null adds nothing."""
    message = decode_message(b'{"id":1,"function":"f","args":[1],"kwargs":null}')
    assert message == Request(id=1, function="f", args=(1,))


@pytest.mark.parametrize(("raw", "seconds"), [("30", 30.0), ("0.25", 0.25), ("null", None)])
def test_decode_timeout(raw: str, seconds: float | None) -> None:
    """timeout is a positive number of seconds, read as a float; null means none."""
    message = decode_message(f'{{"id":1,"function":"f","timeout":{raw}}}'.encode())
    assert isinstance(message, Request)
    assert message.timeout == seconds


def test_decode_batch() -> None:
    """A batch's items are kept, in order, for the gateway to fan out."""
    message = decode_message(b'{"id":"b1","function":"send_mail","batch":[{"to":"a"},["b"]]}')
    assert isinstance(message, Request)
    assert message.batch == ({"to": "a"}, ["b"])


@pytest.mark.parametrize("target", ["42", 42, 1.5])
def test_decode_cancel(target: Any) -> None:
    """{"cancel": ID} names the in-flight request to cancel."""
    assert decode_message(line({"cancel": target})) == Cancel(id=target)


@pytest.mark.parametrize(
    ("data", "reject_when_busy"),
    [
        (b'{"session": {"reject_when_busy": true}}', True),
        (b'{"session": {"reject_when_busy": false}}', False),
        (b'{"session": {}}', False),
    ],
)
def test_decode_session(data: bytes, reject_when_busy: bool) -> None:
    """A session line sets connection options; reject_when_busy defaults to false."""
    assert decode_message(data) == Session(reject_when_busy=reject_when_busy)


def test_decode_session_ignores_unknown_options() -> None:
    """Options a worker does not know are ignored, so newer clients can talk to it."""
    assert decode_message(b'{"session": {"future": 1}}') == Session()


@pytest.mark.parametrize("session", [Session(), Session(reject_when_busy=True)])
def test_session_round_trip(session: Session) -> None:
    """An encoded session line decodes to the same options."""
    data = encode_session(session)
    assert data.endswith(b"\n")
    assert decode_message(data[:-1]) == session


def test_decode_tolerates_crlf() -> None:
    """A line ended by \\r\\n decodes like one ended by \\n."""
    assert decode_message(b'{"function":"noop"}\r') == Request(id=None, function="noop")


def test_decode_utf8() -> None:
    """Arguments are UTF-8 text."""
    message = decode_message('{"function":"echo","args":{"s":"héllo ✓"}}'.encode())
    assert isinstance(message, Request)
    assert message.kwargs == {"s": "héllo ✓"}


def test_decode_64_bit_integers_exactly() -> None:
    """Integers within 64 bits (signed or unsigned) are read exactly."""
    message = decode_message(b'{"function":"f","args":[18446744073709551615,-9223372036854775808]}')
    assert isinstance(message, Request)
    assert message.args == (2**64 - 1, -(2**63))
    assert all(isinstance(a, int) for a in message.args)


def test_decode_big_integers_as_floats() -> None:
    """orjson reads integers beyond 64 bits as floats, so they lose precision."""
    message = decode_message(b'{"function":"f","args":[123456789012345678901234567890]}')
    assert isinstance(message, Request)
    (value,) = message.args
    assert isinstance(value, float)
    assert value == pytest.approx(1.2345678901234568e29)


# -- rejecting bad messages ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"   \t", id="blank"),
        pytest.param(b"\r", id="bare-cr"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"function": "noop"', id="truncated"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'{"function":"\\ud800"}', id="lone-surrogate"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b'{"function":"f","args":[1e400]}', id="infinite-number"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="too-deep"),
        pytest.param(b'["function", "noop"]', id="array"),
        pytest.param(b'"noop"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"true", id="boolean"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"id": true, "function": "noop"}', id="boolean-id"),
        pytest.param(b'{"id": [1], "function": "noop"}', id="array-id"),
        pytest.param(b'{"id": {"a": 1}, "function": "noop"}', id="object-id"),
        pytest.param(b'{"cancel": null}', id="cancel-null"),
        pytest.param(b'{"cancel": true}', id="cancel-boolean"),
        pytest.param(b'{"cancel": ["1"]}', id="cancel-array"),
        pytest.param(b'{"cancel": "1", "id": "2"}', id="cancel-extra-field"),
        pytest.param(b'{"cancel": "1", "function": "noop"}', id="cancel-with-function"),
        pytest.param(b'{"session": true}', id="session-not-object"),
        pytest.param(b'{"session": {"reject_when_busy": 1}}', id="session-option-not-boolean"),
        pytest.param(b'{"session": {}, "id": 1}', id="session-extra-field"),
        pytest.param(b'{"session": {}, "function": "noop"}', id="session-with-function"),
    ],
)
def test_unreadable_messages_are_bad_requests_without_id(data: bytes) -> None:
    """What is not a request object with a readable id is rejected with id None."""
    with pytest.raises(BadMessage) as info:
        decode_message(data)
    assert info.value.code == wire.BAD_REQUEST
    assert info.value.request_id is None
    assert info.value.message


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="no-function"),
        pytest.param({"function": None}, id="null-function"),
        pytest.param({"function": ""}, id="empty-function"),
        pytest.param({"function": 7}, id="number-function"),
        pytest.param({"function": ["noop"]}, id="array-function"),
        pytest.param({"function": "f", "args": "x"}, id="string-args"),
        pytest.param({"function": "f", "args": 1}, id="number-args"),
        pytest.param({"function": "f", "args": True}, id="boolean-args"),
        pytest.param({"function": "f", "kwargs": [1]}, id="array-kwargs"),
        pytest.param({"function": "f", "kwargs": "a"}, id="string-kwargs"),
        pytest.param({"function": "f", "args": {"a": 1}, "kwargs": {"a": 2}}, id="kwargs-clash"),
        pytest.param({"function": "f", "timeout": 0}, id="zero-timeout"),
        pytest.param({"function": "f", "timeout": -1}, id="negative-timeout"),
        pytest.param({"function": "f", "timeout": "5"}, id="string-timeout"),
        pytest.param({"function": "f", "timeout": True}, id="boolean-timeout"),
        pytest.param({"function": "f", "timeout": [5]}, id="array-timeout"),
        pytest.param({"function": "f", "batch": {"to": "a"}}, id="object-batch"),
        pytest.param({"function": "f", "batch": "x"}, id="string-batch"),
        pytest.param({"function": "f", "extra": 1}, id="unknown-field"),
        pytest.param({"function": "f", "method": "g"}, id="misspelt-field"),
    ],
)
@pytest.mark.parametrize("request_id", ["r1", 9, None])
def test_bad_fields_are_bad_requests_keeping_the_id(
    fields: dict[str, Any], request_id: Any
) -> None:
    """A request object with a readable id but bad fields is rejected with that id."""
    obj = fields if request_id is None else {"id": request_id, **fields}
    with pytest.raises(BadMessage) as info:
        decode_message(line(obj))
    assert info.value.code == wire.BAD_REQUEST
    assert info.value.request_id == request_id


def test_unknown_fields_are_named() -> None:
    """The rejection of unknown fields says which fields."""
    with pytest.raises(BadMessage, match="unknown fields: extra, method"):
        decode_message(b'{"function":"f","method":"g","extra":1}')


def test_bad_message_becomes_error_reply() -> None:
    """A rejection turns into an error reply to the id it carries."""
    with pytest.raises(BadMessage) as info:
        decode_message(b'{"id":"7","function":"f","args":3}')
    reply = info.value.to_reply()
    assert reply == ErrorReply(id="7", code=wire.BAD_REQUEST, message=info.value.message)
    assert orjson.loads(encode_reply(reply)) == {
        "id": "7",
        "error": {"code": "bad_request", "message": info.value.message},
    }


def test_error_codes_are_the_documented_set() -> None:
    """ERROR_CODES holds exactly the twelve stable codes."""
    assert {
        "wrong_lane",
        "poisoned",
        "unknown_resume",
        "bad_request",
        "unknown_function",
        "bad_arguments",
        "task_failed",
        "timeout",
        "cancelled",
        "worker_lost",
        "overloaded",
        "unauthorized",
    } == wire.ERROR_CODES


# -- encoding ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Result(id="42", result={"sent": True}),
        Result(id=None, result=None),
        Result(id=3, result=[1, "two", 3.5, {"four": [None]}]),
        Result(id=1.5, result="héllo ✓"),
        ErrorReply(id="42", code=wire.TASK_FAILED, message="SMTP 550", type="SMTPError"),
        ErrorReply(id=None, code=wire.BAD_REQUEST, message="empty message"),
        ErrorReply(id=7, code=wire.OVERLOADED, message="", type=None),
        Progress(id="42", progress={"done": 10, "total": 1000}),
        Progress(id=None, progress=0.5),
    ],
)
def test_reply_round_trip(reply: wire.Reply) -> None:
    """Every reply decodes to what was encoded, from one \\n-terminated line."""
    data = encode_reply(reply)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert decode_reply(data[:-1]) == reply


def test_reply_shapes_on_the_wire() -> None:
    """Replies are compact JSON objects in the documented shapes."""
    assert encode_reply(Result(id="42", result={"sent": True})) == (
        b'{"id":"42","result":{"sent":true}}\n'
    )
    assert encode_reply(Progress(id="42", progress={"done": 1})) == (
        b'{"id":"42","progress":{"done":1}}\n'
    )
    assert encode_reply(ErrorReply(id=None, code="timeout", message="late")) == (
        b'{"id":null,"error":{"code":"timeout","message":"late"}}\n'
    )
    assert encode_reply(ErrorReply(id=1, code="task_failed", message="x", type="KeyError")) == (
        b'{"id":1,"error":{"code":"task_failed","message":"x","type":"KeyError"}}\n'
    )


@pytest.mark.parametrize(
    "request_",
    [
        Request(id="42", function="send_mail", kwargs={"to": "a@example.org"}, timeout=30.0),
        Request(id=None, function="noop"),
        Request(id=5, function="f", args=(1, [2], {"x": 3})),
        Request(id=5, function="f", args=(1,), kwargs={"b": 2}, timeout=0.5),
        Request(id="b1", function="send_mail", batch=({"to": "a"}, {"to": "b"})),
    ],
)
def test_request_round_trip(request_: Request) -> None:
    """A request encoded by a client decodes, on the worker, to the same request."""
    data = encode_request(request_)
    assert data.endswith(b"\n")
    assert decode_message(data[:-1]) == request_


def test_keyword_request_sends_args_object() -> None:
    """A keyword-only request puts its keywords in args as an object."""
    data = encode_request(Request(id=1, function="echo", kwargs={"a": 1}))
    assert orjson.loads(data) == {"id": 1, "function": "echo", "args": {"a": 1}}


def test_cancel_round_trip() -> None:
    """An encoded cancel decodes to the same cancel."""
    data = encode_cancel(Cancel(id="42"))
    assert data == b'{"cancel":"42"}\n'
    assert decode_message(data[:-1]) == Cancel(id="42")


def test_unserializable_result_becomes_task_failed() -> None:
    """A result JSON cannot carry is answered with task_failed to the same id."""
    reply = decode_reply(encode_reply(Result(id="9", result={"when": object()}))[:-1])
    assert isinstance(reply, ErrorReply)
    assert reply.id == "9"
    assert reply.code == wire.TASK_FAILED
    assert reply.type == "TypeError"
    assert "not JSON-serializable" in reply.message


def test_set_result_becomes_task_failed() -> None:
    """A set, which JSON has no shape for, is answered with task_failed."""
    reply = decode_reply(encode_reply(Result(id=1, result={1, 2}))[:-1])
    assert isinstance(reply, ErrorReply)
    assert reply.code == wire.TASK_FAILED


def test_too_deep_result_becomes_task_failed() -> None:
    """A result nested too deeply to serialize is answered with task_failed."""
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    reply = decode_reply(encode_reply(Result(id=1, result=deep))[:-1])
    assert isinstance(reply, ErrorReply)
    assert reply.code == wire.TASK_FAILED


def test_unserializable_progress_is_sent_as_text() -> None:
    """A progress value JSON cannot carry is sent as its repr, never dropped."""
    reply = decode_reply(encode_reply(Progress(id=1, progress={3}))[:-1])
    assert reply == Progress(id=1, progress="{3}")


def test_big_integer_result_is_exact() -> None:
    """A result integer beyond 64 bits is written exactly (standard-library fallback)."""
    data = encode_reply(Result(id=1, result=[2**70, "x"]))
    assert data == b'{"id":1,"result":[1180591620717411303424,"x"]}\n'
    assert json.loads(data) == {"id": 1, "result": [2**70, "x"]}


def test_non_string_keys_are_written_as_strings() -> None:
    """A result dict with integer keys is written with string keys, as json does."""
    assert encode_reply(Result(id=1, result={1: "a"})) == b'{"id":1,"result":{"1":"a"}}\n'


def test_nan_result_is_written_as_null() -> None:
    """NaN and infinities in a result are written as null (orjson's rule)."""
    data = encode_reply(Result(id=1, result=[float("nan"), float("inf")]))
    assert data == b'{"id":1,"result":[null,null]}\n'


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"not json",
        b'{"result": 1}',
        b'{"id": true, "result": 1}',
        b'{"id": 1}',
        b'{"id": 1, "error": "boom"}',
        b'{"id": 1, "error": {"message": "no code"}}',
    ],
)
def test_decode_reply_rejects_non_replies(data: bytes) -> None:
    """A client rejects a line that is not a reply."""
    with pytest.raises(BadMessage):
        decode_reply(data)


def test_session_ack_round_trip() -> None:
    """A worker's answer to a session line reads back with the worker's process id."""
    data = wire.encode_session_ack(wire.SessionAck(worker=4242))
    assert data == b'{"session":{"worker":4242}}\n'
    assert decode_reply(data[:-1]) == wire.SessionAck(worker=4242)


def test_session_ack_sizes_round_trip() -> None:
    """The pool's slots and the worker's concurrency read back; odd values read as unknown."""
    ack = wire.SessionAck(worker=7, retry=("a",), slots=100, concurrency=2)
    assert decode_reply(wire.encode_session_ack(ack)[:-1]) == ack
    odd = b'{"session":{"worker":7,"slots":true,"concurrency":0}}'
    assert decode_reply(odd) == wire.SessionAck(worker=7)


def test_goodbye_round_trip() -> None:
    """A worker's goodbye reads back with its reason."""
    data = wire.encode_goodbye(wire.Goodbye(reason="worker stopping"))
    assert data == b'{"goodbye":"worker stopping"}\n'
    assert decode_reply(data[:-1]) == wire.Goodbye(reason="worker stopping")


def test_decode_reply_tolerates_missing_message() -> None:
    """An error without a message or with an odd type still reads as an error reply."""
    reply = decode_reply(b'{"id":1,"error":{"code":"timeout","type":5}}')
    assert reply == ErrorReply(id=1, code="timeout", message="", type=None)


# -- properties ----------------------------------------------------------------------


def assert_decodes_or_rejects(data: bytes) -> None:
    """Assert the decoder's contract: a request, cancel or session, or BadMessage(bad_request)."""
    try:
        message = decode_message(data)
    except BadMessage as e:
        assert e.code == wire.BAD_REQUEST
    else:
        assert isinstance(message, (Request, Cancel, Session))


@given(st.binary())
def test_decode_any_bytes(data: bytes) -> None:
    """Whatever the bytes, decode_message returns a message record or raises BadMessage."""
    assert_decodes_or_rejects(data)


def json_values(integers: st.SearchStrategy[int] | None = None) -> st.SearchStrategy[Any]:
    """Any JSON value, with integers drawn from ``integers`` (default: any)."""
    return st.recursive(
        st.none()
        | st.booleans()
        | (st.integers() if integers is None else integers)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )


#: Integers that orjson reads back exactly.
int64 = st.integers(-(2**63), 2**64 - 1)

request_like = st.dictionaries(
    st.sampled_from(
        ["id", "function", "args", "kwargs", "timeout", "batch", "cancel", "session", "x"]
    ),
    json_values() | st.sampled_from(["noop", "echo", 0, -1, 0.5, 30]),
    max_size=6,
)


@given(json_values() | request_like)
def test_decode_any_json(value: Any) -> None:
    """Whatever JSON arrives, decode_message returns a message record or raises BadMessage."""
    assert_decodes_or_rejects(json.dumps(value).encode("utf-8"))


json_ids = st.none() | st.text() | int64 | st.floats(allow_nan=False, allow_infinity=False)


@given(
    request_id=json_ids,
    function=st.text(min_size=1),
    args=st.lists(json_values(int64), max_size=4).map(tuple),
    kwargs=st.dictionaries(st.text(max_size=8), json_values(int64), max_size=4),
    timeout=st.none() | st.floats(min_value=0.001, max_value=1e9),
)
def test_any_request_round_trips(
    request_id: Any, function: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: Any
) -> None:
    """Any request within 64-bit integers decodes to what encode_request wrote."""
    request_ = Request(id=request_id, function=function, args=args, kwargs=kwargs, timeout=timeout)
    assert decode_message(encode_request(request_)[:-1]) == request_


# -- exact rejections (docs/protocol.rst shows them to people) -----------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty message"),
        (b"[1]", "a message must be a JSON object, not an array"),
        (b'"x"', "a message must be a JSON object, not a string"),
        (b"true", "a message must be a JSON object, not a boolean"),
        (b"1.5", "a message must be a JSON object, not a number"),
        (b"null", "a message must be a JSON object, not null"),
        (b'{"auth": 5}', 'an answer to a challenge is {"auth": HEX}'),
        (b'{"auth": "ab", "id": 1}', 'an answer to a challenge is {"auth": HEX}'),
        (b'{"session": 1}', 'a session is {"session": {OPTIONS}}'),
        (b'{"session": {"reject_when_busy": 1}}', '"reject_when_busy" must be true or false'),
        (b'{"cancel": null}', 'a cancel is {"cancel": ID} with a string or number ID'),
        (b'{"id": [1], "function": "f"}', "id must be a JSON string or number"),
        (b'{"id": 1}', 'missing "function": the name of a task, as a string'),
        (
            b'{"id": 1, "function": "f", "args": 3}',
            '"args" must be an object (keywords) or a list (positional)',
        ),
        (b'{"id": 1, "function": "f", "kwargs": [1]}', '"kwargs" must be an object'),
        (
            b'{"id": 1, "function": "f", "args": {"a": 1, "b": 1}, "kwargs": {"b": 2, "a": 2}}',
            "arguments given twice: a, b",
        ),
        (
            b'{"id": 1, "function": "f", "timeout": 0}',
            '"timeout" must be a positive number of seconds',
        ),
        (
            b'{"id": 1, "function": "f", "batch": {}}',
            '"batch" must be a list of argument objects or lists',
        ),
    ],
)
def test_rejection_messages(data: bytes, message: str) -> None:
    """Each rejection carries its documented message, for the person reading the reply."""
    with pytest.raises(BadMessage) as info:
        decode_message(data)
    assert info.value.code == wire.BAD_REQUEST
    assert info.value.message == message
    assert orjson.loads(encode_reply(info.value.to_reply()))["error"]["message"] == message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"result": 1}', "a reply must be an object with an id"),
        (b'{"id": 3, "colour": 1}', "a reply holds one of result, error or progress"),
    ],
)
def test_reply_rejection_messages(data: bytes, message: str) -> None:
    """A line a client cannot read as a reply is rejected saying why, with its id."""
    with pytest.raises(BadMessage) as info:
        decode_reply(data)
    assert info.value.message == message
    assert info.value.request_id == (3 if b'"id"' in data else None)


def test_result_with_big_integer_and_nan_becomes_task_failed() -> None:
    """A result orjson refuses and JSON cannot hold (a huge integer beside NaN) is
    task_failed on a valid JSON line, not a line with a bare NaN."""
    data = encode_reply(Result(id=1, result=[2**70, float("nan")]))
    assert b"NaN" not in data
    reply = orjson.loads(data)
    assert reply["error"]["code"] == wire.TASK_FAILED
    assert reply["error"]["type"] == "ValueError"


@pytest.mark.parametrize(
    "reply",
    [
        wire.SessionAck(worker=7, retry=("mail",), slots=4, concurrency=2),
        wire.Goodbye(reason="worker stopping"),
        wire.Challenge(nonce="00ff"),
    ],
    ids=["session-ack", "goodbye", "challenge"],
)
def test_control_replies_round_trip_through_encode_reply(reply: wire.Reply) -> None:
    """encode_reply writes a session ack, a goodbye or a challenge that reads back the same."""
    assert decode_reply(encode_reply(reply)[:-1]) == reply


def test_session_ack_with_odd_worker_reads_as_unknown_worker() -> None:
    """A session ack whose worker is not an integer reads as an unknown worker."""
    assert decode_reply(b'{"session": {"worker": "x"}}') == wire.SessionAck(worker=None)


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
