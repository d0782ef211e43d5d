"""
``python -m taskoffload``: use a pool from the command line.

``python -m taskoffload call FUNCTION [--args JSON] [--pool ADDR] [--timeout S]``
runs one task and prints its progress messages and final reply as JSON lines in
wire form; it exits 0 on a result and 1 on an error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from taskoffload import wire
from taskoffload.client import DEFAULT_POOL, ITaskPool, PoolAddress, TaskClient, TaskError

__all__ = ["build_parser", "format_reply", "main", "parse_task_arguments", "run_call"]

# A fresh TaskClient numbers its calls from 1, and the command makes one call.
REQUEST_ID = 1

#: Exit status when the task's reply is an error.
EXIT_ERROR = 1


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


def build_parser() -> argparse.ArgumentParser:
    """
    :return: the parser for the command line; each subcommand sets ``run``, an
        async function of the reactor and the parsed options.
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
    call.set_defaults(run=_call)
    return parser


def format_reply(reply: wire.Reply) -> str:
    """
    :return: ``reply`` as one line of the wire format, without the newline.
    """
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


def main(argv: Sequence[str] | None = None) -> None:
    """
    Parse ``argv`` (default ``sys.argv[1:]``), run the command under the global
    reactor, and exit with its status.
    """
    from twisted.internet.task import react

    options = build_parser().parse_args(argv)
    react(options.run, (options,))


if __name__ == "__main__":
    main()
