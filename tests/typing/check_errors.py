"""Each line must be an error under mypy --strict (test_typing.py checks the count)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from sessionforge import SessionFactory

SessionFactory("sqlite://", pool_size="5")  # E: wrong type
SessionFactory("sqlite://", pool_sizes=5)  # E: unknown option
SessionFactory("sqlite://", sqlite_begin="exclusive")  # E: not a Literal choice
SessionFactory("sqlite://", class_=dict)  # E: not an AsyncSession subclass


async def transaction_arguments(db: SessionFactory[AsyncSession]) -> None:
    async def transfer(session: AsyncSession, source: int, target: int) -> None:
        return None

    await db.run_transaction(transfer, 1, "two")  # E: wrong positional type
    await db.run_transaction(transfer, 1)  # E: missing positional argument
    db.sync.run_transaction(transfer, 1, 2)  # E: async fn to the sync twin
