"""The twins expose the same public methods with the same parameters (issue 11, item 14).

A difference is allowed only where it is listed here with its reason (and documented
in the README); anything else is drift, like the ``ping(timeout=)`` the sync twin once
lacked.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from sessionforge import ConfigurationError, SessionFactory, SyncSessionFactory

from .conftest import FactoryMaker

# name -> why only one twin has it
ASYNC_ONLY = {
    "__aenter__": "async with db: disposes the engines (the sync twin: with sdb:)",
    "__aexit__": "as __aenter__",
    "dependency": "FastAPI dependencies are async",
    "lifespan": "an ASGI lifespan is async",
    "sync": "the async factory's sync twin",
}
SYNC_ONLY = {
    "__enter__": "with sdb: disposes the sync engine",
    "__exit__": "as __enter__",
}


def surface(cls: type) -> dict[str, list[tuple[str, str, object]] | str]:
    """Public members: a property, or a callable's (name, kind, default) parameters."""
    members: dict[str, list[tuple[str, str, object]] | str] = {}
    for name in dir(cls):
        if name.startswith("_") and name not in (
            "__call__",
            "__enter__",
            "__exit__",
            "__aenter__",
            "__aexit__",
        ):
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, property):
            members[name] = "property"
            continue
        value = getattr(cls, name)
        if not callable(value):
            continue
        if name in ("__enter__", "__exit__", "__aenter__", "__aexit__") and (
            name not in vars(cls)
        ):
            continue
        parameters = inspect.signature(value).parameters.values()
        members[name] = [(p.name, p.kind.name, p.default) for p in parameters]
    return members


def test_the_twins_have_the_same_methods_and_parameters() -> None:
    async_surface = surface(SessionFactory)
    sync_surface = surface(SyncSessionFactory)
    assert sorted(async_surface.keys() - sync_surface.keys()) == sorted(ASYNC_ONLY)
    assert sorted(sync_surface.keys() - async_surface.keys()) == sorted(SYNC_ONLY)
    for name in sorted(async_surface.keys() & sync_surface.keys()):
        assert async_surface[name] == sync_surface[name], name


@pytest.mark.parametrize(
    "timeout",
    [0, -1, float("nan"), float("inf"), 10**400, "1", True, None],
    ids=["0", "-1", "nan", "inf", "huge-int", "str", "bool", "None"],
)
async def test_ping_timeout_is_validated_on_both_twins(timeout: Any) -> None:
    db = SessionFactory("sqlite://")
    with pytest.raises(ConfigurationError, match=r"ping\(timeout="):
        await db.ping(timeout=timeout)
    with pytest.raises(ConfigurationError, match=r"ping\(timeout="):
        db.sync.ping(timeout=timeout)
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", ["async", "sync"])
async def test_ping_with_timeout_on_both_twins(twin: str, make_factory: FactoryMaker) -> None:
    db = make_factory()
    if twin == "async":
        seconds = await db.ping(timeout=5)
        assert db.status().checked_out == 0
    else:
        seconds = db.sync.ping(timeout=5)
        assert db.sync.status().checked_out == 0
        db.sync.dispose()
    assert 0 < seconds < 5
