"""
The error codes of the wire format, stable and documented in ``docs/protocol.rst``
("Error codes"); :mod:`taskoffload.wire` re-exports them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BAD_ARGUMENTS",
    "BAD_REQUEST",
    "CANCELLED",
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
]

#: Not JSON, not an object, or missing or ill-typed fields.
BAD_REQUEST: Final = "bad_request"
#: No task of that name is registered.
UNKNOWN_FUNCTION: Final = "unknown_function"
#: The arguments do not bind to the task's signature.
BAD_ARGUMENTS: Final = "bad_arguments"
#: The task raised.
TASK_FAILED: Final = "task_failed"
#: The task's deadline passed.
TIMEOUT: Final = "timeout"
#: The caller cancelled the request.
CANCELLED: Final = "cancelled"
#: The process running the task died, or the connection to it was lost.
WORKER_LOST: Final = "worker_lost"
#: A bound was hit; retry later.
OVERLOADED: Final = "overloaded"
#: Credentials were missing or wrong.
UNAUTHORIZED: Final = "unauthorized"
#: The task runs on another lane's workers; the request did not run.
WRONG_LANE: Final = "wrong_lane"
#: The same call (function and arguments) killed workers lately: it is not sent.
POISONED: Final = "poisoned"
#: A resume named no detached call this gateway process holds.
UNKNOWN_RESUME: Final = "unknown_resume"

#: Every error code, stable and documented in ``docs/protocol.rst``.
ERROR_CODES: Final = frozenset(
    {
        BAD_REQUEST,
        UNKNOWN_FUNCTION,
        BAD_ARGUMENTS,
        TASK_FAILED,
        TIMEOUT,
        CANCELLED,
        WORKER_LOST,
        OVERLOADED,
        UNAUTHORIZED,
        WRONG_LANE,
        POISONED,
        UNKNOWN_RESUME,
    }
)
