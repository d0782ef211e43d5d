"""
Why a worker died, as the pool tells its clients: the death journal's files and
the two control lines that ask for one (docs/protocol.rst, "Lost workers").

The supervisor writes one small JSON file per unplanned worker exit, ``PID.json``,
in a private directory (:mod:`taskoffload.deaths`); its workers learn the
directory from the environment (:data:`JOURNAL_ENV`).  A client whose connection
to worker ``PID`` broke with calls in flight asks any worker of the pool::

    {"lost": 4242}

and the worker answers, without an ``id``, with the record or ``null`` when it
has none (yet)::

    {"lost": 4242, "cause": {"exit_status": 3, "rss_mib": 41.2}}

Everything here is pure but :func:`read_death`, which reads one file.
"""

from __future__ import annotations

import os
from typing import Any, Final, TypeGuard

import attrs
import orjson

__all__ = [
    "JOURNAL_ENV",
    "LOST_QUERY_FORM",
    "LostAnswer",
    "LostQuery",
    "death_file",
    "describe",
    "encode_lost_answer",
    "encode_lost_query",
    "read_death",
    "read_lost_answer",
    "read_lost_query",
    "worker_answer",
]

#: The environment variable naming the death journal's directory, in the workers.
JOURNAL_ENV: Final = "TASKOFFLOAD_DEATH_JOURNAL"

#: What a malformed lost query is told.
LOST_QUERY_FORM: Final = 'a lost query is {"lost": PID} with a positive whole PID'

#: The longest journal file read, in bytes: a record is a few dozen.
_MAX_RECORD: Final = 4096


@attrs.frozen
class LostQuery:
    """A client asks why worker ``pid`` ended."""

    pid: int


@attrs.frozen
class LostAnswer:
    """
    A worker's answer to a :class:`LostQuery`.

    :ivar cause: the journal's record of the death (``exit_status`` or
        ``signal``, maybe ``oom`` and ``rss_mib``), or ``None`` if it has none.
    """

    pid: int
    cause: dict[str, Any] | None


def _is_pid(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_lost_query(obj: dict[str, Any]) -> LostQuery | None:
    """:return: the query a decoded line holding ``lost`` is, or ``None`` if malformed."""
    pid = obj.get("lost")
    if len(obj) != 1 or not _is_pid(pid):
        return None
    return LostQuery(pid=pid)


def read_lost_answer(obj: dict[str, Any]) -> LostAnswer | None:
    """:return: the answer a decoded id-less reply holding ``lost`` is, or ``None``."""
    pid, cause = obj.get("lost"), obj.get("cause")
    if not _is_pid(pid) or not (cause is None or isinstance(cause, dict)):
        return None
    return LostAnswer(pid=pid, cause=cause)


def encode_lost_query(query: LostQuery) -> bytes:
    """Encode a lost query as one line."""
    return orjson.dumps({"lost": query.pid}) + b"\n"


def encode_lost_answer(answer: LostAnswer) -> bytes:
    """Encode a worker's answer to a lost query as one line."""
    return orjson.dumps({"lost": answer.pid, "cause": answer.cause}) + b"\n"


def death_file(directory: str, pid: int) -> str:
    """:return: the path of worker ``pid``'s record in the journal at ``directory``."""
    return os.path.join(directory, f"{pid}.json")


def read_death(directory: str | None, pid: int) -> dict[str, Any] | None:
    """
    :param directory: the death journal's directory; ``None``: none known.
    :return: the record of worker ``pid``'s death, or ``None`` if there is none
        (or it cannot be read).
    """
    if not directory:
        return None
    try:
        with open(death_file(directory, pid), "rb") as f:
            record = orjson.loads(f.read(_MAX_RECORD))
    except (OSError, orjson.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def worker_answer(pid: int, directory: str | None = None) -> bytes:
    """
    :param directory: the death journal's directory; by default the one the
        environment names (:data:`JOURNAL_ENV`).
    :return: a worker's answer line to a lost query for ``pid``.
    """
    if directory is None:
        directory = os.environ.get(JOURNAL_ENV)
    return encode_lost_answer(LostAnswer(pid=pid, cause=read_death(directory, pid)))


def describe(cause: dict[str, Any]) -> str:
    """:return: a cause said for people: "exit status 3, last RSS 41.2 MiB"."""
    if "signal" in cause:
        text = f"killed by {cause['signal']}"
        if cause.get("oom"):
            text += " (the OOM killer)"
    else:
        text = f"exit status {cause.get('exit_status')}"
    rss = cause.get("rss_mib")
    if rss is not None:
        text += f", last RSS {rss} MiB"
    return text
