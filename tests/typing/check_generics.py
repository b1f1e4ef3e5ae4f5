"""Checked by mypy --strict (test_typing.py runs it): the factories infer session types."""

from __future__ import annotations

from typing import assert_type

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import FactoryConfig, SessionFactory, SyncSessionFactory


class MySession(AsyncSession):
    pass


class MySyncSession(Session):
    pass


async def generics() -> None:
    plain = SessionFactory("sqlite://")
    assert_type(plain, SessionFactory[AsyncSession])
    assert_type(plain(), AsyncSession)

    mine = SessionFactory("sqlite://", class_=MySession, pool_size=1)
    assert_type(mine, SessionFactory[MySession])
    assert_type(mine(), MySession)
    assert_type(mine.class_, type[MySession])
    async with mine() as session:
        assert_type(session, MySession)
    async with mine.begin() as session:
        assert_type(session, MySession)
    async with mine as same:
        assert_type(same, SessionFactory[MySession])

    assert_type(mine.sync, SyncSessionFactory[Session])
    with mine.sync.begin() as sync_session:
        assert_type(sync_session, Session)

    from_config = SessionFactory(FactoryConfig.from_url("sqlite://"))
    assert_type(from_config, SessionFactory[AsyncSession])

    sync_mine = SyncSessionFactory("sqlite://", sync_class_=MySyncSession)
    assert_type(sync_mine(), MySyncSession)
    with sync_mine.begin() as s:
        assert_type(s, MySyncSession)
    assert_type(await mine.ping(), float)


async def transactions(db: SessionFactory[MySession]) -> None:
    async def transfer(session: MySession, source: int, target: int, note: str) -> float:
        return 1.0

    assert_type(await db.run_transaction(transfer, 1, 2, "rent", retries=3), float)

    @db.transactional(isolation_level="SERIALIZABLE")
    async def decorated(session: MySession, amount: int) -> str:
        return str(amount)

    assert_type(await decorated(5), str)

    def sync_work(session: Session, name: str) -> int:
        return len(name)

    assert_type(db.sync.run_transaction(sync_work, "ada"), int)

    async with db.atomic(durable=True) as atomic_session:
        assert_type(atomic_session, MySession)
    async with db.scope() as scoped:
        assert_type(scoped, MySession)
        assert_type(db.current(), MySession)
