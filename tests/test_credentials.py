"""``password=`` (issue 15): a password apart from the URL, or a callable asked per connection.

Against a real server that checks passwords: the private PostgreSQL of the
``password_server`` fixture (``tests/pgcluster.py``), where each test makes a role of its
own (so changing its password disturbs no other test), and the shared MariaDB with a
user made for the test. The callable's value must never be shown: reprs, errors, logs.
"""

from __future__ import annotations

import gc
import logging
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import URL, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig, SessionFactory
from sessionforge.errors import ConfigurationError
from sessionforge.sync import SyncSessionFactory

from .conftest import MARIADB_URL, require_mariadb
from .pgcluster import POSTGRES_DRIVERS, PostgresServer, spellings
from .test_readme import block_tested_by


@dataclass
class Role:
    """A role of the password server that only this test uses, and its password now."""

    server: PostgresServer
    name: str
    password: str

    def url(self, driver: str = "postgresql+asyncpg", database: str = "postgres") -> URL:
        """The role's URL, without a password."""
        return self.server.login_url._replace(password=None).set(
            drivername=driver, username=self.name, database=database
        )

    def change_password(self, password: str) -> None:
        self.server.sql(f"ALTER ROLE {self.name} PASSWORD '{password}'")
        self.password = password


@pytest.fixture
def role(password_server: PostgresServer) -> Iterator[Role]:
    name = f"sf_rot_{uuid.uuid4().hex[:8]}"
    # A password that needs percent-encoding in a URL: every spelling must stay hidden.
    made = Role(password_server, name, f"first:p@ss/{name}%")
    password_server.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{made.password}'")
    yield made
    password_server.sql(f"DROP ROLE {name}")


def assert_hidden(password: str, *texts: str) -> None:
    for shown in texts:
        assert not any(spelling in shown for spelling in spellings(password)), shown


async def current_user(db: SessionFactory[Any]) -> str:
    async with db.begin() as session:
        return str(await session.scalar(text("SELECT current_user")))


