"""The typed ``**options`` of the factories and ``FactoryConfig.from_url`` (for mypy).

``config.py`` re-exports them; each option itself is declared once, as a field of
``FactoryConfig``, and ``tests/test_options.py`` checks that these types match it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import JoinTransactionMode

from .credentials import Password

__all__ = [
    "FactoryArguments",
    "FactoryOptions",
    "SyncFactoryArguments",
    "SyncFactoryOptions",
]


class _CommonOptions(TypedDict, total=False):
    pool_size: int | None
    max_overflow: int | None
    pool_timeout: float | None
    pool_recycle: int | None
    pool_use_lifo: bool
    echo: bool | Literal["debug"]
    isolation_level: str | None
    password: Password | None
    connect_args: Mapping[str, Any]
    sync_connect_args: Mapping[str, Any]
    engine_options: Mapping[str, Any]
    autoflush: bool
    expire_on_commit: bool
    info: Mapping[Any, Any] | None
    session_options: Mapping[str, Any]
    ping_after: float | None
    pgbouncer: bool
    application_name: str | None
    sqlite_journal_mode: str | None
    sqlite_synchronous: str | None
    sqlite_busy_timeout: float
    sqlite_foreign_keys: bool | None
    sqlite_begin: Literal["immediate", "deferred"]
    track_session_origin: bool
    replicas: Sequence[str | URL]
    read_your_writes: bool
    replica_wait: float
    replica_recheck: float
    connect_timeout: float | None
    mysql_snapshot_isolation: bool


class FactoryOptions(_CommonOptions, total=False):
    """The options ``SessionFactory(url, **options)`` accepts, besides ``class_``."""

    sync_class_: type[Session] | None


class SyncFactoryOptions(_CommonOptions, total=False):
    """The options ``SyncSessionFactory(url, **options)`` accepts, besides ``sync_class_``."""

    class_: type[AsyncSession]


class _TargetOptions(TypedDict, total=False):
    # Kept by the factory, not the config: engines and factories per mapped class/table.
    binds: Mapping[Any, Any] | None
    # A session argument, moved into session_options (common with a connection target).
    join_transaction_mode: JoinTransactionMode


class FactoryArguments(FactoryOptions, _TargetOptions, total=False):
    """``SessionFactory(target, **options)``: ``FactoryOptions`` plus ``binds``."""


class SyncFactoryArguments(SyncFactoryOptions, _TargetOptions, total=False):
    """``SyncSessionFactory(target, **options)``: ``SyncFactoryOptions`` plus ``binds``."""
