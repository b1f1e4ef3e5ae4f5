"""Shared fixtures: one URL per backend, factories that are disposed, per-test tables.

Every database behaviour runs against a SQLite file, SQLite in memory, PostgreSQL and
MariaDB. PostgreSQL comes from SESSIONFORGE_TEST_POSTGRES_URL, MariaDB from
SESSIONFORGE_TEST_MARIADB_URL (defaults: the local servers); when a server cannot be
reached its cases are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig, SessionFactory

from .models import Models, make_models

DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PG_URL = os.environ.get("SESSIONFORGE_TEST_POSTGRES_URL", DEFAULT_PG_URL)
DEFAULT_MARIADB_URL = "mysql+aiomysql://root@127.0.0.1:3306/test"
MARIADB_URL = os.environ.get("SESSIONFORGE_TEST_MARIADB_URL", DEFAULT_MARIADB_URL)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

BACKENDS = [
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("sqlite-memory", id="sqlite-memory"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]


def pytest_configure(config: pytest.Config) -> None:
    # The backend marks read by apply_backend_marks(), registered next to it.
    config.addinivalue_line(
        "markers",
        "skip_backend(name, reason, only={}): the behaviour cannot exist (or, said in the "
        "reason, cannot be checked) on that backend; its case of the backend fixture (those of "
        "its cases whose parameters have the values in only=) is skipped with the reason",
    )
    config.addinivalue_line(
        "markers",
        "xfail_backend(name, reason, run=True, only={}): sessionforge does not support this "
        "on that backend yet; its case of the backend fixture (those of its cases whose "
        "parameters have the values in only=) is a strict xfail",
    )


#: The reason for ``skip_backend("mysql", reason=NO_FAILING_COMMIT)``.
NO_FAILING_COMMIT = (
    "InnoDB has no deferred constraints (it checks a foreign key at each statement): "
    "no COMMIT can be made to fail on MariaDB"
)


def _unreachable(server: str, url_text: str, default_port: int) -> str | None:
    url = make_url(url_text)
    try:
        address = (url.host or "127.0.0.1", url.port or default_port)
        with socket.create_connection(address, timeout=2):
            return None
    except OSError as exc:
        return f"{server} at {url.render_as_string(hide_password=True)} unreachable: {exc}"


def _require(server: str, problem: str | None) -> None:
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"{problem}; CI=true requires the {server} tests to run")
    pytest.skip(problem)


def require_postgres() -> None:
    """Skip (locally) or fail (CI=true) when the PostgreSQL server is not there."""
    _require("PostgreSQL", _unreachable("PostgreSQL", PG_URL, 5432))


def require_mariadb() -> None:
    """Skip (locally) or fail (CI=true) when the MariaDB server is not there."""
    _require("MariaDB", _unreachable("MariaDB", MARIADB_URL, 3306))


@pytest.fixture
def pg_url() -> str:
    require_postgres()
    return PG_URL


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    apply_backend_marks(request, name)
    return name


def apply_backend_marks(request: pytest.FixtureRequest, name: str) -> None:
    """Skip or xfail this test's ``name`` case as its skip_/xfail_backend marks say."""
    params = getattr(request.node, "callspec", None)
    given = params.params if params is not None else {}

    def applies(mark: pytest.Mark) -> bool:
        only: dict[str, Any] = mark.kwargs.get("only", {})
        return name in mark.args and all(given.get(key) == value for key, value in only.items())

    for mark in request.node.iter_markers("skip_backend"):
        if applies(mark):
            pytest.skip(f"not on {name}: {mark.kwargs['reason']}")
    for mark in request.node.iter_markers("xfail_backend"):
        if applies(mark):
            xfail = pytest.mark.xfail(
                strict=True, reason=mark.kwargs["reason"], run=mark.kwargs.get("run", True)
            )
            request.applymarker(xfail)


# sqlite:// is sessionforge's own driver; SESSIONFORGE_TEST_SQLITE_DRIVER=aiosqlite runs the SQLite
# cases on aiosqlite instead (.ci/run runs a part of the suite that way).
SQLITE_DRIVER = os.environ.get("SESSIONFORGE_TEST_SQLITE_DRIVER", "")
SQLITE_SCHEME = f"sqlite+{SQLITE_DRIVER}" if SQLITE_DRIVER else "sqlite"


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> str:
    """A database URL for ``backend``, as a user would write it."""
    if backend == "sqlite-file":
        return f"{SQLITE_SCHEME}:///{tmp_path / 'test.db'}"
    if backend == "sqlite-memory":
        return f"{SQLITE_SCHEME}://"
    if backend == "mysql":
        require_mariadb()
        return MARIADB_URL
    require_postgres()
    return PG_URL


@pytest.fixture
def prefix() -> str:
    """A table-name prefix of this test's own (the server databases are shared)."""
    return f"sf_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def models(prefix: str) -> Models:
    return make_models(prefix)


FactoryMaker = Callable[..., SessionFactory[Any]]


@pytest.fixture
async def make_factory(db_url: str) -> AsyncIterator[FactoryMaker]:
    """Build factories on this test's database; every one is disposed at teardown."""
    made: list[SessionFactory[Any]] = []

    def make(target: str | FactoryConfig | None = None, **options: Any) -> SessionFactory[Any]:
        factory: SessionFactory[Any] = SessionFactory(target or db_url, **options)
        made.append(factory)
        return factory

    yield make
    for factory in made:
        await factory.dispose()


DbMaker = Callable[..., Awaitable[SessionFactory[Any]]]


@pytest.fixture
async def make_db(make_factory: FactoryMaker, models: Models) -> AsyncIterator[DbMaker]:
    """Factories (options as ``make_factory``) with this test's tables created.

    The tables are dropped again at teardown, before the factories are disposed.
    """
    made: list[SessionFactory[Any]] = []

    async def make(
        target: str | FactoryConfig | None = None, **options: Any
    ) -> SessionFactory[Any]:
        factory = make_factory(target, **options)
        async with factory.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        made.append(factory)
        return factory

    yield make
    for factory in made:
        async with factory.engine.begin() as connection:
            await connection.run_sync(models.metadata.drop_all)


@pytest.fixture
async def db(make_db: DbMaker) -> SessionFactory[Any]:
    """A factory with this test's tables created (and dropped again at teardown)."""
    return await make_db()


@pytest.fixture
def outside(db: SessionFactory[Any]) -> Iterator[Engine]:
    """An engine of its own (no pool, no presets) to look at the database from outside."""
    engine = create_engine(db.config.sync_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def count_rows(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.fixture(scope="session")
def password_server() -> Iterator[Any]:
    """A private PostgreSQL that asks for ``pgcluster.LOGIN``'s password (the shared
    server trusts every connection), one for the whole run."""
    from .pgcluster import LOGIN, private_postgres  # (pgcluster imports this module)

    with private_postgres(login=LOGIN) as server:
        yield server
