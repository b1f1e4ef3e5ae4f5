"""The "both" rows of DESIGN.md §3: sessionmaker's behaviour, through both twins.

Each scenario runs through the async factory and through its sync twin, on every
backend, and checks the same outcome from outside: rows in the table, connections
checked out, the exception raised.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from sessionforge import SessionFactory, SyncSessionFactory

from .conftest import NO_FAILING_COMMIT, FactoryMaker, count_rows
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


class Boom(Exception):
    """An application error raised inside a block."""


def sync_view(session: AsyncSession | Session) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


# --- factory(**kw) and info -----------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
def test_call_overrides_and_info_merge(twin: str) -> None:
    db = SessionFactory("sqlite://", info={"app": "shop", "shared": 1}, autoflush=True)
    factory: Any = db if twin == "async" else db.sync

    plain = sync_view(factory())
    assert plain.info == {"app": "shop", "shared": 1}
    assert plain.autoflush is True
    assert plain.expire_on_commit is False  # the one deliberate default change

    merged = sync_view(factory(info={"shared": 2, "call": True}, autoflush=False))
    assert merged.info == {"app": "shop", "shared": 2, "call": True}
    assert merged.autoflush is False

    plain.info["written"] = "by a session"
    assert "written" not in sync_view(factory()).info
    assert dict(db.config.info or {}) == {"app": "shop", "shared": 1}


@pytest.mark.parametrize("twin", TWINS)
def test_call_info_without_factory_info_is_copied(twin: str) -> None:
    db = SessionFactory("sqlite://")
    factory: Any = db if twin == "async" else db.sync
    mine = {"request": 1}
    session = sync_view(factory(info=mine))
    session.info["added"] = 2
    assert mine == {"request": 1}


@pytest.mark.parametrize("twin", TWINS)
def test_call_rejects_unknown_and_factory_owned_arguments(twin: str) -> None:
    db = SessionFactory("sqlite://")
    factory: Any = db if twin == "async" else db.sync
    with pytest.raises(ValueError, match=r"unknown session argument 'autoflsh'.*'autoflush'"):
        factory(autoflsh=False)
    with pytest.raises(ValueError, match="bind is set by the factory"):
        factory(bind=None)


# --- configure() ----------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
def test_configure_changes_later_sessions_of_both_twins(twin: str) -> None:
    db = SessionFactory("sqlite://")
    configured: Any = db if twin == "async" else db.sync
    before_async, before_sync = sync_view(db()), db.sync()

    configured.configure(autoflush=False, info={"v": 2}, join_transaction_mode="create_savepoint")

    for session in (sync_view(db()), db.sync()):
        assert session.autoflush is False
        assert session.info == {"v": 2}
        assert session.join_transaction_mode == "create_savepoint"
    for session in (before_async, before_sync):
        assert session.autoflush is True
        assert session.info == {}


def test_configure_info_replaces_like_sessionmaker() -> None:
    db = SessionFactory("sqlite://", info={"a": 1})
    db.configure(info={"b": 2})
    assert sync_view(db()).info == {"b": 2}


@pytest.mark.parametrize("twin", TWINS)
def test_configure_refuses_engine_options_and_unknown_names(twin: str) -> None:
    db = SessionFactory("sqlite://")
    factory: Any = db if twin == "async" else db.sync
    with pytest.raises(ValueError, match="pool_size shapes the engine"):
        factory.configure(pool_size=3)
    with pytest.raises(ValueError, match="unknown session argument 'expire_on_comit'"):
        factory.configure(expire_on_comit=True)
    with pytest.raises(ValueError, match=r"expire_on_commit=1 \(int\) is invalid"):
        factory.configure(expire_on_commit=1)
    assert db.config.expire_on_commit is False


# --- with factory() -------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_plain_session_closes_without_committing(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db() as session:
            item = models.Item(name="never committed")
            session.add(item)
            await session.flush()
            assert db.status().checked_out == 1
    else:
        with db.sync() as session:
            item = models.Item(name="never committed")
            session.add(item)
            session.flush()
            assert db.sync.status().checked_out == 1

    assert item not in session  # closed: everything expunged
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


# --- begin() --------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_begin_commits_on_success_and_closes(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.begin() as session:
            item = models.Item(name="committed")
            session.add(item)
    else:
        with db.sync.begin() as session:
            item = models.Item(name="committed")
            session.add(item)

    assert item not in session
    assert count_rows(outside, models.item) == 1
    pool: Any = db.engine.pool  # the pool a user would look at
    assert pool.checkedout() == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_begin_rolls_back_and_reraises_the_same_exception(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    error = Boom("application failure")
    with pytest.raises(Boom) as raised:
        if twin == "async":
            async with db.begin() as session:
                session.add(models.Item(name="rolled back"))
                await session.flush()
                raise error
        else:
            with db.sync.begin() as session:
                session.add(models.Item(name="rolled back"))
                session.flush()
                raise error

    assert raised.value is error
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.skip_backend("mysql", reason=NO_FAILING_COMMIT)
@pytest.mark.parametrize("twin", TWINS)
async def test_begin_closes_the_session_when_commit_fails(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # The deferred foreign key is only checked by COMMIT itself.
    with pytest.raises(IntegrityError):
        if twin == "async":
            async with db.begin() as session:
                child = models.Child(id=1, parent_id=999)
                session.add(child)
                await session.flush()
        else:
            with db.sync.begin() as session:
                child = models.Child(id=1, parent_id=999)
                session.add(child)
                session.flush()

    # async_sessionmaker.begin() leaves `child` in an open session here.
    assert child not in session
    assert not session.in_transaction()
    assert count_rows(outside, models.child) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.skip_backend("mysql", reason=NO_FAILING_COMMIT)
@pytest.mark.parametrize("twin", TWINS)
async def test_failed_commit_returns_a_clean_connection(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # SQLite keeps its transaction open when COMMIT fails (deferred foreign key) while
    # SQLAlchemy 2.1 skips the pool's rollback: the next BEGIN failed ("cannot start a
    # transaction within a transaction" / "database is locked") before the fix.
    if twin == "async":
        async with db() as session:
            session.add(models.Child(id=1, parent_id=999))
            with pytest.raises(IntegrityError):
                await session.commit()
        async with db.begin() as session:
            session.add(models.Item(name="next"))
    else:
        with db.sync() as sync_session:
            sync_session.add(models.Child(id=1, parent_id=999))
            with pytest.raises(IntegrityError):
                sync_session.commit()
        with db.sync.begin() as sync_session:
            sync_session.add(models.Item(name="next"))
    assert count_rows(outside, models.item) == 1
    assert count_rows(outside, models.child) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_begin_session_is_usable_again_after_close(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # Like sessionmaker: close() resets, the session may start a new transaction.
    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="first"))
        async with session.begin():
            session.add(models.Item(name="second"))
        await session.close()
    else:
        with db.sync.begin() as sync_session:
            sync_session.add(models.Item(name="first"))
        with sync_session.begin():
            sync_session.add(models.Item(name="second"))
        sync_session.close()
    assert count_rows(outside, models.item) == 2


# --- events ---------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_events_are_scoped_to_the_factory(
    twin: str, db: SessionFactory[Any], make_factory: FactoryMaker, models: Models
) -> None:
    other = make_factory(db.config)  # same database, even in memory
    listened: Any = db if twin == "async" else db.sync
    seen: list[Session] = []

    def before_flush(session: Session, _context: Any, _instances: Any) -> None:
        seen.append(session)

    event.listen(listened, "before_flush", before_flush)
    assert event.contains(listened, "before_flush", before_flush)

    async with db.begin() as ours:
        ours.add(models.Item(name="ours"))
    with db.sync.begin() as twin_session:
        twin_session.add(models.Item(name="twin"))
    async with other.begin() as theirs:
        theirs.add(models.Item(name="theirs"))
    bare = async_sessionmaker(db.engine)
    async with bare.begin() as plain:
        plain.add(models.Item(name="plain"))

    assert seen == [ours.sync_session, twin_session]

    event.remove(listened, "before_flush", before_flush)
    async with db.begin() as after_removal:
        after_removal.add(models.Item(name="after removal"))
    assert len(seen) == 2
    async with db() as session:
        names = set((await session.scalars(select(models.Item.name))).all())
    assert names == {"ours", "twin", "theirs", "plain", "after removal"}


async def test_events_receive_transaction_events(db: SessionFactory[Any], models: Models) -> None:
    commits: list[Session] = []
    event.listen(db, "after_commit", commits.append)
    async with db.begin() as session:
        session.add(models.Item(name="x"))
    assert commits == [session.sync_session]


def test_events_on_unrelated_targets_still_fail_clearly() -> None:
    from sqlalchemy.exc import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="No such event 'before_flush'"):
        event.listen(object(), "before_flush", lambda *a: None)


# --- repr -----------------------------------------------------------------------------


def test_repr_shows_class_and_options_with_password_masked() -> None:
    class MySession(AsyncSession):
        pass

    db = SessionFactory(
        "postgresql://app:s3cret@db.internal:5432/shop",
        class_=MySession,
        pool_size=3,
        info={"team": "core"},
        connect_args={"password": "s3cret", "timeout": 5},
    )
    for text in (repr(db), repr(db.sync), repr(db.config)):
        assert "s3cret" not in text
        assert "app:***@db.internal" in text
        assert "pool_size=3" in text
        assert "info={'team': 'core'}" in text
        assert "'password': '***'" in text
    assert repr(db).startswith("SessionFactory(class_='MySession', url='postgresql+asyncpg://")
    assert repr(db.sync).startswith(
        "SyncSessionFactory(class_='Session', url='postgresql+psycopg:"
    )
    assert "expire_on_commit=False" in repr(db)


def test_session_classes_are_per_factory_subclasses() -> None:
    class MySession(AsyncSession):
        pass

    class MySyncSession(Session):
        pass

    first = SessionFactory("sqlite://", class_=MySession, sync_class_=MySyncSession)
    second = SessionFactory("sqlite://", class_=MySession, sync_class_=MySyncSession)
    assert first.class_ is not second.class_
    assert issubclass(first.class_, MySession)
    assert isinstance(first(), MySession)
    assert isinstance(first().sync_session, MySyncSession)
    assert isinstance(first.sync(), MySyncSession)
    assert type(first().sync_session) is type(first.sync())
    sync_only: SyncSessionFactory[MySyncSession] = SyncSessionFactory(
        "sqlite://", sync_class_=MySyncSession
    )
    assert isinstance(sync_only(), MySyncSession)
