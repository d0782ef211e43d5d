"""
Writing a message now rather than at the reactor's next turn.

Twisted's TCP transport buffers every ``write`` and sends it when the reactor next
polls, after it has read every other connection that was ready.  That batches
many small writes to one connection into one ``send``, which is what a stream of
progress messages wants.  A connection with one request in flight gets nothing
to batch, only the wait: in a burst of 1000 WebSocket frames, the first request
would reach a worker only once the gateway had parsed all 1000 (about 0.1 s
here), with every worker idle meanwhile.  :func:`write_now` sends at once.
"""

from __future__ import annotations

from typing import Any


def write_now(transport: Any, data: bytes) -> None:
    """
    Write ``data`` to ``transport`` and hand what it buffers to the kernel now.

    On a transport that is not a plain socket connection (a test's
    ``StringTransport``, TLS, one that is closing) this is a plain ``write``,
    and the reactor sends the data as usual.  Whatever the socket does not take
    now (it is full, or failed) stays with the reactor, which sends it, or
    reports the failure, on its next turn as it would have anyway.

    :param transport: a connected transport.
    :param data: the bytes to write.
    """
    transport.write(data)
    # IWriteDescriptor.doWrite is what the reactor itself calls once the socket
    # is writable; calling it early is safe because a failure it returns recurs
    # on the reactor's own call (the descriptor stays registered for writing
    # until its buffer is empty).
    flush = getattr(transport, "doWrite", None)
    if (
        flush is None
        or getattr(transport, "disconnecting", True)
        or getattr(transport, "TLS", False)
    ):
        return
    flush()
