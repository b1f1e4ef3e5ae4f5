"""The ``sessionforge demo`` workload: concurrent bank transfers with an invariant.

K accounts start with 1,000 each; N asyncio workers each make M transfers of a random
amount between two random accounts, every transfer one transaction that reads both
balances, writes both, and inserts one row into a transfer log. Afterwards three
things must hold, and each catches a different failure:

* the total balance is still K * 1,000 (a lost update changes it);
* the number of transfers the workers saw commit equals the rows in the log (a
  transfer that was reported committed but is not in the database, or the reverse);
* every account's balance equals 1,000 minus what the log says it sent plus what it
  received (lost updates that happen to cancel out in the total).

The same workload runs either through a ``SessionFactory`` with its presets, or
(``plain=True``) through bare ``async_sessionmaker(create_async_engine(url))``, to show
what the presets buy. Everything here returns data; printing is ``cli.py``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final, Literal

from sqlalchemy import BigInteger, ForeignKey, MetaData, func, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

from sessionforge._internal.core import FactoryStatus, unavailable
from sessionforge._internal.engines import engine_status
from sessionforge.config import FactoryConfig, mask_url
from sessionforge.errors import ConfigurationError
from sessionforge.factory import SessionFactory

__all__ = [
    "DEFAULT_DEMO_URL",
    "DemoProgress",
    "DemoResult",
    "DemoSettings",
    "run_demo",
    "validate_settings",
]

#: The demo's own embedded database: a SQLite file in the working directory.
DEFAULT_DEMO_URL: Final = "sqlite+aiosqlite:///sessionforge-demo.db"
INITIAL_BALANCE: Final = 1_000
MAX_AMOUNT: Final = 100
_SETUP_TIMEOUT: Final = 10.0
_ERROR_TEXT_LIMIT: Final = 160

Mode = Literal["sessionforge", "plain"]
ProgressCallback = Callable[["DemoProgress"], None]
BeginFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]


# models ------------------------------------------------------------------------------


class AccountRow:
    """Columns of the account table; ``build_models`` maps a subclass per table prefix."""

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(BigInteger)

    if TYPE_CHECKING:

        def __init__(self, *, id: int, balance: int) -> None: ...


class TransferRow:
    """Columns of the transfer log: one row per committed transfer."""

    #: Set by ``build_models``: the account table the log's foreign keys point at.
    account_table: ClassVar[str]

    id: Mapped[int] = mapped_column(primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)

    @declared_attr
    def source_id(cls) -> Mapped[int]:
        return mapped_column(ForeignKey(f"{cls.account_table}.id"))

    @declared_attr
    def target_id(cls) -> Mapped[int]:
        return mapped_column(ForeignKey(f"{cls.account_table}.id"))

    if TYPE_CHECKING:

        def __init__(self, *, source_id: int, target_id: int, amount: int) -> None: ...


@dataclass(frozen=True, slots=True)
class DemoModels:
    """The demo's mapped classes and their metadata, for one table prefix."""

    metadata: MetaData
    account: type[AccountRow]
    transfer: type[TransferRow]


def build_models(prefix: str) -> DemoModels:
    """Map fresh ``Account``/``Transfer`` classes to ``<prefix>_account``/``_transfer``.

    Each call gets its own declarative base, so tests (and a process running the demo
    twice) can use several prefixes without the classes of one run clashing with another.
    """

    class Base(DeclarativeBase):
        pass

    account_table = f"{prefix}_account"
    account = type(
        "Account", (AccountRow, Base), {"__tablename__": account_table, "__module__": __name__}
    )
    transfer = type(
        "Transfer",
        (TransferRow, Base),
        {
            "__tablename__": f"{prefix}_transfer",
            "__module__": __name__,
            "account_table": account_table,
        },
    )
    return DemoModels(metadata=Base.metadata, account=account, transfer=transfer)


