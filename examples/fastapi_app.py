"""A small FastAPI app on sessionforge: items, accounts, transfers, notifications.

- items: create, read, update, delete, and a keyset-paginated list — each request's
  session comes from ``db.dependency()`` and is committed before the response goes out
  (a failed COMMIT is a 500, never a 2xx);
- transfers: ``db.run_transaction`` moves money between two accounts in a transaction
  of its own, re-run on serialization failures (PostgreSQL) and busy errors (SQLite);
- notifications: an on-commit hook enqueues one per transfer, so a transfer that rolls
  back notifies no one; a background task drains the queue;
- ``/health`` pings the database and shows the pool.

Runs on the embedded SQLite default; ``DATABASE_URL`` switches it::

    uvicorn examples.fastapi_app:app
    DATABASE_URL=postgresql://postgres@127.0.0.1/test uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy import CheckConstraint, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import FactoryConfig, SessionFactory, on_commit

db = SessionFactory(FactoryConfig.from_env(default="sqlite:///fastapi-example.db"))
SessionDep = Annotated[AsyncSession, Depends(db.dependency())]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "example_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    price_cents: Mapped[int] = mapped_column(Integer)


class Account(Base):
    __tablename__ = "example_account"
    __table_args__ = (CheckConstraint("balance >= 0", name="example_account_not_negative"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    balance: Mapped[int] = mapped_column(Integer)


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    price_cents: int = Field(ge=0)


class ItemOut(ItemIn):
    id: int


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_after: int | None  # pass as ?after= for the next page; null on the last


class AccountIn(BaseModel):
    owner: str
    balance: int = Field(ge=0)


class AccountOut(AccountIn):
    id: int


class TransferIn(BaseModel):
    source: int
    target: int
    amount: int = Field(gt=0)


# notifications: enqueued by on-commit hooks, sent by a background task ------------------

outbox: asyncio.Queue[str] = asyncio.Queue()
sent: deque[str] = deque(maxlen=1000)


async def send_notifications() -> None:
    while True:
        message = await outbox.get()
        sent.append(message)  # a real app would email or publish here
        outbox.task_done()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # db.lifespan checks the database at startup and disposes its engines at shutdown;
    # the app's own startup runs inside it.
    async with db.lifespan.with_ping(timeout=10)(app):
        async with db.engine.begin() as connection:  # a real app runs its migrations
            await connection.run_sync(Base.metadata.create_all)
        sender = asyncio.create_task(send_notifications())
        try:
            yield
        finally:
            await outbox.join()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender


app = FastAPI(title="sessionforge example", lifespan=lifespan)


# items ----------------------------------------------------------------------------------


@app.post("/items", status_code=201)
async def create_item(item: ItemIn, session: SessionDep) -> ItemOut:
    row = Item(name=item.name, price_cents=item.price_cents)
    session.add(row)
    try:
        await session.flush()  # the unique name is checked here, inside the request
    except IntegrityError:
        raise HTTPException(409, f"an item named {item.name!r} exists") from None
    return ItemOut(id=row.id, name=row.name, price_cents=row.price_cents)


@app.get("/items")
async def list_items(
    session: SessionDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ItemPage:
    rows = (
        await session.scalars(select(Item).where(Item.id > after).order_by(Item.id).limit(limit))
    ).all()
    items = [ItemOut(id=row.id, name=row.name, price_cents=row.price_cents) for row in rows]
    return ItemPage(items=items, next_after=items[-1].id if len(items) == limit else None)


async def find_item(session: AsyncSession, item_id: int) -> Item:
    row = await session.get(Item, item_id)
    if row is None:
        raise HTTPException(404, f"no item {item_id}")
    return row


@app.get("/items/{item_id}")
async def read_item(item_id: int, session: SessionDep) -> ItemOut:
    row = await find_item(session, item_id)
    return ItemOut(id=row.id, name=row.name, price_cents=row.price_cents)


@app.put("/items/{item_id}")
async def update_item(item_id: int, item: ItemIn, session: SessionDep) -> ItemOut:
    row = await find_item(session, item_id)
    row.name, row.price_cents = item.name, item.price_cents
    return ItemOut(id=row.id, name=row.name, price_cents=row.price_cents)


@app.delete("/items/{item_id}", status_code=204)
async def delete_item(item_id: int, session: SessionDep) -> Response:
    await session.delete(await find_item(session, item_id))
    return Response(status_code=204)


# accounts and transfers -----------------------------------------------------------------


@app.post("/accounts", status_code=201)
async def open_account(account: AccountIn, session: SessionDep) -> AccountOut:
    row = Account(owner=account.owner, balance=account.balance)
    session.add(row)
    await session.flush()
    return AccountOut(id=row.id, owner=row.owner, balance=row.balance)


@app.get("/accounts/{account_id}")
async def read_account(account_id: int, session: SessionDep) -> AccountOut:
    row = await session.get(Account, account_id)
    if row is None:
        raise HTTPException(404, f"no account {account_id}")
    return AccountOut(id=row.id, owner=row.owner, balance=row.balance)


async def move(session: AsyncSession, transfer: TransferIn) -> None:
    """One attempt at a transfer; run_transaction re-runs it on a conflict."""
    source = await session.get(Account, transfer.source)
    target = await session.get(Account, transfer.target)
    if source is None or target is None:
        raise HTTPException(404, "no such account")
    if source.balance < transfer.amount:
        raise HTTPException(409, f"account {source.id} holds less than {transfer.amount}")
    source.balance -= transfer.amount
    target.balance += transfer.amount
    message = f"{transfer.amount} moved from {source.id} to {target.id}"
    on_commit(session, lambda: outbox.put_nowait(message))


@app.post("/transfers")
async def transfer(transfer: TransferIn) -> dict[str, str]:
    if transfer.source == transfer.target:
        raise HTTPException(422, "source and target are the same account")
    # Its own transaction (retried as a whole), so no request session is involved.
    await db.run_transaction(move, transfer, retries=10, isolation_level="SERIALIZABLE")
    return {"status": "done"}


# operations -----------------------------------------------------------------------------


@app.get("/notifications")
async def notifications() -> list[str]:
    await outbox.join()
    return list(sent)


@app.get("/health")
async def health() -> dict[str, float | int]:
    seconds = await db.ping(timeout=5)
    return {"database_ms": round(seconds * 1000, 2), "checked_out": db.status().checked_out}
