"""How a ``FactoryConfig`` option is declared, checked and routed.

Each option is declared once, as a field of ``FactoryConfig`` made with ``option()``:
its type and default (for mypy and the dataclass), and an ``Option`` record — its
group, its check, where its value goes, the dialect it is for. Everything else is
derived from those declarations (``config.py``): the option sets the factories
consult, the validation in ``FactoryConfig.__post_init__``, the refusal of an option
of another dialect, the engine's keyword arguments (``_internal/engines.py``), the
sessions' keyword arguments, ``describe()`` and the repr. ``FactoryOptions`` (the typed
``**options``) has to be written out for mypy; ``tests/test_options.py`` ties it, the
README's options table and each option's destination to the declarations.

This module also holds the checks themselves and the names users try that are not
options (``elsewhere``), with where each goes instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast, get_args

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import JoinTransactionMode

from sessionforge.errors import ConfigurationError

from .urls import SECRET_KEY, mask_mapping, mask_url

__all__ = [
    "DEFAULT_PING_AFTER",
    "Check",
    "Group",
    "Option",
    "check_names",
    "check_session_argument",
    "check_urls",
    "declared_options",
    "finite_seconds",
    "mapping_option",
    "may_hold_secret",
    "option",
    "safe_repr",
    "session_argument_names",
    "shown_value",
]

_T = TypeVar("_T")

#: The default of ``ping_after``, also quoted where ``pool_pre_ping`` is refused.
DEFAULT_PING_AFTER: Final = 1.0

Group = Literal["engine", "preset", "routing", "session", "diagnostics"]
#: ``check(name, value)`` returns the value to keep (normalised) or raises
#: ``ConfigurationError``.
Check = Callable[[str, Any], Any]

_METADATA_KEY: Final = "sessionforge_option"


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """What sessionforge does with one ``FactoryConfig`` field."""

    group: Group
    check: Check
    #: Where the value goes, in words (the README's options table; see ``where``).
    goes_to: str
    #: The one dialect the option is for (``None``: all); others refuse it when set.
    dialect: str | None = None
    #: A keyword argument of the same name for ``create_engine``: the function gives
    #: its value from the option's (``None``: not passed).
    engine_argument: Callable[[Any], Any] | None = None
    #: Passed to every session under its own name (unless ``None``).
    session_argument: bool = False
    #: Accepted by a factory given an engine (sessionforge does not build that engine).
    with_user_engine: bool = False
    #: Shown by ``describe()`` and the repr even at its default.
    always_shown: bool = False

    def where(self, name: str) -> str:
        """Where option ``name``'s value goes: ``goes_to``, after the keyword it is."""
        if self.engine_argument is not None:
            return f"create_engine({name}=)" + (f", {self.goes_to}" if self.goes_to else "")
        if self.session_argument:
            return f"Session({name}=)" + (f", {self.goes_to}" if self.goes_to else "")
        return self.goes_to


def option(group: Group, default: _T, check: Check, goes_to: str, **spec: Any) -> _T:
    """A ``FactoryConfig`` field: its default, and how it is checked and applied.

    ``spec`` holds the other fields of ``Option``. The return type is the default's,
    as for ``dataclasses.field``: the field is typed by its annotation.
    """
    declared = Option(group, check, goes_to, **spec)
    field: Any = dataclasses.field(default=default, metadata={_METADATA_KEY: declared})
    return cast(_T, field)


def mapping_option(group: Group, goes_to: str, **spec: Any) -> Any:
    """A ``FactoryConfig`` field holding a dict (``{}`` by default, kept read-only)."""
    declared = Option(group, check_mapping, goes_to, **spec)
    return dataclasses.field(default_factory=dict, metadata={_METADATA_KEY: declared})


def declared_options(cls: type) -> dict[str, Option]:
    """The options a dataclass declares with ``option()``, in field order."""
    return {
        field.name: field.metadata[_METADATA_KEY]
        for field in dataclasses.fields(cls)
        if _METADATA_KEY in field.metadata
    }


def when_set(value: Any) -> Any:
    """Engine argument: the option's value, unless it is ``None``."""
    return value


def when_on(value: Any) -> Any:
    """Engine argument: the option's value when it is not false (``echo="debug"``)."""
    return value if value else None


def when_true(value: Any) -> bool | None:
    """Engine argument: ``True`` when the option is (truthy), else not passed."""
    return True if value else None


# --- checks -------------------------------------------------------------------------


