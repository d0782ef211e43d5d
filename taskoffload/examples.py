"""
Built-in example tasks, served when no ``--tasks`` module is named.

``send_mail`` really sends, with :mod:`smtplib`, to the SMTP server named by the
``TASKOFFLOAD_SMTP_HOST`` and ``TASKOFFLOAD_SMTP_PORT`` environment variables,
which the worker role sets from ``--smtp-host`` and ``--smtp-port``.
"""

from __future__ import annotations

import os
import smtplib
import time
from email.message import EmailMessage
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from taskoffload.registry import task

__all__ = ["cpu", "echo", "fail", "noop", "send_mail", "sleep", "whoami"]


@task
def noop() -> None:
    """Do nothing: the round trip alone."""
    return None


@task
def echo(**kwargs: Any) -> dict[str, Any]:
    """:return: the keyword arguments it was given."""
    return kwargs


@task
def sleep(seconds: float) -> float:
    """
    Block the worker process for ``seconds``, as slow synchronous I/O would.

    :return: ``seconds``.
    """
    time.sleep(float(seconds))
    return seconds


@task
def cpu(n: int) -> int:
    """
    Busy-loop ``n`` times.

    :return: the sum of ``0..n-1``.
    """
    total = 0
    for i in range(int(n)):
        total += i
    return total


class TaskRaised(Exception):
    """What :func:`fail` raises."""


@task
def fail(message: str = "failed on purpose") -> None:
    """Raise :class:`TaskRaised` with ``message``."""
    raise TaskRaised(message)


@task
def whoami(delay: float = 0) -> Deferred[dict[str, int]]:
    """
    Wait ``delay`` seconds without blocking the process, then name it.

    :return: ``{"pid": <the worker's process id>}``.
    """
    from twisted.internet import reactor

    return deferLater(reactor, float(delay), lambda: {"pid": os.getpid()})  # type: ignore[arg-type]  # the global reactor provides IReactorTime


@task
def send_mail(
    to: str, subject: str, body: str, sender: str = "taskoffload@localhost"
) -> dict[str, Any]:
    """
    Send one plain-text email through the configured SMTP server.

    :return: ``{"sent": True, "to": to}``.
    """
    host = os.environ.get("TASKOFFLOAD_SMTP_HOST", "localhost")
    port = int(os.environ.get("TASKOFFLOAD_SMTP_PORT", "25"))
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.send_message(message)
    return {"sent": True, "to": to}
