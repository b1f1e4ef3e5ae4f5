"""A factory's target and its binds: what ``SessionFactory(target, binds=...)`` means.

``resolve_target`` sorts the first argument of either twin (a URL, a ``FactoryConfig``,
an engine, a connection, or nothing for a factory bound later) and the options into a
``Resolved``; ``check_binds`` validates ``binds={Mapper|class|Table: target}`` as
``Session`` would, and ``resolve_binds`` turns them into one session's ``binds`` —
another factory's engine looked up for the running loop each time. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.expression import TableClause

from sessionforge.config import (
    ENGINE_OPTIONS,
    PRESET_OPTIONS,
    SESSION_LEVEL_OPTIONS,
    FactoryConfig,
    check_option_names,
)
from sessionforge.errors import ConfigurationError

from .engines import check_driver
from .twin import TwinBase, core_of

if TYPE_CHECKING:
    from .core import FactoryCore

__all__ = [
    "BindTarget",
    "FactoryBind",
    "Resolved",
    "Twin",
    "bind_name",
    "check_binds",
    "check_target_twin",
    "check_twin_driver",
    "database_target",
    "refuse_engine_options",
    "resolve_binds",
    "resolve_rebind",
    "resolve_target",
    "wrong_twin_connection",
]

Twin: TypeAlias = Literal["async", "sync"]
#: What a ``binds={key: target}`` entry resolves to once validated: a database target,
#: or another sessionforge factory (its engine is looked up per session).
BindTarget: TypeAlias = "AsyncEngine | Engine | AsyncConnection | Connection | FactoryBind"


@dataclass(frozen=True, slots=True)
class FactoryBind:
    """A ``binds`` target that is a sessionforge factory (either twin) and its core."""

    factory: Any  # SessionFactory | SyncSessionFactory (they import this module)
    core: FactoryCore[Any]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A factory's first argument and options, sorted out by ``resolve_target``."""

    config: FactoryConfig
    engine: AsyncEngine | Engine | None = None
    connection: AsyncConnection | Connection | None = None
    binds: Mapping[Any, Any] | None = None


def resolve_target(target: object, options: dict[str, Any], twin: Twin) -> Resolved:
    """Turn a factory's first argument and options into a ``Resolved`` target.

    ``target`` is a URL (string or ``sqlalchemy.URL``), a ``FactoryConfig``, an engine
    or a connection of the factory's kind (async for ``SessionFactory``), or ``None``
    for a factory bound later (``configure(bind=...)``) or routed by ``binds``.
    """
    factory = "SessionFactory" if twin == "async" else "SyncSessionFactory"
    binds = options.pop("binds", None)
    if "join_transaction_mode" in options:  # a session argument, common with connections
        mode = options.pop("join_transaction_mode")
        options["session_options"] = {
            **options.get("session_options", {}),
            "join_transaction_mode": mode,
        }
    if target is None:
        check_option_names(options)
        return Resolved(FactoryConfig(url=None, **options), binds=binds)
    if isinstance(target, FactoryConfig):
        return Resolved(target.replace(**options) if options else target, binds=binds)
    if isinstance(target, str | URL):
        return Resolved(FactoryConfig.from_url(target, **options), binds=binds)
    if isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
        check_target_twin(target, twin, factory)
        refuse_engine_options(set(options), factory)
        check_option_names(options, allowed=SESSION_LEVEL_OPTIONS)
        engine: Any = target.engine if isinstance(target, AsyncConnection | Connection) else target
        # The user's engine is used as given: its URL (and so its in-memory database)
        # is taken as is, without our normalisation.
        config = FactoryConfig(url=engine.url, **options)
        return replace(database_target(target, config), binds=binds)
    raise ConfigurationError(
        f"{factory} takes a URL string, a sqlalchemy URL, a FactoryConfig, an engine or a "
        f"connection; got {type(target).__name__}"
    )


def database_target(
    target: AsyncEngine | Engine | AsyncConnection | Connection, config: FactoryConfig
) -> Resolved:
    """``config`` on a user's engine or connection, its URL taken as given (unnormalised)."""
    engine = target.engine if isinstance(target, AsyncConnection | Connection) else target
    if config.url is not engine.url:
        config = replace(config, url=engine.url)
    if isinstance(target, AsyncConnection | Connection):
        return Resolved(config, connection=target)
    return Resolved(config, engine=target)


def check_twin_driver(config: FactoryConfig, twin: Twin) -> None:
    """The driver ``twin`` would use for ``config``'s URL is installed and of its kind."""
    if twin == "async":
        check_driver(config.async_url, is_async=True)
    else:
        check_driver(config.sync_url, is_async=False)


