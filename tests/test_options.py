"""Every option is declared once (``FactoryConfig``'s fields, ``option()``), and this
ties the rest to the declarations: the typed ``**options``, validation, the README's
options table, and where each option's value ends up.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL, event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import SessionFactory
from sessionforge._internal import sqla
from sessionforge._internal.engines import build_async_engine, build_sync_engine, engine_kwargs
from sessionforge._internal.stats import report_leak
from sessionforge._internal.twin import core_of
from sessionforge.config import OPTIONS, FactoryConfig, FactoryOptions, SyncFactoryOptions
from sessionforge.dialects import display_name
from sessionforge.errors import ConfigurationError
from sessionforge.sync import SyncSessionFactory

README = Path(__file__).parent.parent / "README.md"
PG = "postgresql+asyncpg://app@127.0.0.1:5432/app"  # engines are built, never connected


def readme_row(name: str) -> str:
    """The README table row for option ``name``, from its declaration."""
    spec = OPTIONS[name]
    field = next(f for f in dataclasses.fields(FactoryConfig) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        default = repr(field.default_factory())
    elif isinstance(field.default, type):
        default = field.default.__name__
    else:
        default = repr(field.default)
    dialect = "all" if spec.dialect is None else display_name(spec.dialect)
    return f"| `{name}` | {spec.group} | `{default}` | {dialect} | {spec.where(name)} |"


def test_every_option_is_a_config_field_and_a_typed_option_of_the_same_type() -> None:
    config_types = typing.get_type_hints(FactoryConfig)
    async_types = typing.get_type_hints(FactoryOptions)
    sync_types = typing.get_type_hints(SyncFactoryOptions)
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(FactoryConfig)} - {"url"}
    # class_ is SessionFactory's own argument, sync_class_ SyncSessionFactory's
    assert set(async_types) == set(OPTIONS) - {"class_"}
    assert set(sync_types) == set(OPTIONS) - {"sync_class_"}
    for name in OPTIONS:
        for typed in (async_types, sync_types):
            if name in typed:
                assert typed[name] == ACCEPTED_AS.get(name, config_types[name]), name


# Options accepted in a wider form than the config keeps (normalised by their check).
ACCEPTED_AS: dict[str, Any] = {"replicas": Sequence[str | URL]}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_is_validated(name: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"{name}=.*(invalid|AsyncSession)"):
        wrong: dict[str, Any] = {name: object()}
        FactoryConfig(url=None, **wrong)


def test_every_option_is_in_the_readme_table() -> None:
    readme = README.read_text()
    missing = [readme_row(name) for name in OPTIONS if readme_row(name) not in readme]
    assert missing == [], "README options table rows to add or correct:\n" + "\n".join(missing)


# --- destinations ---------------------------------------------------------------------


def engine_argument(name: str, value: Any, *, url: str = PG, sync: bool = False) -> Any:
    config = FactoryConfig.from_url(url, **{name: value})
    target = config.sync_url if sync else config.async_url
    kwargs = engine_kwargs(config, target, is_async=not sync)
    # and the engine is built with it
    engine = build_sync_engine(config) if sync else build_async_engine(config).sync_engine
    engine.dispose()
    return kwargs


def connect_args(name: str, value: Any, *, url: str = PG, sync: bool = False) -> Any:
    return engine_argument(name, value, url=url, sync=sync).get("connect_args", {})


def connect_password(value: Any, *, sync: bool = False) -> Any:
    """The password the engine's do_connect listeners give a new connection."""
    config = FactoryConfig.from_url(PG, password=value)
    engine = build_sync_engine(config) if sync else build_async_engine(config).sync_engine
    cparams: dict[str, Any] = {}
    for listener in engine.dialect.dispatch.do_connect:
        listener(engine.dialect, None, [], cparams)
    engine.dispose()
    return cparams.get("password")


def sync_session(**options: Any) -> Session:
    sdb: SyncSessionFactory[Any] = SyncSessionFactory("sqlite://", **options)
    session: Session = sdb()
    return session


def sqlite_pragma(tmp_path: Path, pragma: str, **options: Any) -> Any:
    engine = build_sync_engine(FactoryConfig.from_url(f"sqlite:///{tmp_path}/x.db", **options))
    with engine.connect() as connection:
        value = connection.execute(text(f"PRAGMA {pragma}")).scalar()
    engine.dispose()
    return value


def sqlite_begin_statements(tmp_path: Path, **options: Any) -> list[str]:
    engine = build_sync_engine(FactoryConfig.from_url(f"sqlite:///{tmp_path}/x.db", **options))
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with engine.begin() as connection:
        connection.execute(text("SELECT 1"))
    engine.dispose()
    return [statement for statement in sent if statement.startswith("BEGIN")]


MYSQL = "mysql://app@127.0.0.1:3306/app"  # engines are built, never connected


def connect_listeners(url: str, **options: Any) -> int:
    engine = build_async_engine(FactoryConfig.from_url(url, **options)).sync_engine
    count = len(engine.pool.dispatch.connect)
    engine.dispose()
    return count


def checkout_listeners(**options: Any) -> int:
    engine = build_async_engine(FactoryConfig.from_url(PG, **options)).sync_engine
    count = len(engine.pool.dispatch.checkout)
    engine.dispose()
    return count


class MyAsyncSession(AsyncSession):
    pass


class MySession(Session):
    pass


def leak_message(**options: Any) -> str:
    session = sync_session(**options)
    with pytest.warns(ResourceWarning) as warned:
        report_leak(session)
    session.close()
    return str(warned[0].message)


