"""Options from ``SESSIONFORGE_<OPTION>`` environment variables (``FactoryConfig.from_env``).

Each option is read from the variable named after it in upper case
(``SESSIONFORGE_POOL_SIZE``, ``SESSIONFORGE_CLASS_``) and parsed by the type its field
declares: ``true``/``false``/``1``/``0``/``yes``/``no`` for a bool, an int, a float,
JSON for a dict or a list (``replicas``), ``module:attr`` for a class, text for a
string, and an empty value for ``None``. A union takes the first member that parses
(``echo``: a bool, else ``debug``); ``password`` is a string, so its variable holds the
password itself — a callable is given in code (keyword arguments win over the
environment). The parsed value then goes through the option's own check, and an error
names the variable and what it expected, never showing a value that may be a secret.

A ``SESSIONFORGE_`` variable that names no option is an error (a typo would otherwise
be ignored), except the prefixes the project's own tooling reads
(``SESSIONFORGE_TEST_``: the test suite; ``SESSIONFORGE_BENCH_``: the benchmarks) and the
URL's own variable when ``from_env(var=...)`` names one with the prefix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Literal

from sessionforge.errors import ConfigurationError

from .options import Option, may_hold_secret, safe_repr

__all__ = [
    "PREFIX",
    "RESERVED_PREFIXES",
    "import_object",
    "naming_variables",
    "read_options",
    "variable_for",
]

PREFIX: Final = "SESSIONFORGE_"
#: Read by the project's own tooling, never as options.
RESERVED_PREFIXES: Final = ("SESSIONFORGE_TEST_", "SESSIONFORGE_BENCH_")

_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def variable_for(name: str) -> str:
    """The environment variable of option ``name``."""
    return PREFIX + name.upper()


class _NotThis(Exception):
    """The text does not parse as this member of the option's type."""


def read_options(
    environ: Mapping[str, str],
    options: Mapping[str, Option],
    config_class: type,
    *,
    url_variable: str,
    given: Collection[str] = (),
) -> dict[str, Any]:
    """The options set in ``environ``, parsed by the types ``config_class`` declares and
    checked; unknown variables refused. Options in ``given`` (keyword arguments, which
    win) are left unread: a variable they override is not parsed."""
    hints = _hints_of(config_class)
    by_variable = {variable_for(name): name for name in options}
    found: dict[str, Any] = {}
    for variable in sorted(environ):
        if not variable.startswith(PREFIX) or variable == url_variable:
            continue
        if variable.startswith(RESERVED_PREFIXES):
            continue
        name = by_variable.get(variable)
        if name is None:
            raise _unknown(variable, by_variable)
        if name in given:
            continue
        raw = environ[variable]
        value = _parse(variable, name, raw, hints[name])
        try:
            found[name] = options[name].check(name, value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"environment variable {variable}: {exc}") from None
    return found


@contextmanager
def naming_variables(read: Mapping[str, Any]) -> Iterator[None]:
    """Add the variables options were read from to a ``ConfigurationError`` raised inside.

    Checks that span several options (the dialect's, the URL's) name options, not
    variables; this says which of them came from the environment.
    """
    try:
        yield
    except ConfigurationError as exc:
        if not read:
            raise
        variables = ", ".join(variable_for(name) for name in read)
        raise ConfigurationError(
            f"{exc} (options read from the environment: {variables})"
        ) from exc.__cause__


def _unknown(variable: str, by_variable: Mapping[str, str]) -> ConfigurationError:
    if variable == PREFIX + "URL":
        return ConfigurationError(
            f"environment variable {variable} is not read: the URL comes from DATABASE_URL, "
            "or the variable FactoryConfig.from_env(var=...) names; unset it"
        )
    # By the option part: the shared prefix would make every name look close.
    suffixes = sorted(name[len(PREFIX) :] for name in by_variable)
    hint = difflib.get_close_matches(variable[len(PREFIX) :].upper(), suffixes, n=1)
    did_you_mean = f"; did you mean {PREFIX}{hint[0]}?" if hint else "."
    return ConfigurationError(
        f"unknown environment variable {variable}{did_you_mean} sessionforge reads "
        f"{PREFIX}<OPTION> for each option of FactoryOptions, in upper case "
        f"({PREFIX}POOL_SIZE); {' and '.join(p + '*' for p in RESERVED_PREFIXES)} are left "
        "to the project's tooling. Rename or unset it"
    )


