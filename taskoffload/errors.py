"""
How a call fails: :class:`TaskError`, the wire format's error reply as an exception.
"""

from __future__ import annotations

from typing import Any

from taskoffload import wire

__all__ = ["TaskError"]


class TaskError(Exception):
    """
    A task did not produce a result: the error reply of the wire format, or the
    same codes for what went wrong on the client's side (``timeout``,
    ``cancelled``, ``worker_lost``).

    :ivar code: one of :data:`taskoffload.wire.ERROR_CODES`.
    :ivar message: what went wrong, for a person.
    :ivar type: the exception class name for ``task_failed``, else ``None``.
    :ivar cause: for ``worker_lost``, why the worker died, when the pool said
        (``{"exit_status": 3}`` or ``{"signal": "SIGKILL"}``, maybe with
        ``"oom": true`` and ``"rss_mib"``), else ``None``.
    """

    def __init__(
        self, code: str, message: str, type: str | None = None, cause: dict[str, Any] | None = None
    ) -> None:
        super().__init__(code, message, type)
        self.code = code
        self.message = message
        self.type = type
        self.cause = cause

    def __str__(self) -> str:
        if self.type:
            return f"{self.code} ({self.type}): {self.message}"
        return f"{self.code}: {self.message}"

    @classmethod
    def from_reply(cls, reply: wire.ErrorReply) -> TaskError:
        """
        :return: the error an error reply stands for.
        """
        return cls(reply.code, reply.message, reply.type, reply.cause)

    def to_reply(self, request_id: wire.RequestId) -> wire.ErrorReply:
        """
        :param request_id: the id the reply answers.
        :return: this error as a wire-format error reply.
        """
        return wire.ErrorReply(
            id=request_id, code=self.code, message=self.message, type=self.type, cause=self.cause
        )
