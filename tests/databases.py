"""A database of a test's own, for tests whose table names are fixed (Alembic's).

The shared servers' ``test`` databases are used by parallel runs, each with table
prefixes of its own; a migration's tables (``author``, ``alembic_version``) have no
prefix, so those tests get a fresh database, dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig

from .conftest import MARIADB_URL, PG_URL, SQLITE_SCHEME, require_mariadb, require_postgres

__all__ = ["fresh_database"]


@contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL (as a user writes it) of an empty database for ``backend``, dropped after."""
    if backend == "sqlite-file":
        yield f"{SQLITE_SCHEME}:///{tmp_path / 'migrated.db'}"
        return
    if backend == "sqlite-memory":
        yield f"{SQLITE_SCHEME}://"
        return
    if backend == "postgres":
        require_postgres()
        server_url = PG_URL
    else:
        require_mariadb()
        server_url = MARIADB_URL
    name = f"sf_migrations_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        FactoryConfig.from_url(server_url).sync_url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            drop = f"DROP DATABASE {name}"
            with admin.connect() as connection:
                connection.exec_driver_sql(
                    f"{drop} WITH (FORCE)" if backend == "postgres" else drop
                )
    finally:
        admin.dispose()