def _parse(variable: str, name: str, raw: str, hint: Any) -> Any:
    members = _members(hint)
    if raw == "":
        if type(None) in members:
            return None
        raise ConfigurationError(
            f"environment variable {variable} is empty, and option {name} cannot be None: "
            f"expected {_expected(members)}; unset the variable for the default"
        )
    for member in members:
        try:
            return _parser(member)(raw)
        except _NotThis:
            continue
        except ConfigurationError as exc:  # a module:attr that could not be imported
            raise ConfigurationError(f"environment variable {variable}: {exc}") from exc.__cause__
    shown = "..." if may_hold_secret(name) else safe_repr(raw)
    raise ConfigurationError(
        f"environment variable {variable}={shown} is invalid for option {name}: "
        f"expected {_expected(members)}"
    )


def _members(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _expected(members: tuple[Any, ...]) -> str:
    described = [_describe(member) for member in members if member is not type(None)]
    if type(None) in members:
        described.append("an empty value for None")
    return " or ".join(described)


def _describe(member: Any) -> str:
    origin = typing.get_origin(member) or member
    if member is bool:
        return "true/false (or 1/0, yes/no)"
    if member is int:
        return "an int"
    if member is float:
        return "a number"
    if member is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(choice) for choice in typing.get_args(member))
    if origin in (Mapping, dict):
        return 'a JSON object ({"key": "value"})'
    if origin in (tuple, list):
        return 'a JSON list (["postgresql://app@replica1/app"])'
    return "module:attr (a class or callable to import, e.g. myapp.db:AppSession)"


def _parser(member: Any) -> Callable[[str], Any]:
    origin = typing.get_origin(member) or member
    if member is bool:
        return _bool
    if member in (int, float):
        return lambda raw: _number(member, raw)
    if member is str:
        return str
    if origin is Literal:
        return lambda raw: _choice(typing.get_args(member), raw)
    if origin in (Mapping, dict):
        return lambda raw: _json(raw, dict)
    if origin in (tuple, list):
        return lambda raw: _json(raw, list)
    return _import


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _NotThis


def _number(kind: type[int] | type[float], raw: str) -> int | float:
    try:
        return kind(raw.strip())
    except ValueError:
        raise _NotThis from None


def _choice(choices: tuple[Any, ...], raw: str) -> Any:
    """The choice ``raw`` names, in any case, as the type spells it."""
    for choice in choices:
        if str(choice).lower() == raw.strip().lower():
            return choice
    raise _NotThis


def _json(raw: str, kind: type[dict[Any, Any]] | type[list[Any]]) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        raise _NotThis from None
    if not isinstance(value, kind):
        raise _NotThis
    return value


def _import(raw: str) -> Any:
    module_name, colon, attribute = raw.strip().partition(":")
    if not colon or not module_name or not attribute:
        raise _NotThis
    return import_object(raw)


def import_object(spec: str) -> Any:
    """``"package.module:attr.attr"`` → the object (also the pytest plugin's settings)."""
    module_name, colon, attribute = spec.strip().partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigurationError(f"{spec.strip()!r}: expected module:attr, e.g. myapp.db:db")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"could not import module {module_name!r} (from {spec.strip()!r}): {exc}; check "
            "the module's name and that it is importable (on sys.path)"
        ) from exc
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r} (from "
                f"{spec.strip()!r}); name a class or callable as module:attr"
            ) from None
    return found


@functools.cache
def _hints_of(cls: type) -> dict[str, Any]:
    """The evaluated annotations of ``cls``'s fields (strings under PEP 563)."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}
