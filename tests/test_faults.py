"""
The fault suite's judgement (``harness.faults``), in memory: :func:`problems`
names each violation in hand-made counts, the reply matchers compare as
documented, and the reference model of the protocol gives the documented replies.
No process is started; ``tests/integration/test_faults.py`` runs the scenarios.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from harness.faults import oracle, report, storm
from harness.faults.slowloris import slowloris
from taskoffload import wire
from taskoffload.registry import SPEC_ATTRIBUTE
from tests._trial_bridge import pytest_module

# problems(): the kill storm


def _storm(**changes: Any) -> dict[str, Any]:
    """The counts of a kill storm that went as documented, with ``changes``."""
    by_function = {"traced_noop": 40, "traced_sleep": 40, "traced_retry": 20}
    counts: dict[str, Any] = {
        "duration_s": 8.0,
        "clients": 10,
        "in_flight": 4,
        "prefetch": 0,
        "sent": 100,
        "sent_by_function": by_function,
        "results": 90,
        "worker_lost": 10,
        "other_errors": {},
        "wrong_results": 0,
        "duplicates": 0,
        "unknown": 0,
        "missing": 0,
        "connection_closed": 0,
        "deadline_s": 10.0,
        "late": 0,
        "max_latency_s": 0.3,
        "latency_limit_s": 0.96,
        "kill_interval_s": 0.2,
        "kills": 39,
        "kill_skips": 0,
        "recovery_s": 0.2,
        "backoff_restarts": 0,
        "max_restart_delay_s": 0.0,
        "unexpected_exits": 0,
        "executions": 95,
        "ran_twice": 0,
        "ran_twice_tokens": [],
        "retry_ran_thrice": 0,
        "results_not_run": 0,
        "ran_unsent": 0,
        "status": {
            "inflight": 0,
            "clients": 10,
            "requests": 100,
            "ok": 90,
            "worker_lost": 10,
            "by_function": dict(by_function),
        },
        "status_error": None,
        "twistd_alive": True,
    }
    counts.update(changes)
    if "status" not in changes:
        # What the gateway counted agrees with what the suite saw.
        counts["status"].update(ok=counts["results"], worker_lost=counts["worker_lost"])
    return counts


def _named(found: list[str], prefix: str) -> bool:
    return any(problem.startswith(prefix) for problem in found)


def test_kill_storm_as_documented_has_no_problem() -> None:
    """Counts of a kill storm that went as documented give no problem."""
    assert report.problems("kill_storm", _storm()) == []


STORM_VIOLATIONS = {
    "ran_twice": ({"ran_twice": 2, "ran_twice_tokens": ["0.1", "3.7"]}, "ran twice: 2"),
    "retry_ran_thrice": ({"retry_ran_thrice": 1}, "retry ran thrice: 1"),
    "result_without_run": ({"results_not_run": 1}, "results without a run: 1"),
    "run_never_sent": ({"ran_unsent": 1}, "runs of requests never sent: 1"),
    # Fewer runs than results: with tokens unique, some result had no run.
    "fewer_runs_than_results": (
        {"executions": 89, "results_not_run": 1},
        "results without a run: 1",
    ),
    "unanswered": ({"results": 89, "missing": 1}, "unanswered: 1"),
    "reply_count": ({"results": 89}, "final replies: 100 sent, 89 results"),
    "answered_twice": ({"duplicates": 1}, "answered twice: 1"),
    "unknown_id": ({"unknown": 1}, "unknown replies: 1"),
    "dropped_websocket": ({"results": 89, "connection_closed": 1}, "dropped WebSockets: 1"),
    "other_error": (
        {"results": 89, "other_errors": {"task_failed": 1}},
        "errors other than worker_lost: {'task_failed': 1}",
    ),
    "wrong_result": ({"wrong_results": 1}, "wrong results: 1"),
    "worker_lost_figure": (
        {"kills": 20, "worker_lost": 21, "results": 79},
        "worker_lost over the documented figure: 21 for 20 kills (at most 1 per kill)",
    ),
    "too_few_kills": (
        {"kills": 19, "kill_skips": 3},
        "too few kills: 19, not at least 20 (half the ticks); 3 ticks found no serving worker",
    ),
    "late": ({"late": 1}, "late replies: 1"),
    "max_latency": ({"max_latency_s": 0.97}, "max latency 0.97 s over 0.96 s (3 x the documented"),
    "slow_recovery": ({"recovery_s": 1.01}, "recovery: the pool was whole 1.01 s"),
    "no_recovery": ({"recovery_s": None}, "recovery: the pool was whole None s"),
    "backoff": (
        {"backoff_restarts": 3, "max_restart_delay_s": 2.0},
        "backed-off restarts: 3 served workers restarted after up to 2.0 s",
    ),
    "unexpected_exit": ({"unexpected_exits": 1}, "unexpected exits: 1"),
    "twistd_died": ({"twistd_alive": False}, "twistd died"),
}


@pytest.mark.parametrize(("changes", "named"), STORM_VIOLATIONS.values(), ids=STORM_VIOLATIONS)
def test_kill_storm_violation_is_named(changes: dict[str, Any], named: str) -> None:
    """Each kill-storm violation in the counts is reported, by name and figure."""
    found = report.problems("kill_storm", _storm(**changes))
    assert _named(found, named), found


def test_kill_storm_prefetch_allows_the_prefetched_loss() -> None:
    """With --prefetch 1 a kill may cost two requests, not three."""
    lost = {"kills": 20, "worker_lost": 40, "results": 60}
    assert report.problems("kill_storm", _storm(prefetch=1, **lost)) == []
    found = report.problems("kill_storm", _storm(prefetch=1, kills=20, worker_lost=41, results=59))
    assert _named(found, "worker_lost over the documented figure: 41 for 20 kills"), found


STATUS_DISAGREEMENTS = {
    "inflight": ({"inflight": 1}, "inflight: expected 0, saw 1"),
    "clients": ({"clients": 9}, "clients: expected 10, saw 9"),
    "requests": ({"requests": 99}, "requests: expected 100, saw 99"),
    "ok": ({"ok": 91}, "ok: expected 90, saw 91"),
    "worker_lost": ({"worker_lost": 9}, "worker_lost: expected 10, saw 9"),
    "by_function": (
        {"by_function": {"traced_noop": 40}},
        "by_function: expected {'traced_noop': 40, 'traced_sleep': 40, 'traced_retry': 20}, "
        "saw {'traced_noop': 40}",
    ),
    "empty": (None, "inflight: expected 0, saw None"),
}


def test_kill_storm_takes_prefetch_as_a_keyword_only() -> None:
    """--prefetch in options is refused before anything starts: the figure a kill may
    cost is the prefetch keyword's, so it cannot disagree with the tree's option."""
    for options in (("--prefetch", "1"), ("--prefetch=1",)):
        with pytest.raises(ValueError, match="pass prefetch=N"):
            storm.kill_storm(1.0, options=options)


@pytest.mark.parametrize(
    ("status", "named"), STATUS_DISAGREEMENTS.values(), ids=STATUS_DISAGREEMENTS
)
def test_kill_storm_status_disagreement_is_named(status: dict[str, Any] | None, named: str) -> None:
    """A /status that disagrees with what the suite sent and received is reported, naming
    the field, what was expected and what it said."""
    document = {} if status is None else {**_storm()["status"], **status}
    found = report.problems("kill_storm", _storm(status=document))
    assert _named(found, f"/status disagrees on {named}"), found


def test_kill_storm_unreadable_status_is_named_as_such() -> None:
    """A /status that could not be read is reported as that, not as a disagreement."""
    error = "/status could not be read after it: ConnectionRefusedError(111)"
    found = report.problems("kill_storm", _storm(status={}, status_error=error))
    assert found == [error]


# problems(): the other scenarios


def _slowloris(**changes: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "connections": 500,
        "normal_failures": 0,
        "open_failures": 0,
        "stalled_worker_port": 500,
        "stalled_gateway": 500,
        "gateway_loaded_p99_ms": 1.1,
        "gateway_limit_ms": 2.4,
        "direct_loaded_p99_ms": 1.5,
        "direct_limit_ms": 3.0,
        "closed_by_idle_timeout": 500,
        "answered_bad_request": 500,
        "twistd_alive": True,
    }
    counts.update(changes)
    return counts


SLOWLORIS_VIOLATIONS = {
    "gateway_slowed": ({"gateway_loaded_p99_ms": 2.5}, "slowed down: the gateway client's"),
    "direct_slowed": ({"direct_loaded_p99_ms": 3.1}, "slowed down: the direct client's"),
    "failures": ({"normal_failures": 1}, "normal client failures: 1"),
    "not_opened": ({"open_failures": 2}, "stalled connections not opened: 2"),
    "closed_early": ({"stalled_gateway": 499}, "stalled connections closed before"),
    "not_answered": ({"answered_bad_request": 499}, "idle timeout: 500 stalled lines closed"),
    "died": ({"twistd_alive": False}, "twistd died"),
}


def test_slowloris_as_documented_has_no_problem() -> None:
    """Counts of a slowloris run within its bounds give no problem."""
    assert report.problems("slowloris", _slowloris()) == []


@pytest.mark.parametrize(
    ("changes", "named"), SLOWLORIS_VIOLATIONS.values(), ids=SLOWLORIS_VIOLATIONS
)
def test_slowloris_violation_is_named(changes: dict[str, Any], named: str) -> None:
    """Each slowloris violation is reported by name."""
    found = report.problems("slowloris", _slowloris(**changes))
    assert _named(found, named), found


def test_slowloris_limit_is_twice_the_unloaded_p99_plus_the_slack() -> None:
    """The loaded p99 may be 2x the unloaded one + 1 ms (the median over rounds), no more."""
    assert slowloris.__kwdefaults__["slack_ms"] == 1.0
    assert slowloris.__kwdefaults__["rounds"] >= 3


def _crash(via: str, **changes: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "via": via,
        "results_before": 50,
        "hangs": 0,
        "errors_after_kill": {wire.WORKER_LOST: 12},
        "dropped": 0,
        "orphans": 0,
        "pool_gone_s": 0.1,
        "restart_error": None,
        "restart_first_result_s": 0.05,
        "results_after_restart": 40,
        "errors_after_restart": {},
        "gateway_alive": True,
    }
    counts.update(changes)
    return counts


CRASH_VIOLATIONS = {
    "other_error": (
        {"errors_after_kill": {wire.WORKER_LOST: 3, "timeout": 1}},
        "errors other than worker_lost after the kill: {'timeout': 1}",
    ),
    "connection": (
        {"errors_after_kill": {"connection": 5}},
        "errors other than worker_lost after the kill: {'connection': 5}",
    ),
    "dropped": ({"dropped": 5}, "dropped WebSockets: the gateway closed 5"),
    "hang": ({"hangs": 1}, "hung requests: 1"),
    "no_error": ({"errors_after_kill": {}}, "no client saw an error"),
    "orphans": ({"orphans": 2}, "orphans: 2"),
    "no_restart": ({"restart_error": "port in use"}, "no restart: port in use"),
    "errors_after_restart": ({"errors_after_restart": {"hang": 1}}, "errors after the restart"),
    "gateway_died": ({"gateway_alive": False}, "the gateway died"),
}


def test_supervisor_crash_as_documented_has_no_problem() -> None:
    """Through the gateway: worker_lost alone and no WebSocket dropped give no problem."""
    assert report.problems("supervisor_crash", _crash("gateway")) == []


@pytest.mark.parametrize(("changes", "named"), CRASH_VIOLATIONS.values(), ids=CRASH_VIOLATIONS)
def test_supervisor_crash_through_gateway_violation_is_named(
    changes: dict[str, Any], named: str
) -> None:
    """Through the gateway, any error but worker_lost, a dropped WebSocket, a hang or an
    orphan is reported by name."""
    found = report.problems("supervisor_crash", _crash("gateway", **changes))
    assert _named(found, named), found


def test_supervisor_crash_direct_clients_may_see_their_connection_break() -> None:
    """Raw worker-port clients see their connection refused or reset: no problem there."""
    errors = {"errors_after_kill": {"connection": 30}}
    assert report.problems("supervisor_crash_direct", _crash("direct", **errors)) == []


def _hostile(**changes: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "generated": 100,
        "judged_worker_port": 99,
        "judged_gateway": 98,
        "problems": 0,
        "problem_cases": [],
        "processes_unchanged": True,
        "noop_after": True,
    }
    counts.update(changes)
    return counts


def _idle(**changes: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "n": 10,
        "opened": 10,
        "open_failures": 0,
        "dropped": 0,
        "status_clients": 10,
        "noop_failures": 0,
        "clients_after_close": 0,
        "status_error": None,
        "twistd_alive": True,
    }
    counts.update(changes)
    return counts


def test_hostile_and_idle_violations_are_named() -> None:
    """A corpus case not as documented, and an idle client dropped, are reported."""
    assert report.problems("hostile", _hostile()) == []
    hostile = _hostile(problems=1, problem_cases=["gateway, timeout 1e300"])
    assert report.problems("hostile", hostile) == ["not as documented: gateway, timeout 1e300"]
    assert report.problems("idle_websockets", _idle()) == []
    assert report.problems("idle_websockets", _idle(dropped=1)) == ["idle clients dropped: 1"]


@pytest.mark.parametrize("port", ["worker_port", "gateway"])
def test_hostile_with_too_few_inputs_judged_is_named(port: str) -> None:
    """A reference model that judges fewer than 90 % of the generated inputs (one that
    returned None for all of them judges none) is reported, with the figures."""
    at_least = report.problems("hostile", _hostile(**{f"judged_{port}": 90}))
    assert at_least == []
    name = port.replace("_", " ")
    found = report.problems("hostile", _hostile(**{f"judged_{port}": 0}))
    assert found == [
        f"too few generated inputs judged on the {name}: 0 of 100, not at least 90 (90%)"
    ]


IDLE_VIOLATIONS = {
    "not_opened": (
        {"opened": 8, "open_failures": 2},
        "idle clients not opened: 8 of 10 (2 failed)",
    ),
    "fewer_clients": (
        {"status_clients": 7},
        "/status counted fewer clients: at most 7 of 10 open",
    ),
    "closed_still_counted": (
        {"clients_after_close": 3},
        "/status still counts closed clients: 3 after all 10 closed",
    ),
    "no_figure_after_close": (
        {"clients_after_close": None},
        "/status still counts closed clients: None after all 10 closed",
    ),
    "unreadable_status": (
        {"clients_after_close": None, "status_error": "/status could not be read after x"},
        "/status could not be read after x",
    ),
}


@pytest.mark.parametrize(("changes", "named"), IDLE_VIOLATIONS.values(), ids=IDLE_VIOLATIONS)
def test_idle_violation_is_named(changes: dict[str, Any], named: str) -> None:
    """Each idle-WebSocket violation is reported alone, by name and figure; an unreadable
    /status as that, not as closed clients still counted."""
    assert report.problems("idle_websockets", _idle(**changes)) == [named]


def test_unknown_scenario_is_refused() -> None:
    """problems() of a scenario it does not know raises instead of finding nothing."""
    with pytest.raises(ValueError, match="no scenario named 'kill-storm'"):
        report.problems("kill-storm", {})


# The reply matchers


def test_result_matches_exactly_as_json() -> None:
    """A result matches only the same JSON value and id: 1 is not 1.0 nor true."""
    expected = oracle.expect_result({"a": [1, 2.5, None]}, 7)
    assert oracle.matches({"id": 7, "result": {"a": [1, 2.5, None]}}, expected)
    assert not oracle.matches({"id": 7, "result": {"a": [1.0, 2.5, None]}}, expected)
    assert not oracle.matches({"id": 7, "result": {"a": [True, 2.5, None]}}, expected)
    assert not oracle.matches({"id": 7.0, "result": {"a": [1, 2.5, None]}}, expected)
    assert not oracle.matches({"id": "7", "result": {"a": [1, 2.5, None]}}, expected)
    assert not oracle.matches({"id": 7, "result": {"a": [1, 2.5]}}, expected)
    assert not oracle.matches({"id": 7, "result": {"a": [1, 2.5, None]}, "x": 1}, expected)
    assert not oracle.matches({"id": 7, "error": {"code": "timeout", "message": ""}}, expected)


def test_error_matches_by_code_and_id() -> None:
    """An expected error matches its code and id, with any message, and nothing else."""
    expected = oracle.expect_error(wire.BAD_REQUEST, None)
    assert oracle.matches({"id": None, "error": {"code": "bad_request", "message": "x"}}, expected)
    assert not oracle.matches({"id": 1, "error": {"code": "bad_request", "message": "x"}}, expected)
    assert not oracle.matches({"id": None, "error": {"code": "timeout", "message": "x"}}, expected)
    assert not oracle.matches({"id": None, "error": "bad_request"}, expected)
    assert not oracle.matches({"id": None, "result": None}, expected)


def test_task_failed_matches_message_and_type_exactly() -> None:
    """An expected task_failed matches only its exact message and type."""
    expected = oracle.expect_failed("failed on purpose", "TaskRaised", 3)
    reply = {
        "id": 3,
        "error": {"code": "task_failed", "message": "failed on purpose", "type": "TaskRaised"},
    }
    assert oracle.matches(reply, expected)
    assert not oracle.matches({**reply, "error": {**reply["error"], "message": "other"}}, expected)
    assert not oracle.matches({**reply, "error": {**reply["error"], "type": "Exception"}}, expected)


def test_result_or_error_matches_either_and_nothing_else() -> None:
    """A result-or-overloaded expectation matches the result or that code only."""
    expected = oracle.expect_result_or(None, wire.OVERLOADED, 4)
    assert oracle.matches({"id": 4, "result": None}, expected)
    assert oracle.matches({"id": 4, "error": {"code": "overloaded", "message": "m"}}, expected)
    assert not oracle.matches({"id": 4, "error": {"code": "task_failed", "message": ""}}, expected)
    assert not oracle.matches({"id": 4, "result": 0}, expected)


def test_session_matches_only_a_session_line() -> None:
    """A session acknowledgement matches a line of only ``session``."""
    assert oracle.matches({"session": {"worker": 1}}, {"session": oracle.ANY})
    assert not oracle.matches({"session": {}, "id": None}, {"session": oracle.ANY})


def test_compare_matches_in_any_order_and_names_missing_and_extra() -> None:
    """_compare pairs replies with expectations in any order; it names what is missing and
    what is left over, and a reply counts for one expectation only."""
    one, two = oracle.expect_result(None, 1), oracle.expect_result(None, 2)
    assert oracle.compare([{"id": 2, "result": None}, {"id": 1, "result": None}], [one, two]) == []
    assert oracle.compare([{"id": 1, "result": None}], [one, one]) == [f"no reply like {one!r}"]
    extra = oracle.compare([{"id": 1, "result": None}, {"id": 1, "result": None}], [one])
    assert extra == ["unexpected replies: [{'id': 1, 'result': None}]"]


# The reference model of the protocol


def _reply(payload: bytes, port: str = "worker") -> list[dict[str, Any]] | None:
    return oracle.documented_reply(payload, port)


BAD = [oracle.expect_error(wire.BAD_REQUEST)]

DOCUMENTED = {
    # The examples of docs/protocol.rst.
    "echo_without_id": (b'{"function":"echo","args":{"a":1}}', [oracle.expect_result({"a": 1})]),
    "unknown": (b'{"id":"x","function":"nope"}', [oracle.expect_error(wire.UNKNOWN_FUNCTION, "x")]),
    "empty": (b"", BAD),
    "blank": (b" \t\r", BAD),
    "fail": (
        b'{"id":3,"function":"fail"}',
        [oracle.expect_failed("failed on purpose", "TaskRaised", 3)],
    ),
    "fail_message": (
        b'{"id":3,"function":"fail","args":["no"]}',
        [oracle.expect_failed("no", "TaskRaised", 3)],
    ),
    "too_many_positional": (
        b'{"id":5,"function":"echo","args":[1],"kwargs":{"b":2}}',
        [oracle.expect_error(wire.BAD_ARGUMENTS, 5)],
    ),
    "unknown_field": (
        b'{"id":6,"function":"echo","method":"x"}',
        [oracle.expect_error(wire.BAD_REQUEST, 6)],
    ),
    # Framing and JSON at the edges.
    "not_json": (b"this is not json", BAD),
    "array": (b"[1, 2, 3]", BAD),
    "invalid_utf8": (b'{"function": "echo", "args": {"a": "\xff\xfe"}}', BAD),
    "encoded_surrogate": (b'{"function": "noop", "id": "\xed\xa0\x80"}', BAD),
    "escaped_lone_surrogate": (b'{"function": "echo", "args": {"s": "\\ud800"}}', BAD),
    "nan": (b'{"function": "echo", "args": {"x": NaN}}', BAD),
    "too_large_for_a_double": (b'{"function": "echo", "args": {"x": 1e400}}', BAD),
    "huge_integer": (b'{"function": "echo", "args": {"x": ' + b"1" * 400 + b"}}", BAD),
    "integer_read_as_float": (
        b'{"id": 18446744073709551616, "function": "noop"}',
        [oracle.expect_result(None, 18446744073709551616.0)],
    ),
    "exact_integer": (
        b'{"id": 18446744073709551615, "function": "noop"}',
        [oracle.expect_result(None, 2**64 - 1)],
    ),
    "key_twice": (b'{"id": 1, "id": 2, "function": "noop"}', [oracle.expect_result(None, 2)]),
    "bom": (b'\xef\xbb\xbf{"function": "noop"}', BAD),
    "deep": (b"[" * 2000 + b"]" * 2000, BAD),
    # Fields.
    "bool_id": (b'{"id": true, "function": "noop"}', BAD),
    "object_id": (b'{"id": {}, "function": "noop"}', BAD),
    "no_function": (b'{"id": 1}', [oracle.expect_error(wire.BAD_REQUEST, 1)]),
    "empty_function": (b'{"id": 1, "function": ""}', [oracle.expect_error(wire.BAD_REQUEST, 1)]),
    "args_string": (
        b'{"id": 1, "function": "echo", "args": "x"}',
        [oracle.expect_error("bad_request", 1)],
    ),
    "kwargs_list": (
        b'{"id": 1, "function": "echo", "kwargs": []}',
        [oracle.expect_error(wire.BAD_REQUEST, 1)],
    ),
    "keyword_twice": (
        b'{"id": 1, "function": "echo", "args": {"a": 1}, "kwargs": {"a": 2}}',
        [oracle.expect_error(wire.BAD_REQUEST, 1)],
    ),
    "kwargs_added": (
        b'{"id": 1, "function": "echo", "args": {"a": 1}, "kwargs": {"b": 2}}',
        [oracle.expect_result({"a": 1, "b": 2}, 1)],
    ),
    "timeout_zero": (
        b'{"id": 1, "function": "noop", "timeout": 0}',
        [oracle.expect_error("bad_request", 1)],
    ),
    "timeout_true": (
        b'{"id": 1, "function": "noop", "timeout": true}',
        [oracle.expect_error(wire.BAD_REQUEST, 1)],
    ),
    "huge_timeout": (
        b'{"id": 1, "function": "noop", "timeout": 1e300}',
        [oracle.expect_result(None, 1)],
    ),
    "noop_with_args": (
        b'{"id": 1, "function": "noop", "args": {"progress": 1}}',
        [oracle.expect_error(wire.BAD_ARGUMENTS, 1)],
    ),
    "batch_on_worker": (
        b'{"id": 1, "function": "echo", "batch": [{"a": 1}]}',
        [oracle.expect_error(wire.BAD_REQUEST, 1)],
    ),
    "cancel": (b'{"cancel": "nope"}', []),
    "cancel_true": (b'{"cancel": true}', BAD),
    "cancel_with_id": (b'{"cancel": 1, "id": 1}', BAD),
    "session": (b'{"session": {}}', [{"session": oracle.ANY}]),
    "bad_session_option": (b'{"session": {"reject_when_busy": 1}}', BAD),
    "auth_without_secret": (b'{"auth": "00"}', []),
}


@pytest.mark.parametrize(("payload", "expected"), DOCUMENTED.values(), ids=DOCUMENTED)
def test_reference_model_gives_the_documented_reply_on_the_worker_port(
    payload: bytes, expected: list[dict[str, Any]]
) -> None:
    """The reference model answers each input as docs/protocol.rst says the worker does."""
    assert _reply(payload) == expected


def test_reference_model_of_the_gateway() -> None:
    """On the gateway, session and auth lines get bad_request and a batch runs each item."""
    assert _reply(b'{"session": {}}', "gateway") == BAD
    assert _reply(b'{"auth": "00"}', "gateway") == BAD
    assert _reply(b'{"id": 1, "function": "echo", "batch": [{"a": 1}, [2]]}', "gateway") == [
        oracle.expect_result(
            [{"result": {"a": 1}}, {"error": {"code": "bad_arguments", "message": oracle.ANY}}],
            1,
        )
    ]
    assert _reply(b'{"id": 1, "function": "echo", "batch": []}', "gateway") == [
        oracle.expect_error(wire.BAD_REQUEST, 1)
    ]
    assert _reply(b'{"id": 1, "function": "noop"}', "gateway") == [oracle.expect_result(None, 1)]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": 1, "function": "sleep", "args": [1]}',  # a slow task is not run
        b'{"id": 1, "function": "echo", "args": {"x": ' + b"[" * 300 + b"]" * 300 + b"}}",
        b'{"id": 1, "function": "echo", "batch": null}',
        b'{"session": {}, "id": 3}',
    ],
    ids=["slow_task", "nesting_between_the_documented_bounds", "null_batch", "session_with_id"],
)
def test_reference_model_judges_nothing_the_documents_leave_open(payload: bytes) -> None:
    """Inputs whose reply the documents do not fix exactly are not judged (None)."""
    assert _reply(payload) is None


def test_reference_model_does_not_use_the_product_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference model gives its answers with taskoffload.wire's decoder broken."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the product's decoder was used")

    monkeypatch.setattr(wire, "decode_message", broken)
    monkeypatch.setattr(wire, "loads", broken, raising=False)
    assert _reply(b'{"id": 1, "function": "echo", "args": {"a": 1}}') == [
        oracle.expect_result({"a": 1}, 1)
    ]


# The execution trace


def test_traced_tasks_append_one_line_per_run(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run of a traced task appends its token to the trace, which read_trace counts;
    only traced_retry is registered retry=True."""
    trace = tmp_path / "trace"
    monkeypatch.setenv(storm.TRACE_VARIABLE, str(trace))
    module = types.ModuleType(storm.TRACED_MODULE)
    exec(compile(storm._TRACED_SOURCE, storm.TRACED_MODULE, "exec"), module.__dict__)
    assert module.traced_noop("a.1") == "a.1"
    assert module.traced_sleep("a.2", 0) == "a.2"
    assert module.traced_noop("a.1") == "a.1"
    assert storm.read_trace(trace) == {"a.1": 2, "a.2": 1}
    retry = {
        name: getattr(module, name).__dict__[SPEC_ATTRIBUTE].retry
        for name in ("traced_noop", "traced_sleep", "traced_retry")
    }
    assert retry == {"traced_noop": False, "traced_sleep": False, "traced_retry": True}


testSuite = pytest_module(__file__)
