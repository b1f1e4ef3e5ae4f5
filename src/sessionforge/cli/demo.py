"""``sessionforge demo``: run the bank-transfer workload, judge the invariant, print it.

The workload itself (``workload.py``) moves money between K accounts that start with
1,000 each. Afterwards three things must hold, and each catches a different failure:

* the total balance is still K * 1,000 (a lost update changes it);
* the number of transfers the workers saw commit equals the rows in the log (a
  transfer that was reported committed but is not in the database, or the reverse);
* every account's balance equals 1,000 minus what the log says it sent plus what it
  received (lost updates that happen to cancel out in the total).

The same workload runs either through a ``SessionFactory`` with its presets, or
(``plain=True``) through bare ``async_sessionmaker(create_async_engine(url))``, to show
what the presets buy. Here: validating the settings, opening either mode, ``run_demo``
(which returns a ``DemoResult``, the verdict in ``problems()``), and the command:
``run_demo_command`` with its progress line and report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TextIO

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from sessionforge._internal.core import FactoryStatus
from sessionforge._internal.engines import engine_status
from sessionforge.config import FactoryConfig, mask_url
from sessionforge.dialects.mysql import is_mysql
from sessionforge.errors import ConfigurationError
from sessionforge.factory import SessionFactory

from .check import figure, refuse_unopenable_sqlite
from .exits import EXIT_FAILED, EXIT_OK
from .workload import (
    DemoProgress,
    DemoSettings,
    ProgressCallback,
    Target,
    build_models,
    final_state,
    run_workers,
    setup,
)

__all__ = [
    "DEFAULT_DEMO_URL",
    "DemoResult",
    "ProgressLine",
    "demo_url",
    "format_demo",
    "format_demo_header",
    "run_demo",
    "run_demo_command",
    "settings_from",
    "validate_settings",
]

#: The demo's own embedded database: a SQLite file in the working directory.
DEFAULT_DEMO_URL: Final = "sqlite+sessionforge:///sessionforge-demo.db"
_SHOWN_ERROR_KINDS: Final = 5
# Re-runs of a conflicting transfer: the demo's few accounts make conflicts the rule
# where they are errors (MariaDB's 1020), and backoff caps each wait at 2 s.
_RETRIES: Final = 20

Mode = Literal["sessionforge", "plain"]


# the result and its invariant --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoResult:
    """The outcome of one demo run; ``invariant_holds`` is the verdict."""

    mode: Mode
    url: str
    dialect: str
    driver: str
    workers: int
    accounts: int
    attempted: int
    committed: int
    failed: int
    logged: int
    expected_total: int
    final_total: int
    mismatched_accounts: int
    elapsed: float
    pool: FactoryStatus
    peak_checked_out: int
    errors: Mapping[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Committed transfers per second over the whole run."""
        return self.committed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def invariant_holds(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """What is wrong with the final state, one sentence each; empty when all is well."""
        found: list[str] = []
        if self.final_total != self.expected_total:
            found.append(
                f"total balance is {self.final_total}, expected {self.expected_total} "
                f"(off by {self.final_total - self.expected_total:+d}): updates were lost"
            )
        if self.committed != self.logged:
            found.append(f"{self.committed} transfers committed but {self.logged} are in the log")
        if self.mismatched_accounts:
            found.append(
                f"{self.mismatched_accounts} of {self.accounts} account balances disagree "
                "with the transfer log: updates were lost"
            )
        return found


# settings and the run ----------------------------------------------------------------


def demo_url(settings: DemoSettings) -> URL:
    """The URL the demo runs on, normalised by sessionforge (``ConfigurationError`` if bad).

    Both modes use the normalised URL, so ``postgresql://`` means asyncpg for the plain
    run too: the contrast is about presets, not about which driver was picked.
    """
    return FactoryConfig.from_url(settings.url or DEFAULT_DEMO_URL).async_url


def validate_settings(settings: DemoSettings) -> URL:
    """Return the URL the demo runs on; ``ConfigurationError`` for settings it cannot use.

    Touches no database, so a caller can validate before it prints anything.
    """
    if settings.workers < 1:
        raise ConfigurationError(f"workers must be at least 1, got {settings.workers}")
    if settings.transfers < 0:
        raise ConfigurationError(f"transfers must be at least 0, got {settings.transfers}")
    if settings.accounts < 2:
        raise ConfigurationError(
            f"accounts must be at least 2 (a transfer needs two), got {settings.accounts}"
        )
    if not settings.table_prefix.isidentifier():
        raise ConfigurationError(
            f"table prefix {settings.table_prefix!r} must be letters, digits and underscores"
        )
    if settings.progress_interval <= 0:
        raise ConfigurationError("progress_interval must be a positive number of seconds")
    return demo_url(settings)


def _remove_default_file(url: URL, settings: DemoSettings) -> None:
    """Start the embedded demo database from nothing, so every run is alike.

    Only the demo's own default file is removed; a ``--url`` database keeps everything
    but the demo's tables. (A fresh file matters for the contrast: a file left in WAL
    mode by a sessionforge run would change how the plain run fails.)
    """
    if settings.url is not None or url.database is None:
        return
    base = Path(url.database)
    for suffix in ("", "-wal", "-shm", "-journal"):
        base.with_name(base.name + suffix).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _open(url: URL, plain: bool) -> AsyncIterator[Target]:
    """Yield the chosen mode's ``Target``; dispose its engine at exit.

    On MariaDB/MySQL the rows are read without FOR UPDATE (``workload.transfer``).
    """
    lock_rows = not is_mysql(url)
    if plain:
        engine = create_async_engine(url)
        begin = async_sessionmaker(engine).begin

        async def run(body: Callable[[AsyncSession], Awaitable[None]]) -> None:
            async with begin() as session:
                await body(session)

        try:
            yield Target(run, engine, lambda: _plain_status(engine), lock_rows)
        finally:
            await engine.dispose()
    else:
        db = SessionFactory(url)

        async def run_transaction(body: Callable[[AsyncSession], Awaitable[None]]) -> None:
            await db.run_transaction(body, retries=_RETRIES)

        try:
            yield Target(run_transaction, db.engine, db.status, lock_rows)
        finally:
            await db.dispose()


def _plain_status(engine: AsyncEngine) -> FactoryStatus:
    """The figures ``db.status()`` gives, for an engine sessionforge did not build."""
    status = engine_status("async", engine.sync_engine)
    return FactoryStatus(checked_out=status.checked_out, engines=(status,))


async def run_demo(settings: DemoSettings, progress: ProgressCallback | None = None) -> DemoResult:
    """Set up the tables, run the workload, verify it and return the result.

    Raises ``ConfigurationError`` for a bad URL or settings and
    ``DatabaseUnavailableError`` when the database cannot be reached at setup; errors
    during the workload are counted in the result, never raised.
    """
    url = validate_settings(settings)
    _remove_default_file(url, settings)
    models = build_models(settings.table_prefix)
    mode: Mode = "plain" if settings.plain else "sessionforge"
    async with _open(url, settings.plain) as target:
        await setup(target.engine, models, settings)
        counters, elapsed = await run_workers(target, models, settings, progress)
        state = await final_state(target.engine, models)
        pool = target.status()
    return DemoResult(
        mode=mode,
        url=mask_url(url),
        dialect=url.get_backend_name(),
        driver=url.get_driver_name(),
        workers=settings.workers,
        accounts=settings.accounts,
        attempted=settings.total_transfers,
        committed=counters.committed,
        failed=counters.failed,
        logged=state.logged,
        expected_total=settings.expected_total,
        final_total=state.total,
        mismatched_accounts=state.mismatched,
        elapsed=elapsed,
        pool=pool,
        peak_checked_out=counters.peak_checked_out,
        errors=dict(counters.errors.most_common()),
    )


# the command -------------------------------------------------------------------------


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
        *_format_retries(result.pool.transactions_retried),
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
        if result.mode == "plain" and result.dialect == "mysql":
            lines.append(
                "(no update was lost this time; bare SQLAlchemy at REPEATABLE READ can "
                "lose them: try fewer --accounts or more --workers)"
            )
        elif result.mode == "plain":
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
        f"pool:        {engine.pool} size={figure(engine.size)} "
        f"checked_in={figure(engine.checked_in)} checked_out={engine.checked_out} "
        f"overflow={figure(engine.overflow)}; peak checked out during the run: {peak}"
        for engine in status.engines
    ]


def _format_retries(retried: int) -> list[str]:
    if not retried:
        return []
    return [f"retried:     {retried} conflicting transactions re-run by run_transaction"]


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
