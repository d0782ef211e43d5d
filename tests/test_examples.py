"""Tests for taskoffload.examples: the tasks served when no --tasks module is named."""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from twisted.internet.task import Clock

from taskoffload import examples
from tests._trial_bridge import pytest_module
from tests.outcomes import outcome


def test_noop() -> None:
    """noop returns None."""
    assert examples.noop() is None


def test_echo() -> None:
    """echo returns the keyword arguments it was given."""
    assert examples.echo(a=1, b=[2, "three"]) == {"a": 1, "b": [2, "three"]}
    assert examples.echo() == {}


def test_cpu() -> None:
    """cpu returns the sum of 0..n-1, and accepts n as a string of digits."""
    assert examples.cpu(10) == 45
    assert examples.cpu("4") == 6  # type: ignore[arg-type]  # JSON callers may send text
    assert examples.cpu(0) == 0


def test_sleep_blocks_for_the_given_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """sleep blocks (time.sleep) for the given seconds, given as text too, and returns them."""
    slept: list[float] = []
    monkeypatch.setattr(examples.time, "sleep", slept.append)
    assert examples.sleep(0.05) == 0.05
    assert examples.sleep("2") == "2"  # type: ignore[arg-type]  # JSON callers may send text
    assert slept == [0.05, 2.0]


def test_fail_raises() -> None:
    """fail raises TaskRaised with its message, or a default one."""
    with pytest.raises(examples.TaskRaised, match=r"^boom$"):
        examples.fail("boom")
    with pytest.raises(examples.TaskRaised, match="failed on purpose"):
        examples.fail()


def test_whoami_waits_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    """whoami waits for its delay on the reactor's clock, not by blocking, then names the process."""
    import twisted.internet

    clock = Clock()
    monkeypatch.setattr(twisted.internet, "reactor", clock)
    deferred = examples.whoami(0.05)
    assert not deferred.called
    clock.advance(0.049)
    assert not deferred.called
    clock.advance(0.001)
    assert outcome(deferred) == {"pid": os.getpid()}


# -- send_mail against a real SMTP server --------------------------------------------


@attrs.define
class MailRecorder:
    """An aiosmtpd handler that keeps what it receives and refuses one recipient."""

    received: list[Any] = attrs.Factory(list)
    refused: str = "nobody@example.org"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address == self.refused:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope)
        return "250 Message accepted for delivery"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def smtp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MailRecorder]:
    """A real SMTP server on a free loopback port, named to send_mail by environment."""
    recorder = MailRecorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch.setenv("TASKOFFLOAD_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("TASKOFFLOAD_SMTP_PORT", str(port))
    try:
        yield recorder
    finally:
        controller.stop()


def test_send_mail_delivers(smtp_server: MailRecorder) -> None:
    """send_mail delivers one message with the given recipient, subject and body."""
    result = examples.send_mail(
        to="alice@example.org", subject="Report ready", body="Your report is ready.\nBye."
    )
    assert result == {"sent": True, "to": "alice@example.org"}
    (envelope,) = smtp_server.received
    assert envelope.mail_from == "taskoffload@localhost"
    assert envelope.rcpt_tos == ["alice@example.org"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["To"] == "alice@example.org"
    assert message["From"] == "taskoffload@localhost"
    assert message["Subject"] == "Report ready"
    # SMTP carries lines ended by CRLF.
    assert message.get_content().replace("\r\n", "\n") == "Your report is ready.\nBye.\n"


def test_send_mail_custom_sender(smtp_server: MailRecorder) -> None:
    """send_mail sends from the given sender."""
    examples.send_mail(to="a@example.org", subject="s", body="b", sender="ops@example.org")
    (envelope,) = smtp_server.received
    assert envelope.mail_from == "ops@example.org"


def test_send_mail_refused_recipient_raises(smtp_server: MailRecorder) -> None:
    """A recipient the server refuses makes send_mail raise, which callers see as task_failed."""
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        examples.send_mail(to="nobody@example.org", subject="s", body="b")
    assert smtp_server.received == []


def test_send_mail_without_server_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no SMTP server listening, send_mail raises instead of hanging."""
    monkeypatch.setenv("TASKOFFLOAD_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("TASKOFFLOAD_SMTP_PORT", str(free_port()))
    with pytest.raises(OSError):
        examples.send_mail(to="a@example.org", subject="s", body="b")


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
