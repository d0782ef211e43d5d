"""
``python -m taskoffload``: use a pool from the command line.

``python -m taskoffload call FUNCTION [--args JSON] [--pool ADDR] [--timeout S]``
runs one task and prints its progress messages and final reply as JSON lines in
wire form; it exits 0 on a result and 1 on an error.

``python -m taskoffload status [--gateway URL] [--watch [S]] [--token-file PATH]``
prints the gateway's ``/status`` as a table: gateway counters, one row per
worker, totals and error counts; ``--watch`` redraws it every ``S`` seconds
until Ctrl-C; its token is ``--token TOKEN``, else ``--token-file``'s first line,
else ``$TASKOFFLOAD_TOKEN``. It exits 0, or 2 when the gateway or the token cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

import orjson

from taskoffload import wire
from taskoffload.client import DEFAULT_POOL, ITaskPool, PoolAddress, TaskClient, TaskError

__all__ = [
    "DEFAULT_GATEWAY",
    "GatewayUnreachable",
    "build_parser",
    "fetch_status",
    "format_duration",
    "format_reply",
    "format_status",
    "main",
    "parse_task_arguments",
    "run_call",
    "run_status",
    "status_token",
]

# A fresh TaskClient numbers its calls from 1, and the command makes one call.
REQUEST_ID = 1

#: Exit status when the task's reply is an error.
EXIT_ERROR = 1

#: Exit status of ``status`` when the gateway cannot be reached or read.
EXIT_UNREACHABLE = 2

#: Exit status of ``status`` when ``--token-file`` gives no token (argparse's usage error's).
EXIT_USAGE = 2

#: Where ``status`` finds the gateway's token without ``--token`` or ``--token-file``.
TOKEN_VARIABLE: Final = "TASKOFFLOAD_TOKEN"

#: Where ``status`` looks for the gateway unless told.
DEFAULT_GATEWAY = "http://127.0.0.1:8080"

#: Seconds ``status`` waits for the gateway's answer.
STATUS_TIMEOUT = 5.0

#: Moves the cursor home and clears the terminal, before each ``--watch`` redraw.
CLEAR_SCREEN = "\x1b[H\x1b[2J"

#: How many functions the ``status`` table lists, busiest first.
TOP_FUNCTIONS = 10


def parse_task_arguments(text: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """
    Read ``--args``: a JSON object (keyword arguments) or array (positional).

    :return: the positional and keyword arguments.
    :raises argparse.ArgumentTypeError: for anything else.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if isinstance(value, dict):
        return (), value
    if isinstance(value, list):
        return tuple(value), {}
    raise argparse.ArgumentTypeError(
        "must be a JSON object (keyword arguments) or array (positional arguments)"
    )


def _pool_address(text: str) -> str:
    try:
        PoolAddress.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return seconds


def _positive_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return count


