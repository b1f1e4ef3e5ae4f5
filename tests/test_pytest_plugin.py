"""The pytest plugin, tested as a user meets it: a generated project run by ``pytester``.

The generated tests commit rows through the app's factory and expect to start from an
empty table, so they fail if any test's rows survive it; they run in both orders, with
pytest-asyncio in strict and auto mode and each event loop scope. An autouse fixture of
the generated project looks from outside after each test: an independent connection
sees no rows and no engine of the factory has a connection checked out.
"""

from __future__ import annotations

import re
import shutil
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from textwrap import dedent

import pytest

# The pytester fixture drops every module first imported during its test when the test
# ends; SQLAlchemy's PostgreSQL dialect, imported again by a later test, would register
# its SQL functions twice (a SAWarning, an error here). Imported up front, it stays.
import sqlalchemy.dialects.postgresql  # noqa: F401
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig

from .conftest import MARIADB_URL, require_mariadb, require_postgres
from .databases import fresh_database

pytest_plugins = ["pytester"]

APP = """
import os

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import SessionFactory

PREFIX = os.environ["MYAPP_PREFIX"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"{PREFIX}_item"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


db = SessionFactory(os.environ["MYAPP_DATABASE_URL"])
"""

CONFTEST = """
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from myapp import Item, db


@pytest.fixture(autouse=True)
def seen_from_outside():
    yield  # set up first, so torn down after the isolation
    engine = create_engine(db.config.sync_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(f"SELECT count(*) FROM {Item.__tablename__}"))
            assert rows.scalar_one() == 0, "a test's rows survived it"
    finally:
        engine.dispose()
    for status in (db.status(), db.sync.status()):
        assert all(e.checked_out == 0 for e in status.engines), "a connection left out"
"""

ASYNC_TESTS = """
import asyncio

import pytest
from sqlalchemy import func, select

import sessionforge
from myapp import Item

LOOP = "{loop}"


async def count(db):
    async with db() as session:
        return await session.scalar(select(func.count()).select_from(Item))


@pytest.mark.asyncio(loop_scope=LOOP)
@pytest.mark.parametrize("name", ["a", "b", "c"])
async def test_commit_through_the_app_factory(sessionforge_db, name):
    assert await count(sessionforge_db) == 0
    async with sessionforge_db.begin() as session:
        session.add(Item(name=name))
    assert await count(sessionforge_db) == 1


@pytest.mark.asyncio(loop_scope=LOOP)
async def test_session_fixture_and_hooks(sessionforge_session, sessionforge_isolation):
    sessionforge_session.add(Item(name="hooked"))
    sessionforge.on_commit(sessionforge_session, lambda: None)
    await sessionforge_session.commit()
    assert len(sessionforge_isolation.hooks) == 1
    assert await sessionforge_isolation.run_hooks() == 1


def test_sync_test_running_the_app_in_its_own_loops(sessionforge_db):
    async def app(name):
        async with sessionforge_db.begin() as session:
            session.add(Item(name=name))

    asyncio.run(app("x"))
    asyncio.run(app("y"))
    assert asyncio.run(count(sessionforge_db)) == 2
"""

SYNC_TESTS = """
import pytest
from sqlalchemy import func, select

from myapp import Item


def count(db):
    with db() as session:
        return session.scalar(select(func.count()).select_from(Item))


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_commit_through_the_app_factory(sessionforge_db, name):
    assert count(sessionforge_db) == 0
    with sessionforge_db.begin() as session:
        session.add(Item(name=name))
    assert count(sessionforge_db) == 1


def test_session_fixture_and_hooks(sessionforge_session, sessionforge_isolation):
    sessionforge_session.add(Item(name="hooked"))
    sessionforge_session.on_commit(lambda: None)
    sessionforge_session.commit()
    assert sessionforge_isolation.run_hooks() == 1
"""

ASYNC_RUNS = [
    pytest.param(mode, loop, order, id=f"async-{mode}-{loop}-{order}")
    for mode, loop, order in [
        ("strict", "function", "forward"),
        ("strict", "module", "reverse"),
        ("strict", "session", "forward"),
        ("auto", "function", "reverse"),
        ("auto", "module", "forward"),
        ("auto", "session", "reverse"),
    ]
]
SYNC_RUNS = [
    pytest.param("strict", "function", order, id=f"sync-{order}")
    for order in ("forward", "reverse")
]
BACKENDS = [
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]


