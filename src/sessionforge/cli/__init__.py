"""The ``sessionforge`` command: ``check`` a database URL, run the concurrency ``demo``.

Exit codes: 0 success; 1 the database is unavailable, refused the connection, or an
unexpected error (or the demo's invariant broke without ``--plain``); 2 a configuration
error (bad URL, unknown or missing driver, sync driver, bad option); 3 (``check``) the
SQLite file does not exist yet, and was not created. Errors are one line on stderr,
``sessionforge <command>: <reason>``, with any password masked, and never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from sessionforge import dialects
from sessionforge._internal.core import FactoryStatus
from sessionforge._internal.diagnosis import sqlite_cannot_open, sqlite_path, sqlite_unopenable
from sessionforge._internal.engines import EngineStatus, engine_status
from sessionforge.config import DEFAULT_URL, FactoryConfig, mask_url
from sessionforge.errors import ConfigurationError, DatabaseUnavailableError, SessionForgeError
from sessionforge.factory import SessionFactory

from .demo import (
    DEFAULT_DEMO_URL,
    DemoProgress,
    DemoResult,
    DemoSettings,
    run_demo,
    validate_settings,
)

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_UNAVAILABLE: Final = 1
EXIT_FAILED: Final = 1
EXIT_CONFIGURATION: Final = 2
EXIT_NOT_CREATED: Final = 3
EXIT_INTERRUPTED: Final = 130
_SHOWN_ERROR_KINDS: Final = 5

Handler = Callable[[argparse.Namespace], int]


# check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Everything ``sessionforge check`` prints about a reachable database."""

    url: str
    source: str
    dialect: str
    driver: str
    server_version: str
    presets: dict[str, Any]
    pool: EngineStatus
    ping_seconds: float


def resolve_config(url: str | None) -> tuple[FactoryConfig, str]:
    """Return the config for ``url`` (else DATABASE_URL, else the default) and its source."""
    if url is not None:
        return FactoryConfig.from_url(url), "command line"
    source = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded default"
    return FactoryConfig.from_env(), source


async def gather_check(config: FactoryConfig, source: str, timeout: float) -> CheckReport:
    """Build a factory, ping it and describe what it connected to; always dispose it.

    Raises ``ConfigurationError`` or ``DatabaseUnavailableError``.
    """
    async with SessionFactory(config) as db:
        seconds = await db.ping(timeout=timeout)
        engine = db.engine
        return CheckReport(
            url=mask_url(db.url),
            source=source,
            dialect=engine.dialect.name,
            driver=engine.dialect.driver,
            server_version=_server_version(engine),
            presets=dialects.describe_presets(db.config, db.url),
            pool=engine_status("async", engine.sync_engine),
            ping_seconds=seconds,
        )


def _server_version(engine: AsyncEngine) -> str:
    """The server's version as the dialect read it on first connect (after a ping)."""
    info = engine.dialect.server_version_info
    return ".".join(str(part) for part in info) if info else "unknown"


def format_check(report: CheckReport) -> list[str]:
    """The lines ``sessionforge check`` prints for a reachable database."""
    pool = report.pool
    presets = ", ".join(f"{name}={value}" for name, value in report.presets.items())
    return [
        f"url:      {report.url} ({report.source})",
        f"dialect:  {report.dialect}",
        f"driver:   {report.driver}",
        f"server:   {report.dialect} {report.server_version}",
        f"presets:  {presets or 'none'}",
        f"pool:     {pool.pool} size={_figure(pool.size)} "
        f"max_overflow={_figure(pool.max_overflow)} timeout={_figure(pool.timeout)}s",
        f"ping:     {report.ping_seconds * 1000:.1f} ms",
        "ok",
    ]


def _figure(value: object) -> str:
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def refuse_unopenable_sqlite(url: URL) -> None:
    """Raise ``DatabaseUnavailableError`` when the path shows SQLite cannot open the file.

    Checked before connecting because aiosqlite (0.22) leaves the thread of a failed
    connect running, to post its result into an event loop that may be closed by then
    ("Event loop is closed" printed from a thread as the command exits).
    """
    if sqlite_unopenable(url) is not None:
        raise DatabaseUnavailableError(sqlite_cannot_open(url))


