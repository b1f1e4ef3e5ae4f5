"""Implicit IO under asyncio: ``LazyLoadError`` before the load, naming the attribute.

A lazy relationship, an expired column or a deferred column of an async session's object,
touched in plain async code, raises ``LazyLoadError`` (a ``MissingGreenlet``) before any
IO: no connection checked out, no statement sent, the session as it was. The same
loads work in the sync twin, inside ``run_sync`` and through ``awaitable_attrs``.
"""

from __future__ import annotations

import asyncio
import runpy
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import ForeignKey, MetaData, String, event, func, select
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.orm.exc import DetachedInstanceError

from sessionforge import SessionFactory
from sessionforge.errors import LazyLoadError, SessionForgeError

from .conftest import FactoryMaker
from .test_readme import block_tested_by


@dataclass(frozen=True)
class Lazy:
    db: SessionFactory[Any]
    # Any: classes made per test, which mypy cannot follow as types.
    User: Any
    Address: Any
    Tag: Any


@pytest.fixture
async def lazy(make_factory: FactoryMaker, prefix: str) -> AsyncIterator[Lazy]:
    """A factory with users, addresses and tags of this test's own, one user stored."""

    class Base(AsyncAttrs, DeclarativeBase):
        metadata = MetaData()

    class User(Base):
        __tablename__ = f"{prefix}_user"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))
        bio: Mapped[str] = mapped_column(String(50), deferred=True)
        addresses: Mapped[list[Address]] = relationship(
            back_populates="user", order_by="Address.id"
        )
        raising: Mapped[list[Address]] = relationship(viewonly=True, lazy="raise")

    class Address(Base):
        __tablename__ = f"{prefix}_address"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50))
        user_id: Mapped[int] = mapped_column(ForeignKey(f"{prefix}_user.id"))
        user: Mapped[User] = relationship(back_populates="addresses")

    class Plain(DeclarativeBase):  # without AsyncAttrs
        metadata = Base.metadata

    class Tag(Plain):
        __tablename__ = f"{prefix}_tag"
        id: Mapped[int] = mapped_column(primary_key=True)
        label: Mapped[str] = mapped_column(String(50), deferred=True)

    db = make_factory()
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with db.begin() as session:
        user = User(id=1, name="ada", bio="analyst")
        user.addresses = [Address(id=1, email="ada@a.test"), Address(id=2, email="ada@b.test")]
        session.add_all([user, Tag(id=1, label="first")])
    yield Lazy(db=db, User=User, Address=Address, Tag=Tag)
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)


class Statements:
    """The statements the factory's async engine sends while it is installed."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, *args: Any) -> None:
        self.sent.append(args[2])


@pytest.fixture
def statements(lazy: Lazy) -> Iterator[Statements]:
    seen = Statements()
    engine = lazy.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    yield seen
    event.remove(engine, "before_cursor_execute", seen)


def checked_out(lazy: Lazy) -> int:
    pool: Any = lazy.db.engine.pool
    return int(pool.checkedout())


# One scenario per kind of implicit load: how to get the object, which attribute, its
# loaded value, and what the message must say.
KINDS = [
    pytest.param("addresses", "User.addresses is not loaded", id="one-to-many"),
    pytest.param("user", "Address.user is not loaded", id="many-to-one"),
    pytest.param("name", "User.name is expired", id="expired-column"),
    pytest.param("bio", "User.bio is deferred", id="deferred-column"),
]


def loaded(value: Any) -> Any:
    """An attribute's value in a form to compare: emails, a user's name, or the value."""
    if isinstance(value, list):
        return [address.email for address in value]
    return getattr(value, "name", value)


EXPECTED = {
    "addresses": ["ada@a.test", "ada@b.test"],
    "user": "ada",
    "name": "ada",
    "bio": "analyst",
}

FIXES = {
    "addresses": [
        "select(User).options(selectinload(User.addresses))",
        "await obj.awaitable_attrs.addresses",
        'await session.refresh(obj, ["addresses"])',
    ],
    "user": [
        "selectinload(Address.user)",
        "await obj.awaitable_attrs.user",
        'await session.refresh(obj, ["user"])',
    ],
    "name": [
        "await session.refresh(obj)",
        'await session.refresh(obj, ["name"])',
        "await obj.awaitable_attrs.name",
        "expire_on_commit=False",
    ],
    "bio": [
        "select(User).options(undefer(User.bio))",
        "await obj.awaitable_attrs.bio",
        'await session.refresh(obj, ["bio"])',
    ],
}


async def _object_of(lazy: Lazy, session: Any, attribute: str) -> Any:
    """The object whose ``attribute`` is not loaded, the session's connection given back."""
    if attribute == "user":
        found = await session.get(lazy.Address, 1)  # its user is not in the identity map
    else:
        found = await session.get(lazy.User, 1)
    await session.commit()  # expires it with expire_on_commit=True (the "name" case)
    return found