def test_the_plugin_is_registered_through_pytest11() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("sessionforge") == "sessionforge.pytest_plugin"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("mode", "loop", "order"), ASYNC_RUNS + SYNC_RUNS)
def test_generated_project_is_isolated_per_test(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    backend: str,
    mode: str,
    loop: str,
    order: str,
    request: pytest.FixtureRequest,
) -> None:
    twin = request.node.callspec.id.split("-")[0]
    url = f"sqlite:///{tmp_path / 'app.db'}"
    if backend == "postgres":
        require_postgres()
        url = "postgresql://postgres@127.0.0.1:5432/test"
    elif backend == "mysql":
        require_mariadb()
        url = MARIADB_URL
    prefix = f"sf_plugin_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MYAPP_DATABASE_URL", url)
    monkeypatch.setenv("MYAPP_PREFIX", prefix)
    factory = "myapp:db" if twin == "async" else "myapp:db.sync"
    pytester.makeini(
        dedent(f"""
        [pytest]
        asyncio_mode = {mode}
        asyncio_default_fixture_loop_scope = function
        sessionforge_factory = {factory}
        sessionforge_metadata = myapp:Base.metadata
        filterwarnings = error
        """)
    )
    pytester.makepyfile(myapp=APP, conftest=CONFTEST)
    tests = ASYNC_TESTS.format(loop=loop) if twin == "async" else SYNC_TESTS
    pytester.makepyfile(test_app=tests)
    pytester.syspathinsert()
    names = [
        "test_commit_through_the_app_factory[a]",
        "test_commit_through_the_app_factory[b]",
        "test_commit_through_the_app_factory[c]",
        "test_session_fixture_and_hooks",
    ]
    if twin == "async":
        names.append("test_sync_test_running_the_app_in_its_own_loops")
    if order == "reverse":
        names.reverse()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", *(f"test_app.py::{name}" for name in names)
    )
    result.assert_outcomes(passed=len(names))
    # The schema fixture dropped its tables at the end of the session.
    engine = create_engine(FactoryConfig.from_url(url).sync_url, poolclass=NullPool)
    try:
        assert not inspect(engine).has_table(f"{prefix}_item")
    finally:
        engine.dispose()


def test_without_a_factory_the_fixtures_say_what_to_configure(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_x="def test_x(sessionforge_db):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*sessionforge_factory*"])
    assert result.ret != 0


def test_the_plugin_leaves_other_test_suites_alone(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_x="def test_x():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=1)


# --- the README's "Testing your app" example, run as written ---------------------------

ROOT = Path(__file__).parent.parent


def readme_testing_section() -> str:
    """The section in the README, or in docs/ until it is placed there."""
    readme = (ROOT / "README.md").read_text()
    if "## Testing your app" in readme:
        return readme.split("## Testing your app", 1)[1].split("\n## ", 1)[0]
    return (ROOT / "docs" / "testing-readme-section.md").read_text()


def example_files() -> dict[str, str]:
    """The section's code blocks that start with a ``# filename`` comment."""
    files: dict[str, str] = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", readme_testing_section(), re.DOTALL):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and "." in first:
            files[first[2:].strip()] = rest
    return files


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_readme_fastapi_example_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, backend: str
) -> None:
    files = example_files()
    assert set(files) == {"myapp.py", "pyproject.toml", "test_myapp.py"}
    url = f"sqlite:///{tmp_path / 'app.db'}"
    if backend in ("postgres", "mysql"):
        if backend == "postgres":
            require_postgres()
            url = "postgresql://postgres@127.0.0.1:5432/test"
        else:
            require_mariadb()
            url = MARIADB_URL
        # The example's table is called "users": keep other runs' out of the way.
        engine = create_engine(FactoryConfig.from_url(url).sync_url, poolclass=NullPool)
        try:
            assert not inspect(engine).has_table("users"), "a stale users table"
        finally:
            engine.dispose()
    monkeypatch.setenv("DATABASE_URL", url)
    for name, text in files.items():
        (pytester.path / name).write_text(text)
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
    )
    result.assert_outcomes(passed=4)


