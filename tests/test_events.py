"""The event schema shared by the pool's processes and its supervisor."""

from __future__ import annotations

import os

import pytest

from taskoffload import events
from tests._trial_bridge import pytest_module


@pytest.mark.parametrize(
    "event",
    [
        events.Log(index=1, pid=10, level="warn", namespace="app", text="hello"),
        events.Ready(pid=9),
        events.Failed(pid=9, text="Traceback ..."),
        events.Forked(index=0, pid=11),
        events.Serving(index=0, pid=11),
        events.Stats(index=0, pid=11, tasks_done=3, rss_mib=21.5),
        events.Deadline(index=0, pid=11, kill_at=12.5),
        events.Deadline(index=0, pid=11, kill_at=None),
        events.Recycling(index=2, pid=12, reason="ran 10 tasks"),
        events.Stopped(index=2, pid=12, tasks_done=10),
        events.Exited(index=2, pid=12, code=-9),
    ],
)
def test_every_kind_survives_the_pipe(event: events.Event) -> None:
    """What one end encodes, the other decodes to an equal record of the same kind."""
    line = events.encode(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert events.decode(line) == event


def test_the_line_names_its_kind() -> None:
    """Each line carries its kind in the ``event`` field, beside slot and pid."""
    assert events.encode(events.Forked(index=3, pid=40)) == (
        b'{"event":"forked","index":3,"pid":40}\n'
    )


@pytest.mark.parametrize("line", [b"Traceback (most recent call last):", b"[1, 2]", b'{"a": 1}'])
def test_other_output_is_not_an_event(line: bytes) -> None:
    """A line that is not a JSON object with an ``event`` field is output, not an event."""
    with pytest.raises(events.NotAnEvent):
        events.decode(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "hatched", "index": 0, "pid": 1}',
        b'{"event": ["serving"], "index": 0, "pid": 1}',
        b'{"event": "serving", "index": 0}',
        b'{"event": "serving", "index": 0, "pid": 1, "colour": "red"}',
    ],
)
def test_an_event_off_the_schema_is_bad(line: bytes) -> None:
    """An unknown kind, a missing pid or an unknown field is a bad event."""
    with pytest.raises(events.BadEvent):
        events.decode(line)


def test_an_unknown_kind_is_told_apart_with_what_was_read() -> None:
    """An unknown kind is an UnknownEvent carrying the event as read; a known kind
    whose fields do not fit is a BadEvent, but not an UnknownEvent."""
    with pytest.raises(events.UnknownEvent) as unknown:
        events.decode(b'{"event": "hatched", "index": 0, "pid": 1}')
    assert unknown.value.document == {"event": "hatched", "index": 0, "pid": 1}
    with pytest.raises(events.BadEvent) as bad:
        events.decode(b'{"event": "serving", "index": 0}')
    assert not isinstance(bad.value, events.UnknownEvent)


def read_lines(fd: int) -> list[bytes]:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    return data.splitlines(keepends=True)


def test_the_writer_writes_one_line_per_event() -> None:
    """Each event sent is one line on the pipe, which decodes to that event."""
    read_end, write_end = os.pipe()
    writer = events.EventWriter(write_end, index=4)
    writer.send(events.Serving(index=writer.index, pid=writer.pid))
    writer.send(events.Stopped(index=writer.index, pid=writer.pid, tasks_done=2))
    lines = read_lines(read_end)
    assert [events.decode(line) for line in lines] == [
        events.Serving(index=4, pid=os.getpid()),
        events.Stopped(index=4, pid=os.getpid(), tasks_done=2),
    ]
    os.close(read_end)
    os.close(write_end)


def test_a_long_text_is_split_into_whole_writes() -> None:
    """A log text too long for one atomic pipe write arrives as several whole events."""
    read_end, write_end = os.pipe()
    writer = events.EventWriter(write_end, index=0)
    text = "".join(chr(ord("a") + n % 26) for n in range(3 * events.PIPE_ATOMIC))
    writer.send(events.Log(index=0, pid=writer.pid, level="error", text=text))
    lines = read_lines(read_end)
    assert len(lines) > 1
    assert all(len(line) <= events.PIPE_ATOMIC for line in lines)
    parts = [events.decode(line) for line in lines]
    assert all(isinstance(p, events.Log) and p.level == "error" for p in parts)
    assert "".join(p.text for p in parts if isinstance(p, events.Log)) == text
    os.close(read_end)
    os.close(write_end)


def test_a_closed_pipe_is_ignored() -> None:
    """Once the supervisor's end is gone, sending is a no-op, not an exception."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    writer = events.EventWriter(write_end, index=0)
    writer.send(events.Serving(index=0, pid=writer.pid))
    assert writer.broken
    writer.send(events.Serving(index=0, pid=writer.pid))
    os.close(write_end)


testSuite = pytest_module(__file__)
