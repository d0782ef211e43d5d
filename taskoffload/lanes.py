"""
Lanes: workers set aside for a class of tasks, so that a burst of heavy work never
delays short interactive calls.

A task names its lane (``@task(lane="interactive")``; tasks without one are on
:data:`DEFAULT_LANE`); the pool reserves workers for each lane it is started with
(``--lane interactive=4``), and each lane's workers take connections on a
listening socket of their own.  A worker acknowledges a connection with its lane,
the pool's other lanes and where they listen, and which tasks run where
(:class:`LaneInfo`, in :class:`~taskoffload.wire.SessionAck`), so a client keeps
one waiting line per lane and sends each call to its lane's workers.

This module holds what the pool, the workers and the clients share of that: the
names, the ``--lane`` option (:class:`Lane`), and how a lane's address follows
from the pool's.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs

__all__ = [
    "DEFAULT_LANE",
    "Lane",
    "LaneInfo",
    "check_lane_name",
    "lane_listen",
    "read_ack_lanes",
]

#: The lane of tasks that name none, served by the workers no lane reserves.
DEFAULT_LANE: Final = "default"

_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_FIELD_SEPARATOR: Final = re.compile(r"(?<!\\):")


def check_lane_name(name: object) -> str:
    """
    :return: ``name``, if it is a lane name: a letter, then up to 31 letters,
        digits, ``_`` or ``-``.
    :raises ValueError: if it is not.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a lane name: a letter, then up to 31 letters, digits, _ or -"
        )
    return name


@attrs.frozen
class LaneInfo:
    """
    What a worker tells a client of one of the pool's lanes.

    :ivar name: the lane's name.
    :ivar slots: how many tasks its workers run at once.
    :ivar port: the TCP port its workers listen on, for a pool on TCP.
    :ivar path: the socket path its workers listen on, for a pool on a UNIX socket.
    """

    name: str
    slots: int
    port: int | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        """:return: the lane as the acknowledgement writes it (without its name)."""
        obj: dict[str, Any] = {"slots": self.slots}
        if self.port is not None:
            obj["port"] = self.port
        if self.path is not None:
            obj["path"] = self.path
        return obj

    @classmethod
    def from_json(cls, name: str, obj: object) -> LaneInfo | None:
        """:return: the lane read from an acknowledgement, or ``None`` if garbled."""
        if not isinstance(obj, dict):
            return None
        slots, port, path = obj.get("slots"), obj.get("port"), obj.get("path")
        if not isinstance(slots, int) or not _positive(slots):
            return None
        return cls(
            name=name,
            slots=slots,
            port=port if isinstance(port, int) and _positive(port) and port < 65536 else None,
            path=path if isinstance(path, str) and path else None,
        )


def read_ack_lanes(session: dict[str, Any]) -> dict[str, Any]:
    """
    :param session: the object of a session acknowledgement.
    :return: its lane fields, as :class:`~taskoffload.wire.SessionAck` takes
        them: what of them is readable, the rest left out.
    """
    lane, lanes, routes = session.get("lane"), session.get("lanes"), session.get("routes")
    read = [LaneInfo.from_json(n, o) for n, o in lanes.items()] if isinstance(lanes, dict) else []
    return {
        "lane": lane if isinstance(lane, str) and lane else DEFAULT_LANE,
        "lanes": tuple(info for info in read if info is not None),
        "routes": {
            name: to
            for name, to in (routes.items() if isinstance(routes, dict) else ())
            if isinstance(to, str)
        },
    }


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@attrs.frozen
class Lane:
    """
    One lane a pool reserves workers for: ``--lane NAME=COUNT`` or
    ``--lane NAME=COUNT:ENDPOINT``.

    :ivar name: the lane's name, never :data:`DEFAULT_LANE`.
    :ivar count: the worker processes reserved for it.
    :ivar listen: the server endpoint its workers listen on; empty for one beside
        the pool's own (:func:`lane_listen`).
    :ivar port: the TCP port it listens on, once bound.
    :ivar path: the UNIX socket path it listens on, once bound.
    """

    name: str
    count: int
    listen: str = ""
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Lane:
        """
        Read a ``--lane`` option.

        :raises ValueError: with what is wrong, if ``text`` is not one.
        """
        name, equals, rest = text.partition("=")
        count, _, listen = rest.partition(":")
        if not equals or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"--lane {text!r}: expected NAME=COUNT or NAME=COUNT:ENDPOINT, "
                "e.g. interactive=4 or interactive=4:tcp:12346:interface=127.0.0.1"
            )
        check_lane_name(name)
        if name == DEFAULT_LANE:
            raise ValueError(
                f"--lane {text!r}: the {DEFAULT_LANE!r} lane is the workers no lane "
                "reserves; --count sets them"
            )
        return cls(name=name, count=int(count), listen=listen)

    def info(self, concurrency: int) -> LaneInfo:
        """:return: what a worker tells clients of this lane."""
        return LaneInfo(
            name=self.name, slots=self.count * concurrency, port=self.port, path=self.path
        )


def lane_listen(pool_listen: str, lane: str) -> str:
    """
    :param pool_listen: the server endpoint the pool's own workers listen on.
    :param lane: a lane's name.
    :return: the endpoint a lane with no endpoint of its own listens on: on TCP,
        the same interface, on a port the system picks; on a UNIX socket, the
        pool's path with ``.LANE`` added.
    :raises ValueError: for an endpoint of any other kind (give the lane its own).
    """
    kind, _, rest = pool_listen.partition(":")
    # Endpoint fields are separated by colons that no backslash escapes.
    fields = _FIELD_SEPARATOR.split(rest) if rest else []
    if kind in ("tcp", "tcp6"):
        # The port is the first field without a name, or port=; backlog= is the
        # pool's own; the rest (interface=) stays.
        positional = next((i for i, f in enumerate(fields) if "=" not in f), None)
        kept = [
            f
            for i, f in enumerate(fields)
            if i != positional and not f.startswith(("port=", "backlog="))
        ]
        return ":".join([kind, "0", *kept])
    if kind == "unix":
        # The path is the first field without a name, or address=.
        for i, f in enumerate(fields):
            if "=" not in f or f.startswith("address="):
                fields[i] = f"{f}.{lane}"
                return ":".join([kind, *fields])
    raise ValueError(
        f"lane {lane!r}: the pool listens on {pool_listen!r}; give the lane its own "
        f"endpoint, e.g. --lane {lane}=COUNT:tcp:PORT:interface=127.0.0.1"
    )