def pool_figures(name: str, value: Any) -> Any:
    config = FactoryConfig.from_url(PG, **{name: value})
    engine = build_async_engine(config).sync_engine
    pool: Any = engine.pool
    figures = {
        "pool_size": pool.size(),
        "max_overflow": sqla.pool_max_overflow(pool),
        "pool_timeout": pool.timeout(),
        "pool_recycle": pool._recycle,
        "pool_use_lifo": engine_kwargs(config, config.async_url, is_async=True).get(name),
        "echo": engine.echo,
    }
    engine.dispose()
    return figures[name]


def notes_writes(**options: Any) -> bool:
    """Whether a factory's primary engine notes writes (its dialect's execute is wrapped)."""
    db = SyncSessionFactory(PG.replace("+asyncpg", "+psycopg"), **options)
    engine = db.engine
    wrapped = "do_execute" in vars(engine.dialect)
    db.dispose()
    return wrapped


def replica_setting(name: str, value: Any) -> Any:
    replicas = core_of(SessionFactory(PG, replicas=[REPLICA], **{name: value})).replicas
    assert replicas is not None
    return {"replica_wait": replicas.wait, "replica_recheck": replicas.recheck}[name]


REPLICA = "postgresql://app@replica1:5432/app"


DESTINATIONS: dict[str, Callable[[Path], bool]] = {
    # engine
    "pool_size": lambda _: pool_figures("pool_size", 3) == 3,
    "max_overflow": lambda _: pool_figures("max_overflow", 4) == 4,
    "pool_timeout": lambda _: pool_figures("pool_timeout", 7.5) == 7.5,
    "pool_recycle": lambda _: pool_figures("pool_recycle", 60) == 60,
    "pool_use_lifo": lambda _: pool_figures("pool_use_lifo", True) is True,
    "echo": lambda _: pool_figures("echo", True) is True,
    "isolation_level": lambda _: (
        engine_argument("isolation_level", "serializable")["isolation_level"] == "SERIALIZABLE"
    ),
    "password": lambda _: (
        connect_password("s3cret") == "s3cret"
        and connect_password(lambda: "token", sync=True) == "token"
    ),
    "connect_args": lambda _: (
        connect_args("connect_args", {"timeout": 3})["timeout"] == 3
        and "timeout" not in connect_args("connect_args", {"timeout": 3}, sync=True)
    ),
    "sync_connect_args": lambda _: (
        connect_args("sync_connect_args", {"connect_timeout": 3}, sync=True)["connect_timeout"]
        == 3
        and "connect_timeout" not in connect_args("sync_connect_args", {"connect_timeout": 3})
    ),
    "engine_options": lambda _: (
        engine_argument("engine_options", {"pool_pre_ping": True})["pool_pre_ping"] is True
    ),
    # session
    "autoflush": lambda _: sync_session(autoflush=False).autoflush is False,
    "expire_on_commit": lambda _: sync_session(expire_on_commit=True).expire_on_commit is True,
    "info": lambda _: sync_session(info={"tenant": "acme"}).info["tenant"] == "acme",
    "class_": lambda _: isinstance(
        SessionFactory("sqlite://", class_=MyAsyncSession)(), MyAsyncSession
    ),
    "sync_class_": lambda _: isinstance(sync_session(sync_class_=MySession), MySession),
    "session_options": lambda _: sync_session(session_options={"twophase": True}).twophase,
    # presets
    "ping_after": lambda _: checkout_listeners(ping_after=None) < checkout_listeners(),
    "pgbouncer": lambda _: connect_args("pgbouncer", True)["statement_cache_size"] == 0,
    "application_name": lambda _: (
        connect_args("application_name", "web")["server_settings"]["application_name"] == "web"
    ),
    "sqlite_journal_mode": lambda tmp: (
        sqlite_pragma(tmp, "journal_mode", sqlite_journal_mode="truncate") == "truncate"
    ),
    "sqlite_synchronous": lambda tmp: (
        sqlite_pragma(tmp, "synchronous", sqlite_synchronous="FULL") == 2
    ),
    "sqlite_busy_timeout": lambda tmp: (
        sqlite_pragma(tmp, "busy_timeout", sqlite_busy_timeout=1.5) == 1500
    ),
    "sqlite_foreign_keys": lambda tmp: (
        sqlite_pragma(tmp, "foreign_keys", sqlite_foreign_keys=False) == 0
    ),
    "sqlite_begin": lambda tmp: (
        sqlite_begin_statements(tmp, sqlite_begin="deferred") == ["BEGIN"]
        and sqlite_begin_statements(tmp) == ["BEGIN IMMEDIATE"]
    ),
    "connect_timeout": lambda _: (
        connect_args("connect_timeout", 2.5)["timeout"] == 2.5
        and connect_args("connect_timeout", 2.5, sync=True)["connect_timeout"] == 3
    ),
    "mysql_snapshot_isolation": lambda _: (
        connect_listeners(MYSQL, mysql_snapshot_isolation=False) < connect_listeners(MYSQL)
    ),
    # routing
    "replicas": lambda _: (
        [r.url for r in SessionFactory(PG, replicas=[REPLICA]).status().replicas]
        == ["postgresql+asyncpg://app@replica1:5432/app"]
    ),
    "read_your_writes": lambda _: (
        notes_writes(replicas=[REPLICA])
        and not notes_writes(replicas=[REPLICA], read_your_writes=False)
    ),
    "replica_wait": lambda _: replica_setting("replica_wait", 0.2) == 0.2,
    "replica_recheck": lambda _: replica_setting("replica_recheck", 1.5) == 1.5,
    # diagnostics
    "track_session_origin": lambda _: (
        "it was made at" in leak_message(track_session_origin=True)
        and "it was made at" not in leak_message()
    ),
}


def test_every_option_has_a_destination_check() -> None:
    assert set(DESTINATIONS) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_reaches_its_destination(name: str, tmp_path: Path) -> None:
    assert DESTINATIONS[name](tmp_path)
