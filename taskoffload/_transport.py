"""
Writing a message now rather than at the reactor's next turn.

Twisted's TCP transport buffers every ``write`` and sends it when the reactor next
polls, after it has read every other connection that was ready.  That batches
many small writes to one connection into one ``send``, which is what a stream of
progress messages wants.  A connection with one request in flight gets nothing
to batch, only the wait: in a burst of 1000 WebSocket frames, the first request
would reach a worker only once the gateway had parsed all 1000 (about 0.1 s
here), with every worker idle meanwhile.  :func:`write_now` sends the first
message of a turn at once, and lets the ones after it on the same connection
go together.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.internet.tcp import Connection

__all__ = ["write_now"]


class _Turns:
    """
    Counts a reactor's turns in which something was written: the first write of
    a turn asks for a call on the next one, which moves the count on.  So a
    connection can tell whether it has already sent in this turn.
    """

    def __init__(self, reactor: Any) -> None:
        self.number = 0
        self._asked = False
        self._reactor = reactor

    def now(self) -> int:
        """:return: the number of the current turn."""
        if not self._asked:
            self._asked = True
            self._reactor.callLater(0, self._next)
        return self.number

    def _next(self) -> None:
        self.number += 1
        self._asked = False


_turns: weakref.WeakKeyDictionary[Any, _Turns] = weakref.WeakKeyDictionary()

#: The attribute a transport keeps the turn of its last direct send in.
_SENT_IN_TURN = "_taskoffload_sent_in_turn"


def write_now(transport: Any, data: bytes) -> None:
    """
    Write ``data`` to ``transport``: the first message of a reactor turn at once,
    the ones after it in the same turn together at the end of the turn.

    On a plain socket connection with nothing buffered, the first message of a
    turn goes straight to the socket: one ``send``, without registering the
    socket with the reactor for writing and unregistering it again (two
    ``epoll_ctl`` calls a message).  Messages written to that connection later in
    the same turn are buffered, and the reactor sends them in one ``send`` when
    the turn ends.  What the socket does not take goes through the transport's
    own ``write``, flushed at once as the reactor would on its next turn; a
    failed ``send`` leaves the bytes to the transport too, which reports the
    failure as it always does.  Any other transport (a test's
    ``StringTransport``, TLS, one that is closing) gets a plain ``write``.

    :param transport: a connected transport.
    :param data: the bytes to write.
    """
    # Only Twisted's own socket connection: a wrapper (TLS over an endpoint is
    # one) forwards attribute lookups to the connection it wraps, so looking for
    # a socket would find the raw one under the encryption.
    if not isinstance(transport, Connection) or transport.disconnecting or transport.TLS:
        transport.write(data)
        return
    sock = transport.socket
    reactor = transport.reactor
    turns = _turns.get(reactor)
    if turns is None:
        turns = _turns[reactor] = _Turns(reactor)
    turn = turns.now()
    if getattr(transport, _SENT_IN_TURN, None) == turn:
        transport.write(data)  # sent with the rest of this turn's, at its end
        return
    setattr(transport, _SENT_IN_TURN, turn)
    # Twisted's tcp.Connection buffers: write directly only behind nothing.
    if not transport.dataBuffer and not transport._tempDataBuffer:
        try:
            sent = sock.send(data)
        except OSError:
            # Full (EAGAIN) or failed: the transport's own write sends it later,
            # or meets the same error and reports it.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
    # IWriteDescriptor.doWrite is what the reactor itself calls once the socket
    # is writable; calling it early is safe because a failure it returns recurs
    # on the reactor's own call (the descriptor stays registered for writing
    # until its buffer is empty).
    transport.doWrite()
