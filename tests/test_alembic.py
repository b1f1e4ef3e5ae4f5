"""Alembic migrations through a factory (``sessionforge.alembic``), with real Alembic.

The project is the repository's example (``examples/alembic``: env.py, two revisions,
the second a batch ``alter_column`` on the parent table), copied per test so revisions
can be added. Alembic's CLI runs it in a subprocess (online, and ``--sql`` printing DDL
without connecting); in-process runs cover the sync twin, the async factory with no
loop running, and the async factory called from inside a running loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import String, event, func, inspect, select, text
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import Engine

from sessionforge import ConfigurationError, SessionFactory
from sessionforge.alembic import FACTORY_ATTRIBUTE, MigrationError

from .databases import fresh_database
from .test_readme import block_tested_by

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "alembic"
ALEMBIC = Path(sys.executable).parent / "alembic"
FIRST, HEAD = "a3f1c2d7e9b1", "b8e4d6c2a531"
SERVER_BACKENDS = [
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]

# An env.py that hands the test's configure options through (the example's is fixed).
OPTIONS_ENV = """
from alembic import context
from bookshop import Base, db

from sessionforge.alembic import run_migrations

run_migrations(db, target_metadata=Base.metadata, **context.config.attributes["options"])
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the example project, free to gain revisions."""
    copy = tmp_path / "alembic"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.fixture
def url(backend: str, tmp_path: Path) -> Iterator[str]:
    with fresh_database(backend, tmp_path) as database_url:
        yield database_url


def config_for(project: Path, factory: Any, **options: Any) -> Config:
    config = Config(str(project / "alembic.ini"))
    config.attributes[FACTORY_ATTRIBUTE] = factory
    config.attributes["options"] = options
    return config


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def version(engine: Engine, table: str = "alembic_version") -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text(f"SELECT version_num FROM {table}")).scalars())


def name_length(engine: Engine) -> int:
    [column] = [c for c in inspect(engine).get_columns("author") if c["name"] == "name"]
    kind = column["type"]
    assert isinstance(kind, String)
    return int(kind.length or 0)


def add_books(engine: Engine, count: int) -> None:
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO author (id, name) VALUES (1, 'Ursula')"))
        for number in range(count):
            connection.execute(
                text("INSERT INTO book (author_id, title) VALUES (1, :title)"),
                {"title": f"book {number}"},
            )


def count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


# --- Alembic's CLI ----------------------------------------------------------------------


def alembic_cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [str(ALEMBIC), "-c", str(EXAMPLE / "alembic.ini"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


@pytest.mark.parametrize("backend", SERVER_BACKENDS)
def test_cli_upgrade_and_downgrade(url: str) -> None:
    upgraded = alembic_cli("upgrade", "head", database_url=url)
    assert upgraded.returncode == 0, upgraded.stderr
    db = SessionFactory(url)
    try:
        engine = db.sync.engine
        assert tables(engine) == {"alembic_version", "author", "book"}
        assert version(engine) == [HEAD]
        assert name_length(engine) == 200
        add_books(engine, 2)

        downgraded = alembic_cli("downgrade", "base", database_url=url)
        assert downgraded.returncode == 0, downgraded.stderr
        assert tables(engine) == {"alembic_version"}
        assert version(engine) == []
    finally:
        db.sync.dispose()


@pytest.mark.parametrize(
    ("database_url", "target", "expected"),
    [
        # Batch mode on SQLite needs a live connection to reflect the table it
        # recreates (or copy_from=), so the SQLite script stops at the first revision.
        pytest.param(
            "sqlite:////nonexistent/directory/app.db", FIRST, ["CREATE TABLE author"], id="sqlite"
        ),
        pytest.param(
            "postgresql://nobody@127.0.0.1:1/nothing",
            "head",
            ["CREATE TABLE author", "ALTER TABLE author ALTER COLUMN name TYPE VARCHAR(200)"],
            id="postgres",
        ),
        pytest.param(
            "mysql://nobody@127.0.0.1:1/nothing",
            "head",
            ["CREATE TABLE author", "ALTER TABLE author MODIFY name VARCHAR(200) NOT NULL"],
            id="mysql",
        ),
    ],
)
def test_cli_sql_prints_the_ddl_without_connecting(
    database_url: str, target: str, expected: list[str]
) -> None:
    # Nothing listens on port 1 and the SQLite file's directory does not exist: a
    # connection attempt would fail the command.
    result = alembic_cli("upgrade", target, "--sql", database_url=database_url)
    assert result.returncode == 0, result.stderr
    for statement in expected:
        assert statement in result.stdout
    assert f"INSERT INTO alembic_version (version_num) VALUES ('{FIRST}')" in result.stdout


# --- in process: the sync twin, the async factory without and inside a loop --------------


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_upgrade_and_downgrade_without_a_running_loop(project: Path, url: str, twin: str) -> None:
    db = SessionFactory(url)
    try:
        config = config_for(project, db.sync if twin == "sync" else db)
        command.upgrade(config, "head")
        engine = db.sync.engine
        assert version(engine) == [HEAD]
        assert name_length(engine) == 200
        command.downgrade(config, FIRST)
        assert version(engine) == [FIRST]
        assert name_length(engine) == 50
        command.downgrade(config, "base")
        assert tables(engine) == {"alembic_version"}
    finally:
        asyncio.run(db.dispose())


async def test_upgrade_and_downgrade_from_inside_a_running_loop(project: Path, url: str) -> None:
    # An app's startup calling Alembic's command API: run_migrations finds this loop
    # running and migrates on a loop of its own in a worker thread.
    db = SessionFactory(url)
    try:
        config = config_for(project, db)
        command.upgrade(config, "head")
        async with db() as session:
            assert await session.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
        command.downgrade(config, "base")
        async with db() as session:
            assert (
                await session.scalar(select(func.count()).select_from(text("alembic_version")))
                == 0
            )
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


# --- SQLite: foreign keys off during the migration, checked after ------------------------


@pytest.mark.parametrize("backend", ["sqlite-file", "sqlite-memory"])
def test_batch_alter_on_the_parent_keeps_the_child_rows(project: Path, url: str) -> None:
    db = SessionFactory(url)
    try:
        config = config_for(project, db)
        command.upgrade(config, FIRST)
        engine = db.sync.engine
        add_books(engine, 3)

        command.upgrade(config, "head")  # author recreated: copy, DROP TABLE, rename

        assert name_length(engine) == 200
        assert count(engine, "book") == 3
        # Enforcement is back on for the factory's connections, and the cascade the
        # DROP TABLE would have fired is real:
        with db.sync() as session:
            assert session.scalar(text("PRAGMA foreign_keys")) == 1
        with db.sync.begin() as session:
            session.execute(text("DELETE FROM author"))
        assert count(engine, "book") == 0
    finally:
        asyncio.run(db.dispose())


def test_without_the_guard_the_same_batch_alter_deletes_the_children(tmp_path: Path) -> None:
    # The control: Alembic on a plain engine with foreign keys enforced.
    engine = create_sync_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    event.listen(
        engine, "connect", lambda connection, _: connection.execute("PRAGMA foreign_keys = ON")
    )
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TABLE author (id INTEGER PRIMARY KEY, name VARCHAR(50))"
            )
            connection.exec_driver_sql(
                "CREATE TABLE book (id INTEGER PRIMARY KEY, title VARCHAR(200), author_id INTEGER "
                "REFERENCES author (id) ON DELETE CASCADE)"
            )
        add_books(engine, 3)
        with engine.begin() as connection:
            operations = Operations(MigrationContext.configure(connection))
            with operations.batch_alter_table("author") as batch:
                batch.alter_column("name", type_=String(200), existing_type=String(50))
        assert count(engine, "book") == 0
    finally:
        engine.dispose()


ORPHAN_REVISION = '''
"""leave an orphan"""

from alembic import op

revision = "c0ffee000001"
down_revision = "b8e4d6c2a531"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("INSERT INTO book (id, author_id, title) VALUES (7, 999, 'orphan')")


def downgrade() -> None:
    pass
'''


@pytest.mark.parametrize("backend", ["sqlite-file"])
def test_rows_left_pointing_nowhere_raise_and_roll_back(project: Path, url: str) -> None:
    (project / "versions" / "c0ffee000001_orphan.py").write_text(ORPHAN_REVISION)
    db = SessionFactory(url)
    try:
        config = config_for(project, db)
        command.upgrade(config, HEAD)
        with pytest.raises(MigrationError) as raised:
            command.upgrade(config, "head")
        message = str(raised.value)
        assert "1 row of table 'book' referring to missing rows of 'author'" in message
        assert "the migration was rolled back" in message
        assert raised.value.violations == [("book", 7, "author", 0)]
        engine = db.sync.engine
        assert version(engine) == [HEAD]
        assert count(engine, "book") == 0
    finally:
        asyncio.run(db.dispose())


# --- context.configure options -----------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "options", "batch"),
    [
        pytest.param("sqlite-file", {}, True, id="sqlite-batch-by-default"),
        pytest.param("sqlite-file", {"render_as_batch": False}, False, id="sqlite-no-batch"),
        pytest.param("postgres", {}, False, id="postgres", marks=pytest.mark.postgres),
    ],
)
def test_configure_options_pass_through(
    project: Path, url: str, options: dict[str, Any], batch: bool
) -> None:
    (project / "env.py").write_text(OPTIONS_ENV)
    # Up to the first revision only: the database has to be at head for autogenerate.
    (project / "versions" / f"{HEAD}_widen_author_names.py").unlink()
    db = SessionFactory(url)
    try:
        config = config_for(project, db, version_table="bookshop_version", **options)
        command.upgrade(config, FIRST)
        engine = db.sync.engine
        assert tables(engine) == {"author", "book", "bookshop_version"}
        assert version(engine, "bookshop_version") == [FIRST]
        # The models say String(200), the database String(50): autogenerate's type
        # comparison finds it, written in batch form where asked.
        command.revision(config, message="widen", autogenerate=True)
        [script] = (project / "versions").glob("*_widen.py")
        source = script.read_text()
        assert "String(length=200)" in source
        assert ("batch_alter_table('author'" in source) is batch
    finally:
        asyncio.run(db.dispose())


@pytest.mark.parametrize("backend", ["sqlite-file"])
@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        pytest.param(
            "not a factory",
            {},
            "needs a SessionFactory or SyncSessionFactory, not a str",
            id="not-a-factory",
        ),
        pytest.param(None, {"url": "sqlite://"}, "sets url from the factory", id="url"),
    ],
)
def test_what_run_migrations_refuses(
    project: Path, url: str, factory: Any, options: dict[str, Any], message: str
) -> None:
    (project / "env.py").write_text(OPTIONS_ENV)
    db = SessionFactory(url)
    try:
        config = config_for(project, db if factory is None else factory, **options)
        with pytest.raises(ConfigurationError, match=message):
            command.upgrade(config, "head")
    finally:
        asyncio.run(db.dispose())


# --- the module -------------------------------------------------------------------------


def test_importing_sessionforge_does_not_import_alembic() -> None:
    code = "import sys, sessionforge, sessionforge.pytest_plugin; print('alembic' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_without_the_extra_the_import_error_says_what_to_install() -> None:
    code = dedent("""
        import sys
        sys.modules["alembic"] = None  # as if Alembic were not installed
        try:
            import sessionforge.alembic
        except ImportError as error:
            print(error)
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'sessionforge[alembic]'" in result.stdout


def test_the_readme_env_py_is_the_example() -> None:
    block = block_tested_by("tests/test_alembic.py::test_the_readme_env_py_is_the_example")
    assert block == (EXAMPLE / "env.py").read_text()
