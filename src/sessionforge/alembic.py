"""Alembic migrations through a sessionforge factory: ``run_migrations`` for ``env.py``.

The whole ``env.py`` of an app::

    from myapp.db import Base, db
    from sessionforge.alembic import run_migrations

    run_migrations(db, target_metadata=Base.metadata)

Online (``alembic upgrade head``) the migrations run on a connection of the factory's
own engine, so its presets apply (SQLite pragmas, PgBouncer settings, timeouts). Offline
(``alembic upgrade head --sql``) Alembic prints the SQL for the factory's URL (its sync
twin's, ``db.sync.url``) and nothing connects.

**Which engine, which loop.** A ``SyncSessionFactory`` (``db.sync``) migrates on its
engine, in the calling thread. A ``SessionFactory`` migrates on its async engine, through
``AsyncConnection.run_sync`` (Alembic's own asyncio recipe), on a fresh event loop of its
own: in the calling thread when no loop is running there (Alembic's CLI, the pytest
plugin), else in a worker thread while the caller waits (``command.upgrade`` called from
an app's startup: the app's loop is blocked for the migration, as by any sync call). The
fresh loop gets the factory's engine for that loop, disposed when the loop ends. Two
exceptions: an in-memory SQLite factory (``sqlite://``) migrates through its sync twin,
whose connection keeps the database alive (an engine disposed with its loop would take
the database with it); and a factory built on an ``AsyncEngine`` of yours, which has no
per-loop engines, should be given as ``db.sync`` (or migrated before the app's loop uses
it), since its pooled connections belong to the loop that opened them.

**SQLite.** Migrations run with foreign-key enforcement off and ``PRAGMA
foreign_key_check`` after them: batch mode (``render_as_batch=True`` by default here)
recreates a table to change it, and a ``DROP TABLE`` with enforcement on would fire its
children's ``ON DELETE`` actions — their rows deleted. Rows left pointing nowhere raise
``MigrationError`` naming the tables. The whole run is one transaction on SQLite
(``transactional_ddl=True`` by default: SQLite's DDL is transactional), so that error
rolls it back.

Every other keyword argument goes to Alembic's ``context.configure`` as given
(``compare_type``, ``version_table``, ``include_object``, ``transaction_per_migration``,
``render_as_batch=False``, ...).

**Tests.** The pytest plugin (``sessionforge_alembic_ini``) runs ``env.py`` with its own
factory in ``config.attributes["sessionforge_factory"]`` (``FACTORY_ATTRIBUTE``); a
factory found there is migrated instead of ``db``, so the schema is built where the
tests run. A program can hand one in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy import MetaData
from sqlalchemy.engine import URL, Connection

from . import dialects
from ._internal.loops import run_on_own_loop
from ._internal.migrations import check_foreign_keys, foreign_keys_off
from .errors import ConfigurationError
from .errors import MigrationError as MigrationError
from .factory import SessionFactory
from .sync import SyncSessionFactory

try:
    from alembic import context
except ImportError as error:
    raise ImportError(
        "sessionforge.alembic needs Alembic: pip install 'sessionforge[alembic]'"
    ) from error

__all__ = ["FACTORY_ATTRIBUTE", "MigrationError", "run_migrations"]

#: The key of ``alembic.config.Config.attributes`` under which a factory replaces
#: ``run_migrations``'s ``db`` (the pytest plugin puts its factory there).
FACTORY_ATTRIBUTE: Final = "sessionforge_factory"

Factory = SessionFactory[Any] | SyncSessionFactory[Any]
TargetMetadata = MetaData | Sequence[MetaData] | None

#: ``context.configure`` arguments run_migrations sets itself.
_OWN_ARGUMENTS = ("connection", "url", "dialect_name")


def run_migrations(
    db: Factory, *, target_metadata: TargetMetadata = None, **configure_options: Any
) -> None:
    """Run Alembic's migrations (online or ``--sql``) through ``db``; call it in env.py.

    ``target_metadata`` is the models' ``MetaData`` (for ``--autogenerate``);
    ``configure_options`` go to ``context.configure``. On SQLite, ``render_as_batch``
    and ``transactional_ddl`` default to True, and the run ends with ``PRAGMA
    foreign_key_check`` (``MigrationError`` for rows left pointing nowhere).

    Example (``env.py``)::

        from myapp.db import Base, db
        from sessionforge.alembic import run_migrations

        run_migrations(db, target_metadata=Base.metadata, compare_server_default=True)
    """
    factory = context.config.attributes.get(FACTORY_ATTRIBUTE, db)
    if not isinstance(factory, SessionFactory | SyncSessionFactory):
        raise ConfigurationError(
            f"run_migrations() needs a SessionFactory or SyncSessionFactory, not a "
            f"{type(factory).__name__}: pass your app's factory (db or db.sync)"
        )
    given = sorted(set(_OWN_ARGUMENTS).intersection(configure_options))
    if given:
        raise ConfigurationError(
            f"run_migrations() sets {', '.join(given)} from the factory: leave "
            f"{'it' if len(given) == 1 else 'them'} out (give the factory the database instead)"
        )
    if context.is_offline_mode():
        _offline(_offline_url(factory), target_metadata, configure_options)
    elif isinstance(factory, SyncSessionFactory):
        with factory.engine.connect() as connection:
            _online(connection, target_metadata, configure_options)
    elif dialects.is_memory_sqlite(factory.url):
        with factory.sync.engine.connect() as connection:
            _online(connection, target_metadata, configure_options)
    else:
        run_on_own_loop(lambda: _online_async(factory, target_metadata, configure_options))


async def _online_async(
    factory: SessionFactory[Any], target_metadata: TargetMetadata, options: dict[str, Any]
) -> None:
    async with factory.engine.connect() as connection:
        await connection.run_sync(_online, target_metadata, options)


def _with_defaults(url: URL, options: dict[str, Any]) -> dict[str, Any]:
    if not dialects.is_sqlite(url):
        return options
    return {"render_as_batch": True, "transactional_ddl": True, **options}


def _online(
    connection: Connection, target_metadata: TargetMetadata, options: dict[str, Any]
) -> None:
    options = _with_defaults(connection.engine.url, options)
    if not dialects.is_sqlite(connection.engine.url):
        context.configure(connection=connection, target_metadata=target_metadata, **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    one_transaction = options["transactional_ddl"] and not options.get(
        "transaction_per_migration", False
    )
    with foreign_keys_off(connection):
        context.configure(connection=connection, target_metadata=target_metadata, **options)
        with context.begin_transaction():
            context.run_migrations()
            check_foreign_keys(connection, rolled_back=bool(one_transaction))


def _offline_url(factory: Factory) -> URL:
    """The sync twin's URL (the DDL is the same; no driver is loaded to print it)."""
    if isinstance(factory, SyncSessionFactory):
        return factory.url
    try:
        return factory.sync.url
    except ConfigurationError:  # no sync twin (an AsyncConnection) or no sync driver
        return factory.url


def _offline(url: URL, target_metadata: TargetMetadata, options: dict[str, Any]) -> None:
    options = {
        "literal_binds": True,
        "dialect_opts": {"paramstyle": "named"},
        **_with_defaults(url, options),
    }
    context.configure(url=url, target_metadata=target_metadata, **options)
    with context.begin_transaction():
        context.run_migrations()
