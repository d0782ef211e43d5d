"""
The values of ``twistd taskoffload``'s options: reading and checking them
(numbers, ``--lane``, endpoints, the secret and token files) for
:class:`~taskoffload.tap.Options`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.python import usage

from taskoffload.agent import check_agent_listen
from taskoffload.lanes import Lane, lane_listen
from taskoffload.targets import parse_lane_address

__all__ = [
    "check_access",
    "check_gateway_processes",
    "check_lanes",
    "check_on_loopback",
    "check_pool_addresses",
    "default_count",
    "is_loopback_endpoint",
    "read_secret",
    "read_token",
]


def default_count() -> int:
    """Four workers per CPU: tasks that wait on I/O leave the CPU to others."""
    return 4 * (os.cpu_count() or 1)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError("must be 0 or more")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be above 0")
    return number


def _whole_seconds(value: str) -> float:
    # Autobahn's pings run on txaio's batched timers, which count in whole
    # seconds: a fractional interval would drop peers that do answer.
    number = float(value)
    if not (number >= 1 and number.is_integer()):
        raise ValueError("must be a whole number of seconds, at least 1")
    return number


def check_lanes(lanes: list[Lane], role: str, count: int, listen: str) -> None:
    """
    Check ``--lane``: only for a pool, each name once, at least one worker left
    for the default lane, and an endpoint for each lane.

    :param listen: where the pool's own workers listen.
    :raises usage.UsageError: saying what is wrong.
    """
    if not lanes:
        return
    if role == "gateway":
        raise usage.UsageError(
            "--lane is for a pool (--role=worker or all); a gateway learns the "
            "pool's lanes when it connects, or from --pool LANE=ADDRESS"
        )
    names = [lane.name for lane in lanes]
    if len(set(names)) != len(names):
        raise usage.UsageError(f"--lane: each lane is given once, not {names}")
    reserved = sum(lane.count for lane in lanes)
    if reserved >= count:
        raise usage.UsageError(
            f"--lane reserves {reserved} of the {count} workers (--count): the "
            "default lane needs at least one; raise --count or lower a lane's count"
        )
    for lane in lanes:
        if lane.listen:
            if lane.listen.split(":", 1)[0] not in ("tcp", "tcp6", "unix"):
                raise usage.UsageError(
                    f"--lane {lane.name}: workers listen on a tcp:, tcp6: or unix: endpoint, "
                    f"not {lane.listen!r}"
                )
            continue
        try:
            lane_listen(listen, lane.name)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def check_gateway_processes(count: int, role: str, listen: str) -> None:
    """
    Check ``--gateway-processes``: for a gateway, and above 1 only on a ``tcp:``,
    ``tcp6:`` or ``unix:`` port (the processes share the socket; TLS would need
    each to hold the keys and wrap it: terminate TLS in front instead).

    :raises usage.UsageError: saying what is wrong.
    """
    if count == 1:
        return
    if role == "worker":
        raise usage.UsageError("--gateway-processes is for a gateway (--role=gateway or all)")
    if listen.split(":", 1)[0] not in ("tcp", "tcp6", "unix"):
        raise usage.UsageError(
            f"--gateway-processes {count} serves a tcp:, tcp6: or unix: --listen, not "
            f"{listen!r}: terminate TLS in front of the gateway (HAProxy, docs/operations.rst), "
            "or run one process"
        )


def check_access(options: Mapping[str, Any]) -> None:
    """
    Check ``--agent-listen``, ``--status-listen``, ``--token-file`` and
    ``--allowed-origin`` for the role.

    :param options: the parsed options.
    :raises usage.UsageError: saying what is wrong.
    """
    role, status_listen = options["role"], options["status-listen"]
    check_agent_listen(role, options["agent-listen"])
    if status_listen is not None:
        if role != "worker":
            raise usage.UsageError(
                "--status-listen is for --role=worker; the gateway serves /status and "
                "/metrics on its own --listen"
            )
        if status_listen.split(":", 1)[0] not in ("tcp", "tcp6", "unix", "ssl"):
            raise usage.UsageError(
                f"--status-listen {status_listen!r}: expected an endpoint such as "
                "tcp:9090:interface=127.0.0.1"
            )
    if role == "worker" and (
        options["allowed-origin"] or (options["token-file"] and status_listen is None)
    ):
        raise usage.UsageError(
            "--token-file and --allowed-origin are for the gateway (--role=gateway or "
            "all); a pool takes --token-file only with --status-listen"
        )


def check_pool_addresses(addresses: list[str]) -> None:
    """
    Check a gateway's ``--pool`` addresses: each readable, and at least one a
    pool's own (naming no lane), which tells of the pool's lanes.

    :raises usage.UsageError: saying what is wrong.
    """
    plain = 0
    for address in addresses:
        try:
            lane, _ = parse_lane_address(address)
        except ValueError as e:
            raise usage.UsageError(f"--pool {address!r}: {e}") from None
        plain += lane is None
    if not plain:
        raise usage.UsageError(
            "--pool: give at least one pool's own address (naming no lane), "
            "e.g. --pool tcp:127.0.0.1:12345; LANE=ADDRESS only adds where a lane listens"
        )


def check_on_loopback(endpoints: list[tuple[str, str]]) -> None:
    """
    :param endpoints: the option and endpoint of each worker socket.
    :raises usage.UsageError: for the first one reachable beyond this machine.
    """
    for option, endpoint in endpoints:
        if not is_loopback_endpoint(endpoint):
            raise usage.UsageError(
                f"{option} {endpoint!r} is reachable beyond this machine, and a worker "
                "port runs any registered task for anyone who reaches it: give --secret-file "
                "(an HMAC challenge guards each connection), or --insecure if a firewall "
                "does, or listen on loopback (interface=127.0.0.1)"
            )


def _module_exists(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or ""
        return False


def is_loopback_endpoint(description: str) -> bool:
    """
    :return: whether a ``tcp:``/``tcp6:``/``unix:`` server endpoint string listens
        on this machine only (``unix:``, or an ``interface`` on loopback).
    """
    import ipaddress
    import re

    kind, _, rest = description.partition(":")
    if kind == "unix":
        return True
    interface = ""
    # Endpoint strings escape the colons of IPv6 addresses with backslashes.
    for part in re.split(r"(?<!\\):", rest):
        if part.startswith("interface="):
            interface = part[len("interface=") :].replace("\\:", ":").strip("[]")
    if interface in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name we cannot judge


def read_secret(path: str) -> bytes:
    """
    :return: the shared secret in the file at ``path``, without surrounding whitespace.
    :raise usage.UsageError: if it cannot be read or is shorter than 16 bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise usage.UsageError(f"--secret-file {path!r}: cannot read it: {e}") from None
    if len(secret) < 16:
        raise usage.UsageError(
            f"--secret-file {path!r} holds {len(secret)} bytes; use at least 16, e.g. "
            f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}"
        )
    return secret


def read_token(path: str) -> str:
    """
    :return: the token in the file at ``path``, without surrounding whitespace.
    :raise usage.UsageError: if it cannot be read or holds no token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"--token-file {path!r}: cannot read it: {e}") from None
    if not token:
        raise usage.UsageError(
            f"--token-file {path!r} is empty: put the token in it, e.g. with "
            f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}"
        )
    if any(c.isspace() for c in token):
        raise usage.UsageError(
            f"--token-file {path!r}: the token is one word; it holds whitespace inside"
        )
    return token
