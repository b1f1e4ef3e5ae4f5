"""The bank-transfer workload ``sessionforge demo`` runs: tables, transfers, workers.

K accounts start with 1,000 each; N asyncio workers each make M transfers of a random
amount between two random accounts, every transfer one transaction that reads both
balances, writes both, and inserts one row into a transfer log. Here are the tables
(``build_models``), one transfer, the workers with their counters and progress, the
schema setup and the final state read back for the invariant. The workload runs on a
``Target`` (a way to run one transaction, the engine, pool figures), so it is the same
code with sessionforge or with bare SQLAlchemy; choosing the target, judging the
invariant and printing are ``demo.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final

from sqlalchemy import BigInteger, ForeignKey, MetaData, func, insert, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

from sessionforge._internal.core import FactoryStatus, unavailable

__all__ = [
    "INITIAL_BALANCE",
    "AccountRow",
    "Counters",
    "DemoModels",
    "DemoProgress",
    "DemoSettings",
    "FinalState",
    "ProgressCallback",
    "Runner",
    "Target",
    "TransferRow",
    "build_models",
    "final_state",
    "run_workers",
    "setup",
    "transfer",
]

INITIAL_BALANCE: Final = 1_000
MAX_AMOUNT: Final = 100
_SETUP_TIMEOUT: Final = 10.0
_ERROR_TEXT_LIMIT: Final = 160

ProgressCallback = Callable[["DemoProgress"], None]
#: Runs one transaction: ``await run(body)`` calls ``body(session)`` in a transaction
#: and commits (sessionforge: ``run_transaction``, re-running it on conflicts).
Runner = Callable[[Callable[[AsyncSession], Awaitable[None]]], Awaitable[None]]


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


# settings, progress, target ----------------------------------------------------------


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
class Target:
    """What the workload needs from either mode: transactions, the engine, pool figures.

    ``lock_rows``: whether a transfer reads its rows with ``SELECT ... FOR UPDATE``
    (see ``transfer``).
    """

    run: Runner
    engine: AsyncEngine
    status: Callable[[], FactoryStatus]
    lock_rows: bool = True


# the workload ------------------------------------------------------------------------


@dataclass(slots=True)
class Counters:
    """Shared by the workers of one run (one event loop, so no lock is needed)."""

    committed: int = 0
    failed: int = 0
    peak_checked_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def transfer(
    session: AsyncSession,
    models: DemoModels,
    source: int,
    target: int,
    amount: int,
    *,
    lock_rows: bool = True,
) -> None:
    """Move ``amount`` from account ``source`` to ``target`` in ``session``'s transaction.

    Reads both balances (lower id first), writes both, logs the transfer. On
    PostgreSQL at READ COMMITTED a plain read-modify-write loses updates when two
    transactions read the same balance before either writes; ``lock_rows`` reads the
    rows with ``SELECT ... FOR UPDATE``, so the second waits for the first, and taking
    the locks in one global order means two transfers over the same pair can never
    deadlock. SQLite ignores FOR UPDATE: there sessionforge's ``BEGIN IMMEDIATE``
    preset takes the database's write lock at the start of the transaction, which
    serialises writers just as well. On MariaDB the rows are read plainly (no
    ``lock_rows``): InnoDB's REPEATABLE READ then loses updates silently, and
    sessionforge's ``mysql_snapshot_isolation`` preset turns each would-be lost update
    into error 1020, which ``run_transaction`` re-runs (issue 14).
    """
    first, second = sorted((source, target))
    low = await session.get(models.account, first, with_for_update=lock_rows)
    high = await session.get(models.account, second, with_for_update=lock_rows)
    if low is None or high is None:
        raise LookupError(f"account {first if low is None else second} does not exist")
    payer, payee = (low, high) if first == source else (high, low)
    # Overdrafts are allowed: the invariant is about conservation, not solvency.
    payer.balance -= amount
    payee.balance += amount
    session.add(models.transfer(source_id=source, target_id=target, amount=amount))


async def _worker(
    target: Target,
    models: DemoModels,
    settings: DemoSettings,
    rng: random.Random,
    counters: Counters,
) -> None:
    """Make ``settings.transfers`` transfers; count each as committed or failed."""
    for _ in range(settings.transfers):
        source, payee = rng.sample(range(1, settings.accounts + 1), 2)
        amount = rng.randint(1, MAX_AMOUNT)
        body = functools.partial(
            transfer,
            models=models,
            source=source,
            target=payee,
            amount=amount,
            lock_rows=target.lock_rows,
        )
        try:
            await target.run(body)
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
    counters: Counters,
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


def _sample_pool(status: Callable[[], FactoryStatus], counters: Counters) -> None:
    counters.peak_checked_out = max(counters.peak_checked_out, status().checked_out)


def _progress(settings: DemoSettings, counters: Counters, started: float) -> DemoProgress:
    return DemoProgress(
        done=counters.committed,
        failed=counters.failed,
        total=settings.total_transfers,
        elapsed=time.perf_counter() - started,
    )


async def run_workers(
    target: Target,
    models: DemoModels,
    settings: DemoSettings,
    progress: ProgressCallback | None,
) -> tuple[Counters, float]:
    """Run the workers to completion; return their counters and the seconds taken."""
    counters = Counters()
    seeder = random.Random(settings.seed)
    started = time.perf_counter()
    reporter = asyncio.create_task(
        _report_progress(settings, counters, started, target.status, progress)
    )
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(settings.workers):
                rng = random.Random(seeder.getrandbits(64))
                group.create_task(_worker(target, models, settings, rng, counters))
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


async def setup(engine: AsyncEngine, models: DemoModels, settings: DemoSettings) -> None:
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


async def _create_schema(engine: AsyncEngine, models: DemoModels, accounts: int) -> None:
    """Drop and recreate the demo tables, then seed the accounts."""
    async with engine.begin() as connection:
        await connection.run_sync(models.metadata.drop_all)
        await connection.run_sync(models.metadata.create_all)
        rows = [{"id": i, "balance": INITIAL_BALANCE} for i in range(1, accounts + 1)]
        await connection.execute(insert(models.account), rows)


@dataclass(frozen=True, slots=True)
class FinalState:
    """What the database holds after the run: total balance, log rows, accounts off."""

    total: int
    logged: int
    mismatched: int


async def final_state(engine: AsyncEngine, models: DemoModels) -> FinalState:
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
    return FinalState(total=sum(balances.values()), logged=logged, mismatched=mismatched)


async def _sums_by(
    connection: AsyncConnection, key: Mapped[int], amount: Mapped[int]
) -> dict[int, int]:
    rows = await connection.execute(select(key, func.sum(amount)).group_by(key))
    return {int(k): int(v) for k, v in rows}