def build_parser() -> argparse.ArgumentParser:
    """
    :return: the parser for the command line; each subcommand sets ``run``:
        for ``call``, an async function of the reactor and the parsed options,
        run under the reactor; for ``status``, which needs no reactor, a plain
        function of the parsed options that returns the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m taskoffload", description="Use a taskoffload worker pool."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    call = commands.add_parser(
        "call",
        help="run one task and print its reply",
        description=(
            "Run one task and print its progress messages and final reply as JSON "
            "lines. Exits 0 on a result, 1 on an error."
        ),
    )
    call.add_argument("function", metavar="FUNCTION", help="the registered name of the task")
    call.add_argument(
        "--args",
        dest="arguments",
        metavar="JSON",
        type=parse_task_arguments,
        default=((), {}),
        help="a JSON object (keyword arguments) or array (positional arguments)",
    )
    call.add_argument(
        "--pool",
        metavar="ADDR",
        action="append",
        type=_pool_address,
        help=(
            f"a pool address, tcp:HOST:PORT or unix:PATH (default {DEFAULT_POOL}); "
            "repeat for several pools"
        ),
    )
    call.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_seconds,
        help="seconds to wait for the result (default: no limit)",
    )
    call.set_defaults(run=_call, needs_reactor=True)

    status = commands.add_parser(
        "status",
        help="show the gateway's pool, workers and counters",
        description=(
            "Print the gateway's /status as a table: gateway counters, one row per "
            "worker, totals and error counts. The token: --token, else --token-file, else "
            f"${TOKEN_VARIABLE}. Exits 0, or 2 if the gateway or the token cannot be read."
        ),
    )
    status.add_argument(
        "--gateway",
        metavar="URL",
        default=DEFAULT_GATEWAY,
        help=f"the gateway's HTTP address (default {DEFAULT_GATEWAY})",
    )
    status.add_argument(
        "--watch",
        metavar="S",
        nargs="?",
        type=_positive_seconds,
        const=1.0,
        help="redraw every S seconds (default 1) until Ctrl-C",
    )
    status.add_argument(
        "--token", metavar="TOKEN", help="the gateway's token (visible in ps: prefer --token-file)"
    )
    status.add_argument(
        "--token-file", metavar="PATH", help="a file whose first line is the gateway's token"
    )
    # For tests: stop --watch after this many redraws.
    status.add_argument("--count", type=_positive_count, help=argparse.SUPPRESS)
    status.set_defaults(run=_status, needs_reactor=False)
    return parser


def format_reply(reply: wire.Reply) -> str:
    """:return: ``reply`` as one line of the wire format, without the newline."""
    return wire.encode_reply(reply).decode("utf-8").rstrip("\n")


def _write_line(out: TextIO, reply: wire.Reply) -> None:
    out.write(format_reply(reply) + "\n")
    out.flush()


async def run_call(pool: ITaskPool, options: argparse.Namespace, out: TextIO) -> int:
    """
    Run the task ``options`` name on ``pool``, printing progress lines and the
    final reply to ``out``.

    :param options: parsed ``call`` options: ``function``, ``arguments`` and
        ``timeout``.
    :return: the exit status: 0 for a result, :data:`EXIT_ERROR` for an error.
    """
    args, kwargs = options.arguments

    def progress(value: Any) -> None:
        _write_line(out, wire.Progress(id=REQUEST_ID, progress=value))

    try:
        result = await pool.send_task(
            options.function, args, kwargs, timeout=options.timeout, on_progress=progress
        )
    except TaskError as e:
        _write_line(out, e.to_reply(REQUEST_ID))
        return EXIT_ERROR
    _write_line(out, wire.Result(id=REQUEST_ID, result=result))
    return 0


async def _call(reactor: Any, options: argparse.Namespace, out: TextIO | None = None) -> None:
    """Run ``call`` with a fresh client; raise ``SystemExit`` for a non-zero status."""
    client = TaskClient(reactor, options.pool or [DEFAULT_POOL])
    try:
        status = await run_call(client, options, out or sys.stdout)
    finally:
        await client.close()
    if status:
        raise SystemExit(status)


class GatewayUnreachable(Exception):
    """The gateway's ``/status`` could not be fetched or read; the message says why."""