@pytest.mark.parametrize(("attribute", "what"), KINDS)
async def test_an_implicit_load_on_the_event_loop_raises_before_any_io(
    lazy: Lazy, statements: Statements, attribute: str, what: str
) -> None:
    async with lazy.db(expire_on_commit=attribute == "name") as session:
        obj = await _object_of(lazy, session, attribute)
        assert checked_out(lazy) == 0
        statements.sent.clear()

        with pytest.raises(LazyLoadError) as raised:
            getattr(obj, attribute)

        assert statements.sent == []
        assert checked_out(lazy) == 0
        message = str(raised.value)
        assert message.startswith(what)
        assert "IO on the event loop" in message
        assert "nothing was sent to the database" in message
        for fix in FIXES[attribute]:
            assert fix in message
        assert isinstance(raised.value, MissingGreenlet)
        assert isinstance(raised.value, SessionForgeError)

        # The session is as it was: the next awaited load works.
        assert loaded(await getattr(obj.awaitable_attrs, attribute)) == EXPECTED[attribute]


@pytest.mark.parametrize(("attribute", "what"), KINDS)
async def test_the_same_loads_work_in_run_sync_and_in_the_sync_twin(
    lazy: Lazy, attribute: str, what: str
) -> None:
    async with lazy.db(expire_on_commit=attribute == "name") as session:
        obj = await _object_of(lazy, session, attribute)
        assert (
            loaded(await session.run_sync(lambda _: getattr(obj, attribute)))
            == (EXPECTED[attribute])
        )

    def in_the_sync_twin() -> Any:
        with lazy.db.sync(expire_on_commit=attribute == "name") as sync:
            model = lazy.Address if attribute == "user" else lazy.User
            found = sync.get(model, 1)
            sync.commit()
            return loaded(getattr(found, attribute))

    assert await asyncio.to_thread(in_the_sync_twin) == EXPECTED[attribute]
    with lazy.db.sync(expire_on_commit=attribute == "name") as sync:  # on the loop's thread
        found = sync.get(lazy.Address if attribute == "user" else lazy.User, 1)
        sync.commit()
        assert loaded(getattr(found, attribute)) == EXPECTED[attribute]


async def test_the_transaction_stays_usable_and_nothing_was_flushed(
    lazy: Lazy, statements: Statements
) -> None:
    async with lazy.db.begin() as session:
        user = await session.get(lazy.User, 1)
        session.add(lazy.Address(id=3, email="ada@c.test", user_id=1))  # pending
        statements.sent.clear()

        with pytest.raises(LazyLoadError, match=r"^User\.addresses is not loaded"):
            user.addresses  # noqa: B018

        assert statements.sent == []  # not even the autoflush of the pending address
        total = await session.scalar(select(func.count()).select_from(lazy.Address))
        assert total == 3  # the awaited query autoflushed, in the same transaction
    async with lazy.db() as session:
        user = await session.get(lazy.User, 1)
        await session.refresh(user, ["addresses"])
        assert [address.id for address in user.addresses] == [1, 2, 3]


async def test_a_loaded_or_identity_mapped_attribute_needs_no_io_and_raises_nothing(
    lazy: Lazy, statements: Statements
) -> None:
    async with lazy.db() as session:
        address = await session.get(lazy.Address, 1)
        user = await session.get(lazy.User, 1)  # the many-to-one's target, in the identity map
        statements.sent.clear()
        assert address.user is user
        assert statements.sent == []


async def test_lazy_raise_and_detached_objects_keep_sqlalchemys_own_errors(lazy: Lazy) -> None:
    async with lazy.db() as session:
        user = await session.get(lazy.User, 1)
        with pytest.raises(InvalidRequestError, match="lazy='raise'") as raised:
            user.raising  # noqa: B018
        assert not isinstance(raised.value, LazyLoadError)
    with pytest.raises(DetachedInstanceError):
        user.addresses  # noqa: B018


async def test_a_model_without_async_attrs_is_told_to_add_them(lazy: Lazy) -> None:
    async with lazy.db() as session:
        tag = await session.get(lazy.Tag, 1)
        with pytest.raises(LazyLoadError) as raised:
            tag.label  # noqa: B018
    assert "select(Tag).options(undefer(Tag.label))" in str(raised.value)
    assert "with sqlalchemy.ext.asyncio.AsyncAttrs among the model's bases" in str(raised.value)


def test_readme_lazy_load_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "lazy_load.py"
    script.write_text(block_tested_by("tests/test_lazyload.py::test_readme_lazy_load_example"))
    runpy.run_path(str(script), run_name="readme_lazy_load")  # and its asserts pass

    printed = capsys.readouterr().out
    assert printed.startswith("User.addresses is not loaded")
    assert "select(User).options(selectinload(User.addresses))" in printed