# settings and results ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What to run: where, how many workers, transfers and accounts, and how."""

    url: str | URL | None = None
    workers: int = 10
    transfers: int = 200
    accounts: int = 20
    table_prefix: str = "sf_demo"
    plain: bool = False
    seed: int | None = None
    progress_interval: float = 0.5

    @property
    def total_transfers(self) -> int:
        return self.workers * self.transfers

    @property
    def expected_total(self) -> int:
        return self.accounts * INITIAL_BALANCE


@dataclass(frozen=True, slots=True)
class DemoProgress:
    """A progress snapshot, handed to the progress callback while the workers run."""

    done: int
    failed: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        """Committed transfers per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


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


# the workload ------------------------------------------------------------------------


@dataclass(slots=True)
class _Counters:
    """Shared by the workers of one run (one event loop, so no lock is needed)."""

    committed: int = 0
    failed: int = 0
    peak_checked_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def transfer(
    begin: BeginFactory, models: DemoModels, source: int, target: int, amount: int
) -> None:
    """Move ``amount`` from account ``source`` to ``target`` in one transaction, logged.

    The two rows are read with ``SELECT ... FOR UPDATE``, lower id first. On
    PostgreSQL at READ COMMITTED a plain read-modify-write loses updates when two
    transactions read the same balance before either writes; the row locks make the
    second wait for the first, and taking them in one global order means two transfers
    over the same pair can never deadlock. SQLite ignores FOR UPDATE: there
    sessionforge's ``BEGIN IMMEDIATE`` preset takes the database's write lock at the
    start of the transaction, which serialises writers just as well.
    """
    first, second = sorted((source, target))
    async with begin() as session:
        low = await session.get(models.account, first, with_for_update=True)
        high = await session.get(models.account, second, with_for_update=True)
        if low is None or high is None:
            raise LookupError(f"account {first if low is None else second} does not exist")
        payer, payee = (low, high) if first == source else (high, low)
        # Overdrafts are allowed: the invariant is about conservation, not solvency.
        payer.balance -= amount
        payee.balance += amount
        session.add(models.transfer(source_id=source, target_id=target, amount=amount))


async def _worker(
    begin: BeginFactory,
    models: DemoModels,
    settings: DemoSettings,
    rng: random.Random,
    counters: _Counters,
) -> None:
    """Make ``settings.transfers`` transfers; count each as committed or failed."""
    for _ in range(settings.transfers):
        source, target = rng.sample(range(1, settings.accounts + 1), 2)
        amount = rng.randint(1, MAX_AMOUNT)
        try:
            await transfer(begin, models, source, target, amount)
        except (SQLAlchemyError, OSError, LookupError) as exc:
            counters.failed += 1
            counters.errors[_describe_error(exc)] += 1
        else:
            counters.committed += 1


def _describe_error(exc: BaseException) -> str:
    """One short line naming the driver's error, for grouping failures by kind."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = str(original).strip().splitlines()[0] if str(original).strip() else ""
    line = f"{type(original).__name__}: {text}" if text else type(original).__name__
    return line[:_ERROR_TEXT_LIMIT]


async def _report_progress(
    settings: DemoSettings,
    counters: _Counters,
    started: float,
    status: Callable[[], FactoryStatus],
    callback: ProgressCallback | None,
) -> None:
    """Every ``progress_interval`` seconds: sample the pool, call ``callback``."""
    while True:
        await asyncio.sleep(settings.progress_interval)
        _sample_pool(status, counters)
        if callback is not None:
            callback(_progress(settings, counters, started))


def _sample_pool(status: Callable[[], FactoryStatus], counters: _Counters) -> None:
    counters.peak_checked_out = max(counters.peak_checked_out, status().checked_out)


def _progress(settings: DemoSettings, counters: _Counters, started: float) -> DemoProgress:
    return DemoProgress(
        done=counters.committed,
        failed=counters.failed,
        total=settings.total_transfers,
        elapsed=time.perf_counter() - started,
    )