def check_target_twin(target: object, twin: Twin, where: str, *, bind: bool = False) -> None:
    """Refuse an engine or connection of the other twin's kind; ``bind``: in ``binds``."""
    is_async = isinstance(target, AsyncEngine | AsyncConnection)
    if is_async == (twin == "async"):
        return
    kind = type(target).__name__
    # A binds target cannot be a URL; a sessionforge factory serves both twins.
    instead = "bind a sessionforge factory (it has both kinds of engine), or " if bind else ""
    if twin == "async":
        use = "pass an AsyncEngine" if bind else "pass a URL"
        raise ConfigurationError(
            f"{where} needs an AsyncEngine or AsyncConnection, got {kind}; {instead}{use}, "
            "or use SyncSessionFactory for sync code"
        )
    use = "an Engine" if bind else "a URL"
    raise ConfigurationError(
        f"{where} needs an Engine or Connection, got {kind}; {instead}pass {use}, or use "
        "SessionFactory for async code"
    )


def refuse_engine_options(names: set[str], where: str) -> None:
    fixed = sorted(names & (ENGINE_OPTIONS | PRESET_OPTIONS))
    if fixed:
        raise ConfigurationError(
            f"{', '.join(fixed)} shape(s) engines sessionforge builds, but {where} was "
            "given an engine or a connection: set them where you create the engine, or "
            "pass a URL instead"
        )


def wrong_twin_connection(twin: Twin) -> ConfigurationError:
    other = "an AsyncConnection" if twin == "sync" else "a Connection"
    return ConfigurationError(
        f"this factory is bound to {other}, which its {twin} twin cannot use; make the "
        f"{twin} factory on a connection of its own kind"
    )


# binds --------------------------------------------------------------------------------


def check_binds(binds: object, *, twin: Twin) -> dict[Any, BindTarget]:
    """Validate ``binds={Mapper|class|Table: target}`` as sessionmaker takes it.

    A target is an engine or connection, or another sessionforge factory (either
    twin), kept as its core so each session uses that factory's current engine. An
    engine of the other kind (a sync ``Engine`` for ``SessionFactory``) is refused here
    for a factory's own twin; for the other twin, when a session of it is made.
    """
    if binds is None:
        return {}
    if not isinstance(binds, Mapping):
        raise ConfigurationError(
            f"binds must be a dict of {{mapped class, Mapper or Table: engine or factory}}, "
            f"got {type(binds).__name__}"
        )
    checked: dict[Any, BindTarget] = {}
    for key, target in binds.items():
        if not isinstance(key, type):
            inspected = inspect(key, raiseerr=False)
            if not isinstance(inspected, Mapper | TableClause):
                raise ConfigurationError(
                    f"binds key {key!r} is not a mapped class, Mapper or Table; route "
                    "classes or tables to their databases: binds={User: engine}"
                )
        name = bind_name(key)
        if isinstance(target, TwinBase):  # SessionFactory or SyncSessionFactory
            checked[key] = FactoryBind(target, core_of(target))
        elif isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
            check_target_twin(target, twin, f"binds[{name}]", bind=True)
            checked[key] = target
        else:
            raise ConfigurationError(
                f"binds[{name}] must be an engine, a connection or a sessionforge factory, "
                f"got {type(target).__name__}"
            )
    return checked


def resolve_binds(binds: Mapping[Any, BindTarget], twin: Twin) -> dict[Any, Any]:
    """The ``binds`` argument for one session of ``twin``: factories' engines looked up now."""
    resolved: dict[Any, Any] = {}
    for key, target in binds.items():
        if isinstance(target, FactoryBind):
            core = target.core
            bind = core.async_bind(None) if twin == "async" else core.sync_bind(None)
            if bind is None:
                raise ConfigurationError(
                    f"binds[{bind_name(key)}] is a factory made without a database; bind "
                    "it with configure(bind=...) first"
                )
            resolved[key] = bind
        else:
            where = f"binds[{bind_name(key)}] (the {twin} twin)"
            check_target_twin(target, twin, where, bind=True)
            resolved[key] = target
    return resolved


def bind_name(key: object) -> str:
    if isinstance(key, type):
        return key.__name__
    name = getattr(key, "name", None)
    if isinstance(name, str):
        return repr(name)
    return repr(key)


def resolve_rebind(target: object, twin: Twin, config: FactoryConfig) -> Resolved:
    """``configure(bind=target)``: ``config`` bound to a URL, an engine or a connection."""
    if isinstance(target, str | URL):
        config = config.replace(url=target)
        check_twin_driver(config, twin)
        return Resolved(config)
    if isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
        check_target_twin(target, twin, "configure(bind=...)")
        refuse_engine_options(set(config.describe()), "configure(bind=...)")
        return database_target(target, config)
    raise ConfigurationError(
        f"configure(bind=...) takes a URL, an engine or a connection; got {type(target).__name__}"
    )
