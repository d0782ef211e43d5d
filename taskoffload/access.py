"""
Who may use the gateway: :class:`GatewayAccess`, checked on each WebSocket
handshake and on each ``/status`` and ``/metrics`` request.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["GatewayAccess"]


class GatewayAccess:
    """
    Who may use the gateway.

    :param token: when given, every WebSocket handshake and every ``/status`` and
        ``/metrics`` request must present it, as ``Authorization: Bearer TOKEN`` or
        as the query parameter ``token``.
    :param allowed_origins: when given, a WebSocket handshake whose ``Origin``
        header (sent by browsers) is not one of these is refused; a handshake with
        no ``Origin`` (not a browser) is allowed.
    """

    def __init__(self, token: str | None = None, allowed_origins: Iterable[str] = ()) -> None:
        self._token = token.encode("utf-8") if token else None
        self.allowed_origins = frozenset(_origin(o) for o in allowed_origins)

    @property
    def token_required(self) -> bool:
        """Whether a token must be presented."""
        return self._token is not None

    def presents_token(self, authorization: bytes | None, query_tokens: Sequence[bytes]) -> bool:
        """
        :param authorization: the ``Authorization`` header, if any.
        :param query_tokens: the values of the query parameter ``token``.
        :return: whether the request may pass: no token is required, or one of
            those it presents is the token.
        """
        if self._token is None:
            return True
        presented = list(query_tokens)
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented.append(credentials.strip())
        # Compare every candidate in constant time; no early exit on a match.
        matches = [hmac.compare_digest(candidate, self._token) for candidate in presented]
        return any(matches)

    def origin_allowed(self, origin: str | None) -> bool:
        """:return: whether a handshake with this ``Origin`` header (or none) may pass."""
        if origin is None or not self.allowed_origins:
            return True
        return _origin(origin) in self.allowed_origins

    def refusal(
        self, headers: Mapping[str, str], params: Mapping[str, Sequence[str]]
    ) -> tuple[int, str] | None:
        """
        :param headers: a WebSocket handshake's headers, names in lower case
            (as Autobahn gives them).
        :param params: its query parameters, each a list of values.
        :return: ``(HTTP status, reason)`` if the handshake is to be refused, else
            ``None``. The reason never quotes the credentials presented.
        """
        if not self.origin_allowed(headers.get("origin")):
            return 403, "origin not allowed"
        authorization = headers.get("authorization")
        if not self.presents_token(
            # Autobahn decodes headers as ISO-8859-1 and the query as UTF-8.
            authorization.encode("latin-1") if authorization is not None else None,
            [value.encode("utf-8") for value in params.get("token", ())],
        ):
            return 401, "a valid token is required"
        return None


def _origin(origin: str) -> str:
    # Browsers send scheme://host[:port] in lower case; be lenient with the
    # configured ones.
    return origin.strip().rstrip("/").lower()