async def _run_workers(
    target: _Target,
    models: DemoModels,
    settings: DemoSettings,
    progress: ProgressCallback | None,
) -> tuple[_Counters, float]:
    """Run the workers to completion; return their counters and the seconds taken."""
    counters = _Counters()
    seeder = random.Random(settings.seed)
    started = time.perf_counter()
    reporter = asyncio.create_task(
        _report_progress(settings, counters, started, target.status, progress)
    )
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(settings.workers):
                rng = random.Random(seeder.getrandbits(64))
                group.create_task(_worker(target.begin, models, settings, rng, counters))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    elapsed = time.perf_counter() - started
    _sample_pool(target.status, counters)
    if progress is not None:
        progress(_progress(settings, counters, started))
    return counters, elapsed


# setup and verification --------------------------------------------------------------


async def _create_schema(engine: AsyncEngine, models: DemoModels, accounts: int) -> None:
    """Drop and recreate the demo tables, then seed the accounts."""
    async with engine.begin() as connection:
        await connection.run_sync(models.metadata.drop_all)
        await connection.run_sync(models.metadata.create_all)
        rows = [{"id": i, "balance": INITIAL_BALANCE} for i in range(1, accounts + 1)]
        await connection.execute(insert(models.account), rows)


@dataclass(frozen=True, slots=True)
class _FinalState:
    total: int
    logged: int
    mismatched: int


async def _final_state(engine: AsyncEngine, models: DemoModels) -> _FinalState:
    """Read the balances and the log, and reconcile every account against the log."""
    account, log = models.account, models.transfer
    async with engine.connect() as connection:
        balances = dict((await connection.execute(select(account.id, account.balance))).all())
        logged = (await connection.execute(select(func.count()).select_from(log))).scalar_one()
        sent = await _sums_by(connection, log.source_id, log.amount)
        received = await _sums_by(connection, log.target_id, log.amount)
    mismatched = sum(
        1
        for id_, balance in balances.items()
        if balance != INITIAL_BALANCE - sent.get(id_, 0) + received.get(id_, 0)
    )
    return _FinalState(total=sum(balances.values()), logged=logged, mismatched=mismatched)


async def _sums_by(
    connection: AsyncConnection, key: Mapped[int], amount: Mapped[int]
) -> dict[int, int]:
    rows = await connection.execute(select(key, func.sum(amount)).group_by(key))
    return {int(k): int(v) for k, v in rows}


# entry point ---------------------------------------------------------------------------


def demo_url(settings: DemoSettings) -> URL:
    """The URL the demo runs on, normalised by sessionforge (``ConfigurationError`` if bad).

    Both modes use the normalised URL, so ``postgresql://`` means asyncpg for the plain
    run too: the contrast is about presets, not about which driver was picked.
    """
    return FactoryConfig.from_url(settings.url or DEFAULT_DEMO_URL).async_url


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


@dataclass(frozen=True, slots=True)
class _Target:
    """What the workload needs from either mode: transactions, the engine, pool figures."""

    begin: BeginFactory
    engine: AsyncEngine
    status: Callable[[], FactoryStatus]


@contextlib.asynccontextmanager
async def _open(url: URL, plain: bool) -> AsyncIterator[_Target]:
    """Yield the chosen mode's ``_Target``; dispose its engine at exit."""
    if plain:
        engine = create_async_engine(url)
        try:
            yield _Target(async_sessionmaker(engine).begin, engine, lambda: _plain_status(engine))
        finally:
            await engine.dispose()
    else:
        db = SessionFactory(url)
        try:
            yield _Target(db.begin, db.engine, db.status)
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
        await _setup(target.engine, models, settings)
        counters, elapsed = await _run_workers(target, models, settings, progress)
        state = await _final_state(target.engine, models)
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


async def _setup(engine: AsyncEngine, models: DemoModels, settings: DemoSettings) -> None:
    """Connect once, then create the schema.

    Only the first connection's failure means the database is unavailable; an error of
    the DDL itself (say, no CREATE privilege) propagates as the SQLAlchemy error it is.
    """
    try:
        async with asyncio.timeout(_SETUP_TIMEOUT), engine.connect():
            pass
    except (DBAPIError, OSError, TimeoutError) as exc:
        raise unavailable(engine.url, exc, _SETUP_TIMEOUT) from exc
    await _create_schema(engine, models, settings.accounts)


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