def check_bool(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _ill_typed(name, value, "True or False")
    return value


def check_optional_bool(name: str, value: Any) -> bool | None:
    return None if value is None else check_bool(name, value)


def check_int(minimum: int, maximum: int = 2**31 - 1) -> Check:
    def check(name: str, value: Any) -> int | None:
        if value is None:
            return None
        if type(value) is not int or not minimum <= value <= maximum:
            raise _ill_typed(name, value, f"an int from {minimum} to {maximum}")
        return value

    return check


def finite_seconds(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (a bool is not), else ``None``.

    ``nan`` compares false with everything, so ``nan < 0`` lets it through a range
    check, and ``asyncio.timeout(nan)`` stops the loop's timers; ``inf`` and huge ints
    overflow where drivers convert seconds to integer milliseconds.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return seconds if math.isfinite(seconds) else None


def check_seconds(maximum: float, *, optional: bool) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        seconds = finite_seconds(value)
        if seconds is None or not 0 <= seconds <= maximum:
            none = " or None" if optional else ""
            raise _ill_typed(name, value, f"a number of seconds from 0 to {maximum:.10g}{none}")
        return value

    return check


def check_mapping(name: str, value: Any) -> Mapping[Any, Any]:
    """A dict, kept as a read-only copy."""
    if not isinstance(value, Mapping):
        raise _ill_typed(name, value, "a dict")
    return MappingProxyType(dict(value))


def check_optional_mapping(name: str, value: Any) -> Mapping[Any, Any] | None:
    return None if value is None else check_mapping(name, value)


def check_optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _ill_typed(name, value, "a string or None")
    return value


def check_echo(name: str, value: Any) -> Any:
    if type(value) is not bool and value != "debug":
        raise _ill_typed(name, value, "True, False or 'debug'")
    return value


def check_class(base: type) -> Check:
    def check(name: str, value: Any) -> Any:
        if value is None and base is Session:
            return None
        if not (isinstance(value, type) and issubclass(value, base)):
            if base is Session and isinstance(value, type) and issubclass(value, AsyncSession):
                raise ConfigurationError(
                    f"{name}={value.__name__} is an AsyncSession class, but {name} is the "
                    "sync Session class; AsyncSessions come from SessionFactory(target, "
                    f"class_={value.__name__})"
                )
            raise _ill_typed(name, value, f"a subclass of {base.__module__}.{base.__name__}")
        return value

    return check


def check_choice(choices: frozenset[str], *, optional: bool, upper: bool) -> Check:
    """One of ``choices`` in any case, kept in upper (``upper``) or lower case."""

    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value.upper() not in {c.upper() for c in choices}:
            raise _ill_typed(name, value, "one of " + ", ".join(sorted(choices)))
        return value.upper() if upper else value.lower()

    return check


def check_urls(name: str, value: Any) -> tuple[Any, ...]:
    """A list of database URLs (strings or ``sqlalchemy.URL``), parsed, as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise _ill_typed(name, value, "a list of URLs, e.g. ['postgresql://app@replica1/app']")
    from .urls import parse_url  # (urls imports nothing of ours: no cycle)

    return tuple(parse_url(url) for url in value)


def safe_repr(value: object) -> str:
    """``repr(value)``, shortened, and never an error (ints past 4300 digits raise one)."""
    try:
        shown = repr(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"
    return shown if len(shown) <= 80 else f"{shown[:60]}...{shown[-10:]}"


def shown_value(value: object) -> str:
    """``value`` for an error message: secrets masked as reprs mask them, short."""
    if isinstance(value, Mapping):
        return safe_repr(mask_mapping(value))
    if isinstance(value, str):
        return safe_repr(mask_url(value))
    if value is None or isinstance(value, int | float | type):
        return safe_repr(value)
    return "..."  # a list or an object: it may hold anything


def may_hold_secret(name: str) -> bool:
    """Whether option ``name``'s value may carry credentials: it is never echoed."""
    return name in _MAY_HOLD_SECRETS or SECRET_KEY.search(name) is not None


def _ill_typed(name: str, value: Any, expected: str) -> ConfigurationError:
    shown = "..." if may_hold_secret(name) else shown_value(value)
    return ConfigurationError(
        f"option {name}={shown} ({type(value).__name__}) is invalid: expected {expected}"
    )


_MAY_HOLD_SECRETS: Final = frozenset({"connect_args", "sync_connect_args", "engine_options"})


# --- names that are not options -----------------------------------------------------

# Session keyword arguments the factory sets itself and users may not pass.
_FACTORY_OWNED: Final = frozenset({"bind", "binds", "sync_session_class", "class_", "sync_class_"})


def check_names(options: Mapping[str, Any], known: frozenset[str]) -> None:
    """Raise ``ConfigurationError`` for the first name in ``options`` not in ``known``."""
    for name in options:
        if name in known:
            continue
        if name == "bind":
            raise ConfigurationError(
                "bind is set by the factory: it is the factory's first argument "
                "(SessionFactory(engine_or_url)), or configure(bind=...) for one made without"
            )
        if name == "binds":
            raise ConfigurationError(
                "binds is not a FactoryConfig option (a config holds values, not engines); "
                "pass it to the factory, SessionFactory(url, binds=...), or to configure()"
            )
        elsewhere = _elsewhere(name, known)
        if elsewhere is not None:
            raise ConfigurationError(f"unknown option {name!r}: {elsewhere}")
        hint = difflib.get_close_matches(name, sorted(known), n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else "."
        raise ConfigurationError(
            f"unknown option {name!r}{did_you_mean} Options are listed in "
            "FactoryOptions; anything else for the engine goes in engine_options={...}, "
            "for sessions in session_options={...}"
        )


_TO_ENGINE_OPTIONS: Final = "a create_engine() argument: pass engine_options={{{name!r}: ...}}"
# What users of SQLAlchemy (or of a factory's other methods) try first, and where it
# goes instead; names SQLAlchemy's create_engine() takes that are not options here.
_ELSEWHERE: Final[Mapping[str, str]] = {
    "pool_pre_ping": (
        "sessionforge replaces it with ping_after=: a pooled connection is pinged at "
        "checkout only after it sat idle in the pool for ping_after seconds (default "
        f"{DEFAULT_PING_AFTER:g}), so a busy pool pays no round trip; ping_after=0 pings "
        "at every checkout, ping_after=None never"
    ),
    "future": "SQLAlchemy 2 engines and sessions are always 'future'; leave it out",
    "url": (
        "the URL is the factory's first argument, given once: SessionFactory(url, "
        "**options); config.replace(url=...) makes a copy for another URL"
    ),
    "engine": "pass an engine as the factory's first argument: SessionFactory(engine)",
    "creator": (
        "sessionforge builds the engine from the URL; to connect your own way, create "
        "the engine yourself and pass it: SessionFactory(engine)"
    ),
    "autocommit": (
        "sessions have no autocommit mode since SQLAlchemy 2.0; use db.reader() for "
        "reads without a transaction, or isolation_level='AUTOCOMMIT'"
    ),
    "readonly": (
        "read-only is per transaction: db.begin(readonly=True), or db.reader() for "
        "reads without a transaction"
    ),
    "timeout": (
        "a transaction's deadline is db.begin(timeout=...); the wait for a pooled "
        "connection is pool_timeout="
    ),
    "statement_timeout": (
        "db.begin(timeout=...) sets it for one transaction; for every connection pass "
        "it as a server setting in connect_args"
    ),
    "retries": "retries are per call: db.run_transaction(fn, retries=...)",
    "settings": (
        "server settings are per transaction: db.begin(settings={...}); for every "
        "connection pass them in connect_args"
    ),
    **{
        name: _TO_ENGINE_OPTIONS.format(name=name)
        for name in (
            "poolclass",
            "pool",
            "pool_reset_on_return",
            "pool_logging_name",
            "pool_events",
            "echo_pool",
            "json_serializer",
            "json_deserializer",
            "execution_options",
            "hide_parameters",
            "logging_name",
            "query_cache_size",
            "insertmanyvalues_page_size",
            "use_insertmanyvalues",
            "max_identifier_length",
            "label_length",
            "paramstyle",
            "plugins",
            "enable_from_linting",
            "skip_autocommit_rollback",
            "module",
            "implicit_returning",
        )
    },
}


def _elsewhere(name: str, known: frozenset[str]) -> str | None:
    """Where an option the factory does not take by this name goes, if we know."""
    if "engine_options" not in known:  # a factory given an engine takes session options
        return None
    if name in _ELSEWHERE:
        return _ELSEWHERE[name] + "."
    if name in session_argument_names(AsyncSession, Session):
        return f"a session argument: pass session_options={{{name!r}: ...}}."
    return None


def session_argument_names(*classes: type) -> frozenset[str]:
    """Keyword arguments the session classes' constructors accept, factory-owned aside."""
    names: set[str] = set()
    for cls in classes:
        for parameter in inspect.signature(cls).parameters.values():
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                names.add(parameter.name)
    return frozenset(names - _FACTORY_OWNED - {"self"})


_JOIN_MODES: Final = get_args(JoinTransactionMode)


def check_session_argument(name: str, allowed: frozenset[str], value: Any = None) -> None:
    """Raise ``ConfigurationError`` unless ``name`` is a session keyword argument.

    The values sessionforge knows to check are checked too (``join_transaction_mode``,
    which SQLAlchemy only checks when the first session is made).
    """
    if name in allowed:
        if name == "join_transaction_mode" and value not in _JOIN_MODES:
            raise ConfigurationError(
                f"join_transaction_mode={shown_value(value)} is invalid: expected one of "
                + ", ".join(repr(mode) for mode in _JOIN_MODES)
            )
        return
    if name in _FACTORY_OWNED:
        raise ConfigurationError(
            f"{name} is set by the factory and cannot be passed to a session; "
            "create another SessionFactory for another database or session class"
        )
    hint = difflib.get_close_matches(name, sorted(allowed), n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else "."
    raise ConfigurationError(
        f"unknown session argument {name!r}{did_you_mean} "
        f"Sessions accept: {', '.join(sorted(allowed))}"
    )
