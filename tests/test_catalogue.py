"""
Unit tests for :mod:`taskoffload.catalogue`: how a worker describes its tasks,
how the description crosses the wire in the session acknowledgement, what
:class:`~taskoffload.client.TaskClient` keeps of it, and ``GET /tasks``.
"""

from __future__ import annotations

import datetime
from typing import Any

import orjson
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from taskoffload import wire
from taskoffload.catalogue import MAX_TASKS, MAX_TEXT, catalogue, describe, read_catalogue
from taskoffload.client import TaskClient
from taskoffload.examples import send_mail
from taskoffload.gateway import GatewayFactory
from taskoffload.interfaces import ITaskPool
from taskoffload.registry import TaskRegistry, task
from taskoffload.testing import FakeTaskPool
from taskoffload.web import DESCRIBE_TIMEOUT, GatewayMetrics, make_site
from tests._trial_bridge import pytest_module
from tests.test_web import get, resource_at


def described(*functions: Any) -> list[dict[str, Any]]:
    """The catalogue of a registry of ``functions``."""
    return catalogue(TaskRegistry.from_functions(functions).tasks)


def test_send_mail_is_described_with_its_parameters() -> None:
    """send_mail's description names each parameter with its kind, annotation and default."""
    [mail] = described(send_mail)
    assert mail["name"] == "send_mail"
    assert mail["doc"] == "Send one plain-text email through the configured SMTP server."
    assert (mail["timeout"], mail["retry"], mail["lane"], mail["progress"]) == (
        None,
        False,
        "default",
        False,
    )
    assert mail["parameters"] == [
        {"name": "to", "kind": "positional_or_keyword", "annotation": "str"},
        {"name": "subject", "kind": "positional_or_keyword", "annotation": "str"},
        {"name": "body", "kind": "positional_or_keyword", "annotation": "str"},
        {
            "name": "sender",
            "kind": "positional_or_keyword",
            "annotation": "str",
            "default": "taskoffload@localhost",
        },
    ]


def test_task_options_and_progress_are_described() -> None:
    """``@task`` options show; ``progress``, which the worker supplies, is no parameter."""

    @task(name="render", timeout=30, retry=True, lane="interactive")
    def render(page: int, *, progress: Any) -> None:
        """

        Render one page.

        Slowly.
        """

    [spec] = described(render)
    assert {k: spec[k] for k in ("name", "doc", "timeout", "retry", "lane", "progress")} == {
        "name": "render",
        "doc": "Render one page.",
        "timeout": 30,
        "retry": True,
        "lane": "interactive",
        "progress": True,
    }
    assert [p["name"] for p in spec["parameters"]] == ["page"]


def test_kinds_and_defaults_that_are_not_json() -> None:
    """Every parameter kind is named; a default JSON cannot carry is given as its repr."""

    def odd(a, /, *rest, when=datetime.timedelta(seconds=1), flag=None, **more):  # type: ignore[no-untyped-def]
        pass

    parameters = describe(TaskRegistry.from_functions([odd]).tasks["odd"])["parameters"]
    assert [(p["name"], p["kind"], p["annotation"]) for p in parameters] == [
        ("a", "positional_only", None),
        ("rest", "var_positional", None),
        ("when", "keyword_only", None),
        ("flag", "keyword_only", None),
        ("more", "var_keyword", None),
    ]
    assert parameters[2]["default"] == "datetime.timedelta(seconds=1)"
    assert parameters[2]["default_is_repr"] is True
    assert parameters[3]["default"] is None and "default_is_repr" not in parameters[3]
    assert "default" not in parameters[0]
    assert described(odd)[0]["doc"] is None


def test_long_texts_are_cut() -> None:
    """A docstring's first line longer than MAX_TEXT is cut to MAX_TEXT, ending in an ellipsis."""

    def wordy() -> None:
        pass

    wordy.__doc__ = "x" * (MAX_TEXT * 3)
    doc = described(wordy)[0]["doc"]
    assert len(doc) == MAX_TEXT and doc.endswith("…")


def test_sorted_by_name() -> None:
    """The catalogue lists tasks by name."""

    def b() -> None:
        pass

    def a() -> None:
        pass

    assert [t["name"] for t in described(b, a)] == ["a", "b"]


def test_read_catalogue_keeps_what_names_a_task() -> None:
    """A client takes the entries that name a task, at most MAX_TASKS; not a list is not told."""
    assert read_catalogue(None) is None
    assert read_catalogue({"name": "x"}) is None
    assert read_catalogue([{"name": "x"}, {"name": 3}, "y", {}]) == ({"name": "x"},)
    assert len(read_catalogue([{"name": str(i)} for i in range(MAX_TASKS + 5)]) or ()) == MAX_TASKS


def test_the_ack_carries_the_catalogue() -> None:
    """The session acknowledgement's ``tasks`` decodes as sent; an ack without it says None."""
    tasks = tuple(described(send_mail))
    line = wire.encode_session_ack(wire.SessionAck(worker=1, tasks=tasks))
    assert orjson.loads(line)["session"]["tasks"] == list(tasks)
    ack = wire.decode_reply(line.rstrip(b"\n"))
    assert isinstance(ack, wire.SessionAck) and ack.tasks == tasks
    bare = wire.decode_reply(b'{"session": {"worker": 1}}')
    assert isinstance(bare, wire.SessionAck) and bare.tasks is None