def run_check(args: argparse.Namespace) -> int:
    """``sessionforge check [URL]``: print what the URL connects to, or why it does not.

    A SQLite file that does not exist is reported, not created (exit 3).
    """
    config, source = resolve_config(args.url)
    url = config.async_url
    refuse_unopenable_sqlite(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return _fail(
            "check",
            f"the SQLite database {mask_url(url)} ({source}) does not exist yet: "
            f"{path.absolute()} will be created on first use; check created nothing",
            EXIT_NOT_CREATED,
        )
    report = asyncio.run(gather_check(config, source, args.timeout))
    for line in format_check(report):
        print(line)
    return EXIT_OK


# demo --------------------------------------------------------------------------------


class ProgressLine:
    """Renders demo progress: one line rewritten in place on a TTY, else a line each time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._width = 0

    def __call__(self, progress: DemoProgress) -> None:
        text = (
            f"{progress.done}/{progress.total} transfers, {progress.failed} failed, "
            f"{progress.rate:,.0f} tx/s, {progress.elapsed:.1f} s"
        )
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(f"  {text}\n")
        self._stream.flush()

    def finish(self) -> None:
        """End the in-place line, so what follows starts on a line of its own."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def settings_from(args: argparse.Namespace) -> DemoSettings:
    """The demo settings the command-line options ask for."""
    return DemoSettings(
        url=args.url,
        workers=args.workers,
        transfers=args.transfers,
        accounts=args.accounts,
        table_prefix=args.table_prefix,
        plain=args.plain,
        seed=args.seed,
    )


def format_demo_header(settings: DemoSettings, url: URL) -> str:
    """The line printed before the workload starts, ``url`` being where it runs."""
    how = (
        "bare SQLAlchemy async_sessionmaker, no sessionforge presets"
        if settings.plain
        else "sessionforge SessionFactory"
    )
    # A URL object, so that only a password is masked, never a user name.
    return (
        f"demo: {settings.workers} workers x {settings.transfers} transfers between "
        f"{settings.accounts} accounts on {mask_url(url)} ({how})"
    )


def format_demo(result: DemoResult) -> list[str]:
    """The lines of the demo's report, verdict last."""
    reconciled = result.accounts - result.mismatched_accounts
    lines = [
        f"url:         {result.url}",
        f"committed:   {result.committed} of {result.attempted} transfers "
        f"({result.failed} failed)",
        f"log rows:    {result.logged}",
        f"total:       {result.final_total} (expected {result.expected_total} = "
        f"{result.accounts} x 1000)",
        f"reconciled:  {reconciled} of {result.accounts} accounts match the transfer log",
        f"elapsed:     {result.elapsed:.2f} s",
        f"throughput:  {result.throughput:,.0f} transfers/s",
        *_format_pool(result.pool, result.peak_checked_out),
        *_format_errors(result.errors),
    ]
    if result.invariant_holds:
        lines.append(
            f"INVARIANT HOLDS: total {result.final_total} == {result.expected_total}, "
            f"{result.committed} committed == {result.logged} logged, every account reconciles"
        )
        if result.mode == "plain":
            lines.append(
                "(the workload locks both rows with SELECT ... FOR UPDATE, which is enough "
                f"on {result.dialect} without sessionforge's presets)"
            )
    else:
        lines.append("INVARIANT BROKEN:")
        lines.extend(f"  - {problem}" for problem in result.problems())
        if result.mode == "plain":
            lines.append(
                "(expected with --plain: this is what bare SQLAlchemy does to the workload "
                "and sessionforge's presets prevent; exit code 0, since showing it is the point)"
            )
    return lines


def _format_pool(status: FactoryStatus, peak: int) -> list[str]:
    return [
        f"pool:        {engine.pool} size={_figure(engine.size)} "
        f"checked_in={_figure(engine.checked_in)} checked_out={engine.checked_out} "
        f"overflow={_figure(engine.overflow)}; peak checked out during the run: {peak}"
        for engine in status.engines
    ]


def _format_errors(errors: Mapping[str, int]) -> list[str]:
    if not errors:
        return []
    kinds = list(errors.items())
    lines = ["errors:"]
    lines.extend(f"  {count} x {kind}" for kind, count in kinds[:_SHOWN_ERROR_KINDS])
    if len(kinds) > _SHOWN_ERROR_KINDS:
        lines.append(f"  ... and {len(kinds) - _SHOWN_ERROR_KINDS} more kinds")
    return lines


def run_demo_command(args: argparse.Namespace) -> int:
    """``sessionforge demo``: run the workload, print the report, exit on the invariant."""
    settings = settings_from(args)
    url = validate_settings(settings)  # before any output: a bad option prints nothing else
    refuse_unopenable_sqlite(url)
    print(format_demo_header(settings, url))
    progress = ProgressLine(sys.stderr)
    try:
        result = asyncio.run(run_demo(settings, progress))
    finally:
        progress.finish()
    for line in format_demo(result):
        print(line)
    if settings.plain or result.invariant_holds:
        return EXIT_OK
    return EXIT_FAILED


# arguments and errors ----------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``sessionforge`` argument parser, with one sub-command per command."""
    parser = argparse.ArgumentParser(
        prog="sessionforge", description="Check a database URL, or run the concurrency demo."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check(commands)
    _add_demo(commands)
    return parser


def _add_check(commands: Any) -> None:
    check = commands.add_parser(
        "check",
        help="connect to a database and show what sessionforge makes of it",
        description="Connect, ping and describe a database. URL defaults to the "
        f"DATABASE_URL environment variable, else {DEFAULT_URL}. A SQLite file that "
        "does not exist is reported, not created.",
        epilog="exit codes: 0 the database answered; 1 it is unreachable or refused the "
        "connection (the message says why), or an unexpected error; 2 a configuration "
        "error (URL, driver, option); 3 the SQLite file does not exist yet (it will be "
        "created on first use; check created nothing)",
    )
    check.add_argument("url", nargs="?", metavar="URL", help="database URL")
    check.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up on the ping after this long (default: 10)",
    )
    check.set_defaults(handler=run_check)


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run concurrent bank transfers and verify nothing was lost",
        description="Run N workers x M transfers between K accounts and verify the total "
        f"balance and the transfer log. Runs on --url, else on {DEFAULT_DEMO_URL} "
        "(recreated each run) in the working directory.",
        epilog="exit codes: 0 the invariant holds, or --plain ran (whatever its outcome); "
        "1 the invariant broke, or the database is unavailable; 2 a bad option or URL "
        "(reported before anything runs)",
    )
    demo.add_argument("--url", help="database URL (default: the embedded demo file)")
    demo.add_argument("--workers", type=int, default=10, help="concurrent workers (10)")
    demo.add_argument("--transfers", type=int, default=200, help="transfers per worker (200)")
    demo.add_argument("--accounts", type=int, default=20, help="accounts (20)")
    demo.add_argument(
        "--table-prefix", default="sf_demo", help="prefix of the demo's tables (sf_demo)"
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    demo.add_argument(
        "--plain",
        action="store_true",
        help="run the same workload through bare SQLAlchemy, without sessionforge: it "
        "may end in INVARIANT BROKEN (lost updates, or failed transfers), which is what it "
        "demonstrates, so it exits 0 either way",
    )
    demo.set_defaults(handler=run_demo_command)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (sessionforge messages never hold a password)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _fail(command: str, message: str, code: int) -> int:
    print(f"sessionforge {command}: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sessionforge`` command with ``argv`` (default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIGURATION
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigurationError as exc:
        return _fail(args.command, _one_line(exc), EXIT_CONFIGURATION)
    except DatabaseUnavailableError as exc:
        return _fail(args.command, _one_line(exc), EXIT_UNAVAILABLE)
    except SessionForgeError as exc:  # no other is expected here; still one line
        return _fail(args.command, _one_line(exc), EXIT_FAILED)
    except (SQLAlchemyError, OSError) as exc:
        # Not expected (ping and setup map these to DatabaseUnavailableError); the driver's
        # text is still shown without any password the URL held.
        return _fail(args.command, _scrubbed(exc, args), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours or a driver's: still one line, no password
        return _fail(args.command, f"unexpected error: {_scrubbed(exc, args)}", EXIT_FAILED)


def _scrubbed(exc: BaseException, args: argparse.Namespace) -> str:
    """The driver's error on one line, with the password of the user's URL as ***."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = f"{type(original).__name__}: {_one_line(original)}"
    for password in _passwords(args.url or os.environ.get("DATABASE_URL") or ""):
        text = text.replace(password, "***")
    return text


def _passwords(raw: str) -> set[str]:
    """Every spelling of the password in ``raw``, parsed or not (it may not parse)."""
    found = set()
    with contextlib.suppress(ArgumentError, ValueError):
        found.add(make_url(raw).password)
    # As mask_url does for a string: the user info runs up to the authority's last "@".
    user_info = raw.partition("://")[2].rpartition("@")[0]
    found.update({user_info.partition(":")[2], unquote(user_info.partition(":")[2])})
    return {str(password) for password in found if password}
