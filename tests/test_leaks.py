"""Leaks reported: a session collected while holding a connection says so, and where."""

from __future__ import annotations

import gc
import logging
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SAWarning

from sessionforge import SessionFactory

from .conftest import FactoryMaker


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def leak_a_sync_session(db: SessionFactory[Any]) -> None:
    session = db.sync()
    session.execute(text("SELECT 1"))  # holds a connection, in an open transaction
    # returns without closing: the session is dropped here


async def test_closed_sessions_are_freed_at_once_without_the_cycle_collector(
    make_factory: FactoryMaker, no_automatic_gc: None
) -> None:
    """So a properly closed session can never warn in some unrelated later test."""
    db = make_factory()
    async with db.begin() as session:
        await session.execute(text("SELECT 1"))
        session.on_commit(lambda: None)
    sync_ref = weakref.ref(session.sync_session)
    async_ref = weakref.ref(session)
    del session
    assert async_ref() is None
    assert sync_ref() is None  # refcounting alone freed it: it was in no cycle

    with db.sync.begin() as sync_session:
        sync_session.execute(text("SELECT 1"))
    twin_ref = weakref.ref(sync_session)
    del sync_session
    assert twin_ref() is None


async def test_leaked_session_warns_with_its_origin(make_factory: FactoryMaker) -> None:
    db = make_factory(track_session_origin=True)
    with pytest.warns(ResourceWarning, match="garbage-collected while holding") as caught:
        leak_a_sync_session(db)
        gc.collect()
    ours = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "it was made at" in message
    assert "leak_a_sync_session" in message  # the creation site is named
    assert "close every session" in message
    assert db.sync.status().checked_out == 0  # the pool got its connection back


async def test_without_origin_tracking_the_warning_says_how_to_get_it(
    make_factory: FactoryMaker,
) -> None:
    db = make_factory()
    with pytest.warns(ResourceWarning, match="track_session_origin=True"):
        leak_a_sync_session(db)
        gc.collect()


async def test_a_leak_collected_under_warnings_as_errors_is_logged_not_raised(
    make_factory: FactoryMaker, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        # SQLAlchemy's own pool warning about the same connection is not ours to tame.
        warnings.simplefilter("ignore", SAWarning)
        with caplog.at_level(logging.ERROR, logger="sessionforge.sessions"):
            leak_a_sync_session(db)
            gc.collect()  # nothing raised into the collector
    assert "garbage-collected while holding" in caplog.text


async def test_sessions_that_never_touched_the_database_do_not_warn(
    make_factory: FactoryMaker,
) -> None:
    db = make_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = db()
        sync_session = db.sync()
        del session, sync_session
        gc.collect()