def test_task_client_keeps_the_latest_catalogue() -> None:
    """TaskClient.catalogue() is None until a worker acknowledges, then what it said."""
    reactor = MemoryReactorClock()
    client = TaskClient(reactor, ["tcp:127.0.0.1:9"])
    client.call("noop")
    assert client.catalogue() is None
    host, port, factory, *_ = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())
    tasks = tuple(described(send_mail))
    protocol.dataReceived(wire.encode_session_ack(wire.SessionAck(worker=1, tasks=tasks)))
    assert client.catalogue() == list(tasks)
    # An ack that tells nothing of the tasks (an older pool) leaves what is known.
    protocol.dataReceived(wire.encode_session_ack(wire.SessionAck(worker=1)))
    assert client.catalogue() == list(tasks)


def _site(pool: ITaskPool) -> Any:
    document: dict[str, Any] = {"gateway": {}}
    return make_site(GatewayFactory(pool), lambda: document, GatewayMetrics(lambda: document))


def test_tasks_resource_serves_the_pools_catalogue() -> None:
    """GET /tasks serves the pool's catalogue as JSON, uncached."""
    request, body = get(_site(FakeTaskPool(tasks={"send_mail": send_mail})), b"/tasks")
    assert orjson.loads(body) == {"tasks": described(send_mail)}
    assert request.responseCode in (None, 200)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-cache"]


def _ask_tasks(client: TaskClient) -> DummyRequest:
    """GET /tasks of a gateway on ``client``: the request, its answer still to come."""
    request, resource = resource_at(_site(client), b"/tasks")
    assert resource.render(request) is NOT_DONE_YET
    return request


def test_tasks_resource_asks_the_pool_before_any_call() -> None:
    """Before any call, GET /tasks opens a connection to the pool and answers with what
    its worker describes; that connection, with no call for it, is closed."""
    reactor = MemoryReactorClock()
    client = TaskClient(reactor, ["tcp:127.0.0.1:9"])
    request = _ask_tasks(client)
    [(host, port, factory, *_)] = reactor.tcpClients
    assert not request.written
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    tasks = tuple(described(send_mail))
    protocol.dataReceived(wire.encode_session_ack(wire.SessionAck(worker=1, tasks=tasks)))
    assert request.finished and request.responseCode in (None, 200)
    assert orjson.loads(b"".join(request.written)) == {"tasks": list(tasks)}
    assert transport.disconnecting  # nothing to send on it: not held open
    # Known now: the next request is answered at once, with no new connection.
    assert orjson.loads(get(_site(client), b"/tasks")[1]) == {"tasks": list(tasks)}
    assert len(reactor.tcpClients) == 1


def test_tasks_resource_when_the_pool_does_not_answer() -> None:
    """A pool that does not describe its tasks within DESCRIBE_TIMEOUT: a 503 that says so."""
    reactor = MemoryReactorClock()
    request = _ask_tasks(TaskClient(reactor, ["tcp:127.0.0.1:9"]))
    reactor.advance(DESCRIBE_TIMEOUT - 0.1)
    assert not request.finished
    reactor.advance(0.2)
    assert request.finished and request.responseCode == 503
    assert orjson.loads(b"".join(request.written)) == {
        "error": f"no worker of the pool answered within {DESCRIBE_TIMEOUT:g} s"
    }


def test_tasks_resource_of_a_pool_with_no_catalogue() -> None:
    """A pool with nothing to describe (a FakeTaskPool without tasks) answers 503 at once."""
    request, resource = resource_at(_site(FakeTaskPool()), b"/tasks")
    assert resource.render(request) is NOT_DONE_YET
    assert request.finished and request.responseCode == 503


class _FailingPool(FakeTaskPool):
    """A pool whose describing fails: a bug somewhere below the site."""

    def describe(self, timeout: float = 5.0) -> Deferred[list[dict[str, Any]] | None]:
        return defer.fail(RuntimeError("describing broke"))


def test_tasks_resource_answers_when_describing_fails() -> None:
    """A failure below /tasks still gets the waiting client its one answer, a 503,
    and is logged."""
    request, resource = resource_at(_site(_FailingPool()), b"/tasks")
    with capturedLogs() as logged:
        assert resource.render(request) is NOT_DONE_YET
    assert request.finished and request.responseCode == 503
    [failure] = [e["log_failure"] for e in logged if "log_failure" in e]
    assert failure.check(RuntimeError)


def test_tasks_resource_writes_nothing_after_the_client_left() -> None:
    """A client gone before the pool answered: the question is cancelled, nothing written."""
    reactor = MemoryReactorClock()
    request = _ask_tasks(TaskClient(reactor, ["tcp:127.0.0.1:9"]))
    request.processingFailed(Failure(ConnectionDone()))
    reactor.advance(DESCRIBE_TIMEOUT + 1)
    assert request.written == []


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