def fetch_status(
    gateway: str, token: str | None = None, timeout: float = STATUS_TIMEOUT
) -> dict[str, Any]:
    """
    Fetch the gateway's ``/status`` document.

    :param gateway: the gateway's base URL, e.g. ``http://127.0.0.1:8080``.
    :param token: sent as ``Authorization: Bearer`` when given.
    :raises GatewayUnreachable: when there is no JSON object to be had.
    """
    url = gateway.rstrip("/") + "/status"
    headers = {"Accept": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        hint = " (check the token)" if e.code in (401, 403) else ""
        raise GatewayUnreachable(f"{url} answered HTTP {e.code} {e.reason}{hint}") from None
    except urllib.error.URLError as e:
        raise GatewayUnreachable(f"cannot reach {url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets; ValueError: a malformed URL
        raise GatewayUnreachable(f"cannot reach {url}: {e}") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise GatewayUnreachable(f"{url} did not answer with JSON") from None
    if not isinstance(document, dict):
        raise GatewayUnreachable(f"{url} did not answer with a status document")
    return document


class TokenUnavailable(Exception):
    """``--token-file`` gives no token; the message says why."""


def status_token(options: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """
    :return: the token ``status`` sends: ``--token``, else the first line of
        ``--token-file`` (stripped, blank lines before it skipped), else
        :data:`TOKEN_VARIABLE` from ``environ`` unless empty, else ``None``.
    :raises TokenUnavailable: if the file cannot be read or holds no token.
    """
    if options.token is not None:
        return str(options.token)
    path = options.token_file
    if path is None:
        return environ.get(TOKEN_VARIABLE, "").strip() or None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise TokenUnavailable(f"--token-file {path!r}: cannot read it: {reason}") from None
    if not lines:
        raise TokenUnavailable(f"--token-file {path!r} is empty: put the gateway's token in it")
    return lines[0].strip()


def format_duration(seconds: float | None) -> str:
    """
    :return: ``seconds`` the way a person reads an uptime: ``35s``, ``4m05s``,
        ``1h02m``, ``3d04h``; ``-`` for ``None``.
    """
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _memory(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:.1f} MiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    """Lay out ``rows`` under ``headers``; columns in ``right`` (numbers) align right."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = (
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return [line(row) for row in [headers, *rows]]


def _counts(title: str, counts: Mapping[str, int]) -> list[str]:
    """A titled list of ``name  count`` lines, largest count first."""
    if not counts:
        return [f"{title}: none"]
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    width = max(len(name) for name, _ in ordered)
    digits = max(len(str(count)) for _, count in ordered)
    return [f"{title}:"] + [
        f"  {name.ljust(width)}  {str(count).rjust(digits)}" for name, count in ordered
    ]


def _sum_or_dash(values: Sequence[Any]) -> Any:
    """The sum of ``values``, or ``None`` when any is unknown (so the total shows ``-``)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values)


def _gateway_line(gateway: Mapping[str, Any]) -> str:
    latency = gateway.get("latency") or {}
    return (
        f"Gateway  clients {_cell(gateway.get('clients'))}"
        f"   in flight {_cell(gateway.get('inflight'))}"
        f"   requests {_cell(gateway.get('requests'))}"
        f"   latency p50 {_milliseconds(latency.get('p50_ms'))}"
        f"  p99 {_milliseconds(latency.get('p99_ms'))}"
    )


def _pool_line(pool: Mapping[str, Any] | None) -> str:
    if pool is None:
        return "Pool     unknown"
    if "workers" not in pool:
        addresses = ", ".join(pool.get("addresses") or []) or "none"
        return f"Pool     remote: {addresses}"
    reloading = "   (reloading)" if pool.get("reloading") else ""
    return (
        f"Pool     serving {_cell(pool.get('serving'))}/{_cell(pool.get('count'))}"
        f"   alive {_cell(pool.get('alive'))}"
        f"   restarts {_cell(pool.get('restarts'))}"
        f"   recycled {_cell(pool.get('recycled'))}"
        f"   reloads {_cell(pool.get('reloads'))}"
        f"   killed past deadline {_cell(pool.get('killed_past_deadline'))}"
        f"{reloading}"
    )


def _worker_table(workers: Sequence[Mapping[str, Any]]) -> list[str]:
    headers = ["worker", "pid", "state", "uptime", "restarts", "recycled", "tasks done", "memory"]
    rows = [
        [
            _cell(w.get("index")),
            _cell(w.get("pid")),
            _cell(w.get("state")),
            format_duration(w.get("uptime")),
            _cell(w.get("restarts")),
            _cell(w.get("recycled")),
            _cell(w.get("tasks_done")),
            _memory(w.get("rss_mib")),
        ]
        for w in workers
    ]
    serving = sum(1 for w in workers if w.get("state") == "serving")
    rows.append(
        [
            "total",
            f"{sum(1 for w in workers if w.get('pid') is not None)} up",
            f"{serving} serving",
            "",
            _cell(_sum_or_dash([w.get("restarts") for w in workers])),
            _cell(_sum_or_dash([w.get("recycled") for w in workers])),
            _cell(_sum_or_dash([w.get("tasks_done") for w in workers])),
            _memory(_sum_or_dash([w.get("rss_mib") for w in workers])),
        ]
    )
    return _table(headers, rows, right={1, 4, 5, 6, 7})


def format_status(document: Mapping[str, Any], source: str = "") -> str:
    """
    Render a ``/status`` document as the ``status`` command's table.

    :param document: the gateway's ``/status`` JSON: ``gateway`` counters and
        ``pool``, either a local pool's summary with its ``workers`` or, for a
        gateway in front of remote pools, their ``addresses``.
    :param source: where the document came from, for the title line.
    :return: the text, ending in a newline.
    """
    gateway = document.get("gateway") or {}
    pool = document.get("pool")
    lines = [f"taskoffload status{f' - {source}' if source else ''}", ""]
    lines += [_gateway_line(gateway), _pool_line(pool)]
    lanes = (pool or {}).get("lanes") or {}
    if len(lanes) > 1:
        waiting = gateway.get("lanes") or {}
        lines.append(
            "Lanes    "
            + "   ".join(
                f"{name} {_cell(lane.get('serving'))}/{_cell(lane.get('count'))}"
                + (f" ({waiting[name].get('waiting', 0)} waiting)" if name in waiting else "")
                for name, lane in lanes.items()
            )
        )
    workers = pool.get("workers") if pool is not None else None
    if workers:
        lines += ["", *_worker_table(workers)]
    by_outcome = gateway.get("by_outcome") or {}
    errors = {name: n for name, n in by_outcome.items() if name != "ok"}
    by_function = gateway.get("by_function") or {}
    busiest = dict(
        sorted(by_function.items(), key=lambda item: (-item[1], item[0]))[:TOP_FUNCTIONS]
    )
    lines += ["", *_counts("Errors by outcome", errors)]
    lines += ["", *_counts(f"Requests by function (top {TOP_FUNCTIONS})", busiest)]
    return "\n".join(lines) + "\n"


def run_status(
    options: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    fetch: Callable[[str, str | None], dict[str, Any]],
    sleep: Callable[[float], object],
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Print the gateway's status once, or with ``--watch`` redraw it until
    ``--count`` redraws are done (without ``--count``, until Ctrl-C).

    :param options: parsed ``status`` options: ``gateway``, ``token``,
        ``token_file``, ``watch`` and ``count``.
    :param fetch: called with the gateway URL and token (:func:`status_token`);
        returns the ``/status`` document or raises :class:`GatewayUnreachable`.
    :param sleep: waits the given seconds between redraws.
    :param environ: the environment :data:`TOKEN_VARIABLE` is read from; by
        default none (the command passes ``os.environ``).
    :return: the exit status: 0, :data:`EXIT_UNREACHABLE`, or :data:`EXIT_USAGE`.
    """
    try:
        token = status_token(options, environ or {})
    except TokenUnavailable as e:
        err.write(f"taskoffload status: {e}\n")
        err.flush()
        return EXIT_USAGE
    drawn = 0
    while True:
        try:
            document = fetch(options.gateway, token)
        except GatewayUnreachable as e:
            err.write(f"taskoffload status: {e}\n")
            err.flush()
            return EXIT_UNREACHABLE
        text = format_status(document, options.gateway)
        if options.watch is not None:
            text = CLEAR_SCREEN + text + f"\nEvery {options.watch:g} s; Ctrl-C to stop.\n"
        out.write(text)
        out.flush()
        drawn += 1
        if options.watch is None or (options.count is not None and drawn >= options.count):
            return 0
        sleep(options.watch)


def _status(options: argparse.Namespace) -> int:
    """Run ``status`` against the network; Ctrl-C ends a watch with status 0."""
    try:
        # Blocking fetch and sleep: the command does nothing else meanwhile, so it
        # needs no reactor, and Ctrl-C interrupts it at once.
        return run_status(options, sys.stdout, sys.stderr, fetch_status, time.sleep, os.environ)
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> None:
    """
    Parse ``argv`` (default ``sys.argv[1:]``), run the command (under the global
    reactor if it needs one), and exit with its status.
    """
    options = build_parser().parse_args(argv)
    if not options.needs_reactor:
        raise SystemExit(options.run(options))

    from twisted.internet.task import react

    react(options.run, (options,))


if __name__ == "__main__":
    main()