# --- the schema from Alembic's migrations (sessionforge_alembic_ini) -----------------------

MIGRATED_ASYNC_TESTS = """
from sqlalchemy import func, select, text

from bookshop import Author, Book


async def test_the_schema_is_at_head(sessionforge_db):
    async with sessionforge_db.begin() as session:
        session.add(Author(id=1, name="n" * 150))  # too long before the second revision
        await session.flush()
        session.add(Book(author_id=1, title="The Dispossessed"))
    async with sessionforge_db() as session:
        assert await session.scalar(text("SELECT version_num FROM alembic_version")) == "{head}"
        assert await session.scalar(select(func.count()).select_from(Book)) == 1


async def test_the_next_test_starts_empty(sessionforge_db):
    async with sessionforge_db() as session:
        assert await session.scalar(select(func.count()).select_from(Author)) == 0
"""

MIGRATED_SYNC_TESTS = """
from sqlalchemy import func, select, text

from bookshop import Author, Book


def test_the_schema_is_at_head(sessionforge_db):
    with sessionforge_db.begin() as session:
        session.add(Author(id=1, name="n" * 150))  # too long before the second revision
        session.flush()
        session.add(Book(author_id=1, title="The Dispossessed"))
    with sessionforge_db() as session:
        assert session.scalar(text("SELECT version_num FROM alembic_version")) == "{head}"
        assert session.scalar(select(func.count()).select_from(Book)) == 1


def test_the_next_test_starts_empty(sessionforge_db):
    with sessionforge_db() as session:
        assert session.scalar(select(func.count()).select_from(Author)) == 0
"""


@pytest.mark.parametrize(
    ("backend", "twin"),
    [
        pytest.param("sqlite-file", "async", id="sqlite-file-async"),
        pytest.param("sqlite-file", "sync", id="sqlite-file-sync"),
        pytest.param("postgres", "async", id="postgres-async", marks=pytest.mark.postgres),
        pytest.param("mysql", "async", id="mysql-async", marks=pytest.mark.mysql),
        pytest.param("mysql", "sync", id="mysql-sync", marks=pytest.mark.mysql),
    ],
)
def test_the_schema_from_alembic_migrations(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    backend: str,
    twin: str,
) -> None:
    with fresh_database(backend, tmp_path) as url:
        monkeypatch.setenv("DATABASE_URL", url)
        shutil.copytree(
            ROOT / "examples" / "alembic",
            pytester.path / "migrations",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        pytester.makeini(
            dedent(f"""
            [pytest]
            asyncio_mode = auto
            asyncio_default_fixture_loop_scope = function
            pythonpath = migrations
            sessionforge_factory = {"bookshop:db" if twin == "async" else "bookshop:db.sync"}
            sessionforge_alembic_ini = migrations/alembic.ini
            filterwarnings = error
            """)
        )
        tests = MIGRATED_ASYNC_TESTS if twin == "async" else MIGRATED_SYNC_TESTS
        pytester.makepyfile(test_app=tests.replace("{head}", "b8e4d6c2a531"))
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(passed=2)
        # Downgraded at the end of the session, and the version table dropped.
        engine = create_engine(FactoryConfig.from_url(url).sync_url, poolclass=NullPool)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()


def test_an_alembic_ini_that_is_not_there_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "sessionforge_factory = myapp:db\nsessionforge_alembic_ini = nowhere/alembic.ini\n"
    )
    pytester.makepyfile(myapp="from sessionforge import SessionFactory\ndb = SessionFactory()\n")
    pytester.makepyfile(test_x="def test_x(sessionforge_db):\n    pass\n")
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*sessionforge_alembic_ini = 'nowhere/alembic.ini': no file at*"])
    assert result.ret != 0


def test_a_factory_setting_naming_nothing_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "sessionforge_factory = myapp:dbb\n"
    )
    pytester.makepyfile(myapp="from sessionforge import SessionFactory\ndb = SessionFactory()\n")
    pytester.makepyfile(test_x="def test_x(sessionforge_db):\n    pass\n")
    pytester.syspathinsert()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        ["*sessionforge_factory = 'myapp:dbb': module 'myapp' has no attribute 'dbb'*"]
    )
    assert result.ret != 0
