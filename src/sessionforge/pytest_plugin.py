"""The pytest plugin: each test's sessions isolated, the schema made once.

Registered through the ``pytest11`` entry point, so installing sessionforge is enough;
it does nothing until a test asks for one of its fixtures. Name the app's factory in
the pytest configuration::

    [tool.pytest.ini_options]
    sessionforge_factory = "myapp.db:db"            # a SessionFactory or SyncSessionFactory
    sessionforge_metadata = "myapp.models:Base.metadata"   # optional: the schema
    sessionforge_alembic_ini = "alembic.ini"        # or: the schema from your migrations

(or ``--sessionforge-factory`` / ``--sessionforge-metadata`` /
``--sessionforge-alembic-ini`` on the command line, or override the
``sessionforge_factory`` / ``sessionforge_metadata`` fixtures). Fixtures:

- ``sessionforge_isolation``: the ``isolated()`` handle for the test (``.hooks``,
  ``.run_hooks()``); every session of the factory, wherever made, is rolled back at the
  end of the test.
- ``sessionforge_db``: the factory itself, isolated for the test.
- ``sessionforge_session``: a session of it, closed after the test.
- ``sessionforge_schema``: (session scope) the schema, created once before the first
  test that needs it — from a ``MetaData`` (dropped again at the end) or from a
  callable given a sync ``Connection`` in a transaction; or, when
  ``sessionforge_alembic_ini`` names an ``alembic.ini`` (relative to the pytest
  configuration file), by ``alembic upgrade head``, instead of the metadata. Its
  ``env.py`` is given the test factory (``sessionforge.alembic.FACTORY_ATTRIBUTE``), so
  ``run_migrations`` builds the schema where the tests run. At the end ``alembic
  downgrade base`` runs (the downgrades are tested too), and the tables the upgrade made
  that are still there (the version table) are dropped.

All fixtures are plain (sync) fixtures: they work with or without pytest-asyncio, in
strict and auto mode, whatever the event loop scope of the test, and in sync tests
using Starlette's ``TestClient``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, inspect
from sqlalchemy.engine import Connection, Engine

from ._internal.environment import import_object
from ._internal.loops import run_on_own_loop
from .errors import ConfigurationError
from .factory import SessionFactory
from .sync import SyncSessionFactory
from .testing import AsyncIsolation, SyncIsolation, isolated

__all__ = [
    "sessionforge_db",
    "sessionforge_factory",
    "sessionforge_isolation",
    "sessionforge_metadata",
    "sessionforge_schema",
    "sessionforge_session",
]

Factory = SessionFactory[Any] | SyncSessionFactory[Any]
Schema = MetaData | Callable[[Connection], object] | None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sessionforge", "sessionforge test isolation")
    group.addoption(
        "--sessionforge-factory",
        dest="sessionforge_factory",
        default=None,
        metavar="MODULE:NAME",
        help="the app's session factory, e.g. myapp.db:db",
    )
    group.addoption(
        "--sessionforge-metadata",
        dest="sessionforge_metadata",
        default=None,
        metavar="MODULE:NAME",
        help="the MetaData (or a callable taking a Connection) that creates the schema",
    )
    group.addoption(
        "--sessionforge-alembic-ini",
        dest="sessionforge_alembic_ini",
        default=None,
        metavar="PATH",
        help="an alembic.ini: the schema is made by alembic upgrade head instead",
    )
    parser.addini("sessionforge_factory", "the app's session factory, as module:name")
    parser.addini("sessionforge_metadata", "the schema's MetaData (or a callable), as module:name")
    parser.addini(
        "sessionforge_alembic_ini",
        "an alembic.ini whose migrations make the schema (alembic upgrade head), instead of "
        "sessionforge_metadata; relative to this file",
    )
    parser.addini(
        "sessionforge_run_hooks",
        "run on-commit hooks at commit in isolated tests instead of capturing them",
        type="bool",
        default=False,
    )


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


def _resolve(spec: str, setting: str) -> Any:
    """``"package.module:attr.attr"`` → the object."""
    try:
        return import_object(spec)
    except ConfigurationError as exc:
        raise pytest.UsageError(f"{setting} = {spec!r}: {exc}") from None


@pytest.fixture(scope="session")
def sessionforge_factory(pytestconfig: pytest.Config) -> Factory:
    """The app's factory, named by ``sessionforge_factory`` (override to build your own)."""
    spec = _setting(pytestconfig, "sessionforge_factory")
    if spec is None:
        raise pytest.UsageError(
            "sessionforge's fixtures need the app's factory: set sessionforge_factory = "
            '"myapp.db:db" in the pytest configuration, pass --sessionforge-factory, or '
            "override the sessionforge_factory fixture"
        )
    factory = _resolve(spec, "sessionforge_factory")
    if not isinstance(factory, SessionFactory | SyncSessionFactory):
        raise pytest.UsageError(
            f"sessionforge_factory = {spec!r} is a {type(factory).__name__}, not a "
            "SessionFactory or SyncSessionFactory"
        )
    return factory