# --- connecting -------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("kind", ["sync-callable", "async-callable", "string"])
async def test_the_password_connects_and_is_never_shown(
    role: Role, driver: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[None] = []

    def token() -> str:
        calls.append(None)
        return role.password

    async def async_token() -> str:
        return token()

    password: Any = {"sync-callable": token, "async-callable": async_token}.get(
        kind, role.password
    )
    caplog.set_level(logging.DEBUG)
    async with SessionFactory(role.url(driver), password=password, echo="debug") as db:
        assert await current_user(db) == role.name
        assert await current_user(db) == role.name  # the pooled connection: not asked again
        if kind != "string":
            assert len(calls) == 1
        shown = [repr(db), repr(db.config), str(db.config.describe()), caplog.text]
    assert "password=" in shown[1]
    assert_hidden(role.password, *shown)


@pytest.mark.postgres
async def test_a_wrong_password_is_the_servers_refusal_without_the_password(role: Role) -> None:
    wrong = f"wrong:p@ss/{role.name}%"
    async with SessionFactory(role.url(), password=lambda: wrong) as db:
        with pytest.raises(DBAPIError, match="password authentication failed") as raised:
            await current_user(db)
        assert db.status().checked_out == 0
    assert_hidden(wrong, str(raised.value), repr(raised.value))


@pytest.mark.postgres
async def test_a_password_changed_on_the_server_is_used_for_new_connections_only(
    role: Role,
) -> None:
    asked: list[str] = []

    def token() -> str:
        asked.append(role.password)
        return role.password

    async with SessionFactory(role.url(), password=token, pool_size=2, max_overflow=0) as db:
        async with db.begin() as first:
            old_pid = await first.scalar(text("SELECT pg_backend_pid()"))
            role.change_password(f"second:p@ss/{role.name}%")
            # The open connection keeps working, and goes back to the pool after.
            assert await first.scalar(text("SELECT current_user")) == role.name
            async with db.begin() as second:  # the pool's second connection: a new one
                new_pid = await second.scalar(text("SELECT pg_backend_pid()"))
                assert await second.scalar(text("SELECT current_user")) == role.name
        assert new_pid != old_pid
        assert asked == [f"first:p@ss/{role.name}%", role.password]
        async with db.begin() as again:  # pooled: no new password asked
            assert await again.scalar(text("SELECT pg_backend_pid()")) in (old_pid, new_pid)
        assert len(asked) == 2
        await db.engine.dispose()  # every connection new: all with the new password
        assert await current_user(db) == role.name
        assert asked[2:] == [role.password]
    # The old password no longer logs in: the rotation was real.
    async with SessionFactory(role.url(), password=f"first:p@ss/{role.name}%") as stale:
        with pytest.raises(DBAPIError, match="password authentication failed"):
            await current_user(stale)


@pytest.mark.postgres
async def test_a_callable_with_one_parameter_is_given_each_servers_url(role: Role) -> None:
    # The "replica" is the same server under another database name: a URL of its own,
    # an engine of its own, so its own call. (It is no standby: its reads fall back to
    # the primary once its check fails, after its connection was made.)
    given: list[URL] = []

    def per_host(url: URL) -> str:
        given.append(url)
        return role.password

    primary, replica = role.url(), role.url(database="template1")
    async with SessionFactory(primary, replicas=[replica], password=per_host) as db:
        assert await current_user(db) == role.name
        async with db.reader() as session:
            assert await session.scalar(text("SELECT current_user")) == role.name
    assert [url.database for url in given][:1] == ["postgres"]
    assert "template1" in [url.database for url in given]
    for url in given:
        assert url.password is None
        assert (url.host, url.port, url.username) == ("127.0.0.1", role.server.port, role.name)


# --- the sync twin ----------------------------------------------------------------------


@pytest.mark.postgres
async def test_the_sync_twin_asks_a_sync_callable(role: Role) -> None:
    calls: list[None] = []

    def token() -> str:
        calls.append(None)
        return role.password

    async with SessionFactory(role.url(), password=token) as db:
        assert await current_user(db) == role.name
        with db.sync.begin() as session:
            assert session.scalar(text("SELECT current_user")) == role.name
        db.sync.dispose()
    assert len(calls) == 2  # one connection per twin
    sdb = SyncSessionFactory(role.url("postgresql+psycopg"), password=token)
    with sdb.begin() as session:
        assert session.scalar(text("SELECT current_user")) == role.name
    sdb.dispose()


@pytest.mark.postgres
async def test_an_async_callable_is_refused_by_the_sync_twin(role: Role) -> None:
    async def token() -> str:
        return role.password

    async with SessionFactory(role.url(), password=token) as db:
        assert await current_user(db) == role.name
        with pytest.raises(ConfigurationError, match="give a sync callable"):
            with db.sync.begin() as session:
                session.scalar(text("SELECT 1"))
    sdb = SyncSessionFactory(role.url("postgresql+psycopg"), password=token)
    with pytest.raises(ConfigurationError, match=r"sync twin .* cannot await"):
        sdb.ping()
    sdb.dispose()


@pytest.mark.postgres
def test_a_callable_returning_an_awaitable_is_refused_by_the_sync_twin_at_connect(
    role: Role,
) -> None:
    async def fetch() -> str:
        return role.password

    def token() -> Any:  # not an async function itself: found out at connect
        return fetch()

    sdb = SyncSessionFactory(role.url("postgresql+psycopg"), password=token)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed: no "never awaited"
        with pytest.raises(ConfigurationError, match="give a sync callable"):
            sdb.ping()
        gc.collect()
    sdb.dispose()


@pytest.mark.postgres
async def test_a_callable_that_returns_no_string_is_an_error_naming_the_connection(
    role: Role,
) -> None:
    wrong: Any = lambda: role.password.encode()  # noqa: E731 (typed Any: it is wrong)
    async with SessionFactory(role.url(), password=wrong) as db:
        with pytest.raises(
            ConfigurationError, match=r"returned bytes, not the password"
        ) as raised:
            await current_user(db)
    assert str(role.server.port) in str(raised.value)
    assert_hidden(role.password, str(raised.value))


@pytest.mark.postgres
async def test_the_readme_rotating_block_runs(
    role: Role, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", role.url().render_as_string())
    monkeypatch.setenv("APP_DB_PASSWORD", role.password)
    block = block_tested_by("tests/test_credentials.py::test_the_readme_rotating_block_runs")
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    await namespace["main"]()
    assert capsys.readouterr().out == f"{role.name}\n"


# --- refused at construction ------------------------------------------------------------

PG = "postgresql://app@127.0.0.1:5432/app"


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        pytest.param(
            "postgresql://app:s3cret@db/app",
            {},
            r"'postgresql\+asyncpg://app:\*\*\*@db/app' holds a password, and password= ",
            id="password-in-url",
        ),
        pytest.param(
            PG,
            {"replicas": ["postgresql://app:s3cret@replica1/app"]},
            r"replica1/app' holds a password",
            id="password-in-replica-url",
        ),
        pytest.param(
            PG,
            {"connect_args": {"password": "s3cret"}},
            "connect_args holds a password",
            id="password-in-connect-args",
        ),
        pytest.param(
            PG,
            {"sync_connect_args": {"password": "s3cret"}},
            "sync_connect_args holds a password",
            id="password-in-sync-connect-args",
        ),
        pytest.param("sqlite:///app.db", {}, "SQLite database has no password", id="sqlite-file"),
        pytest.param("sqlite://", {}, "SQLite database has no password", id="sqlite-memory"),
    ],
)
def test_a_second_password_or_a_database_without_one_is_refused(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        SessionFactory(url, password="s3cret", **options)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("password", "message"),
    [
        pytest.param(42, r"password=\.\.\. \(int\) is invalid: expected a string, or a", id="int"),
        pytest.param(
            lambda host, port: "x", r"required parameters \(host, port\)", id="two-parameters"
        ),
        pytest.param(lambda *, host: "x", r"required parameters \(host\)", id="keyword-only"),
        pytest.param("s3cret\x00", "NUL character", id="nul"),
    ],
)
def test_a_password_that_cannot_be_used_is_refused(password: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        FactoryConfig.from_url(PG, password=password)
    assert "s3cret" not in str(raised.value)


def test_a_factory_made_without_a_url_checks_the_password_when_bound() -> None:
    db = SessionFactory(password="s3cret")
    with pytest.raises(ConfigurationError, match="holds a password, and password="):
        db.configure(bind="postgresql://app:other@db/app")
    db.configure(bind=PG)
    assert db.config.password == "s3cret"


# --- MariaDB ----------------------------------------------------------------------------


@pytest.fixture
def mariadb_user() -> Iterator[tuple[str, str]]:
    require_mariadb()
    name, password = f"sf_rot_{uuid.uuid4().hex[:8]}", f"p@ss:w/{uuid.uuid4().hex[:6]}%"
    admin = create_engine(
        make_url(MARIADB_URL).set(drivername="mysql+pymysql"), poolclass=NullPool
    )
    with admin.begin() as connection:
        connection.execute(text(f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"))
        connection.execute(text(f"GRANT SELECT ON test.* TO '{name}'@'%'"))
    yield name, password
    with admin.begin() as connection:
        connection.execute(text(f"DROP USER '{name}'@'%'"))
    admin.dispose()


@pytest.mark.mysql
async def test_mariadb_takes_the_callables_password_on_both_twins(
    mariadb_user: tuple[str, str],
) -> None:
    name, password = mariadb_user
    url = make_url(MARIADB_URL).set(username=name)
    async with SessionFactory(url, password=lambda: password) as db:
        async with db.begin() as session:
            user = await session.scalar(text("SELECT CURRENT_USER()"))
        with db.sync.begin() as session:
            sync_user = session.scalar(text("SELECT CURRENT_USER()"))
        db.sync.dispose()
    assert user == sync_user == f"{name}@%"
    async with SessionFactory(url, password=lambda: "wrong") as wrong:
        with pytest.raises(DBAPIError, match="Access denied") as raised:
            async with wrong.begin() as session:
                await session.scalar(text("SELECT 1"))
    assert_hidden(password, str(raised.value))