@pytest.fixture(scope="session")
def sessionforge_metadata(pytestconfig: pytest.Config) -> Schema:
    """What creates the schema: a ``MetaData``, a callable, or ``None`` (nothing to do)."""
    spec = _setting(pytestconfig, "sessionforge_metadata")
    if spec is None:
        return None
    schema = _resolve(spec, "sessionforge_metadata")
    if not isinstance(schema, MetaData) and not callable(schema):
        raise pytest.UsageError(
            f"sessionforge_metadata = {spec!r} is a {type(schema).__name__}, not a MetaData "
            "or a callable taking a Connection"
        )
    return schema  # type: ignore[no-any-return]


def _alembic_ini(config: pytest.Config) -> Path | None:
    """``sessionforge_alembic_ini``: from the command line (relative to the directory
    pytest was started in) or the configuration file (relative to that file)."""
    given = config.getoption("sessionforge_alembic_ini")
    base = config.invocation_params.dir
    if not given:
        given = config.getini("sessionforge_alembic_ini")
        base = config.inipath.parent if config.inipath is not None else config.rootpath
    if not given:
        return None
    path = base / str(given)
    if not path.is_file():
        raise pytest.UsageError(f"sessionforge_alembic_ini = {given!r}: no file at {path}")
    return path


@pytest.fixture(scope="session")
def sessionforge_schema(
    sessionforge_factory: Factory, sessionforge_metadata: Schema, pytestconfig: pytest.Config
) -> Iterator[None]:
    """Create the schema once, through the factory's sync twin (no event loop needed)."""
    ini = _alembic_ini(pytestconfig)
    if ini is not None:
        yield from _migrated_schema(sessionforge_factory, ini)
    elif sessionforge_metadata is not None:
        yield from _created_schema(sessionforge_factory, sessionforge_metadata)
    else:
        yield


def _sync_twin(factory: Factory) -> SyncSessionFactory[Any]:
    return factory.sync if isinstance(factory, SessionFactory) else factory


def _created_schema(
    factory: Factory, schema: MetaData | Callable[[Connection], object]
) -> Iterator[None]:
    """``create_all`` (or the callable) before, ``drop_all`` (for a ``MetaData``) after."""
    sync = _sync_twin(factory)
    engine: Engine = sync.engine
    with engine.begin() as connection:
        if isinstance(schema, MetaData):
            schema.create_all(connection)
        else:
            schema(connection)
    yield
    if isinstance(schema, MetaData):
        with engine.begin() as connection:
            schema.drop_all(connection)
    sync.dispose()


def _migrated_schema(factory: Factory, ini: Path) -> Iterator[None]:
    """``alembic upgrade head`` on ``factory``; ``downgrade base`` and leftovers dropped after."""
    try:
        from alembic import command
        from alembic.config import Config

        from .alembic import FACTORY_ATTRIBUTE
    except ImportError as error:
        raise pytest.UsageError(f"sessionforge_alembic_ini is set, but {error}") from None
    config = Config(str(ini))
    config.attributes[FACTORY_ATTRIBUTE] = factory
    sync = _sync_twin(factory)
    engine: Engine = sync.engine
    existing = set(inspect(engine).get_table_names())
    command.upgrade(config, "head")
    yield
    command.downgrade(config, "base")
    with engine.begin() as connection:
        left = set(inspect(connection).get_table_names()) - existing
        if left:
            made = MetaData()
            made.reflect(connection, only=sorted(left))
            made.drop_all(connection)
    sync.dispose()


@pytest.fixture
def sessionforge_isolation(
    sessionforge_factory: Factory, sessionforge_schema: None, pytestconfig: pytest.Config
) -> Iterator[AsyncIsolation[Any] | SyncIsolation[Any]]:
    """The test's ``isolated()`` handle: everything is rolled back after the test."""
    run_hooks = bool(pytestconfig.getini("sessionforge_run_hooks"))
    with isolated(sessionforge_factory, run_hooks=run_hooks) as iso:
        yield iso


@pytest.fixture
def sessionforge_db(sessionforge_isolation: AsyncIsolation[Any] | SyncIsolation[Any]) -> Any:
    """The app's factory, isolated for this test."""
    return sessionforge_isolation.factory


@pytest.fixture
def sessionforge_session(
    sessionforge_isolation: AsyncIsolation[Any] | SyncIsolation[Any],
) -> Iterator[Any]:
    """A session of the isolated factory (async or sync, as the factory), closed after."""
    session = sessionforge_isolation.factory()
    try:
        yield session
    finally:
        if isinstance(sessionforge_isolation, AsyncIsolation):
            # Not the loop pytest-asyncio may have set (or be running): one of its own.
            run_on_own_loop(session.close)
        else:
            session.close()
