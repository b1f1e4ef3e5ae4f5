"""Property-based tests of input validation (issue 11).

URLs, factory options and per-transaction options are mutated from valid ones; every
failure must be a ``SessionForgeError`` raised before any I/O (never a bare
``ValueError``/``TypeError``/``OverflowError`` or a SQLAlchemy error), and a password
never shows in a message, a repr, ``status()`` or the chain of the error raised.
Nothing here connects: engines are built but never used, and transactions end before
their first statement.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sessionforge import SessionFactory, SessionForgeError
from sessionforge.config import ENGINE_OPTIONS, PRESET_OPTIONS, SESSION_LEVEL_OPTIONS

MARKER = "pw-SECRET-marker"

# Random per run, a bounded budget: 195 examples in all, no deadline (the first
# example of a run imports drivers).
# too_slow: building a factory (and its engines) per example is the point of the test.
FEW = settings(max_examples=65, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 10**400, 1e-300, 2_200_000, 2147483.647]),
)
ODD_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\n", "é", "\ud800", "%", "%2F", "@", ":"]),
)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    ODD_TEXT,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(
        st.sampled_from(["password", "token", "api_key"]), st.just(MARKER), max_size=2
    ),
)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def assert_clean_failure(exc: BaseException) -> None:
    assert isinstance(exc, SessionForgeError), f"{type(exc).__module__}.{type(exc).__name__}"
    for link in chain(exc):
        assert MARKER not in str(link), f"password shown in {type(link).__name__}: {link}"
        assert MARKER not in repr(link.args)


def assert_nothing_shown(db: SessionFactory[Any]) -> None:
    for text in (repr(db), repr(db.config), repr(db.status()), str(db.config.describe())):
        assert MARKER not in text


def dispose_unused(db: SessionFactory[Any]) -> None:
    # Nothing was connected: closing the (empty) pools needs no event loop.
    engine = db._core.async_engine_if_built
    if engine is not None:
        engine.sync_engine.dispose()


# --- URLs ------------------------------------------------------------------------------

SCHEMES = st.sampled_from(
    [
        "postgresql",
        "postgres",
        "postgresql+asyncpg",
        "postgresql+psycopg",
        "POSTGRESQL",
        "postgresql+psycopg2",
        "postgresql+nope",
        "postgresql+asyncpg+x",
        "postgresql+",
        "sqlite",
        "sqlite+aiosqlite",
        "sqlite+pysqlite",
        "mysql+aiomysql",
        "oracel",
        "pöstgres",
        "",
    ]
)


@st.composite
def passwords(draw: st.DrawFn) -> str:
    """The marker with odd characters around it, percent-encoded or (mostly) not."""
    before, after = draw(ODD_TEXT), draw(ODD_TEXT)
    password = f"{before}{MARKER}{after}"
    return quote_plus(password, errors="surrogatepass") if draw(st.booleans()) else password


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(SCHEMES)
    user = draw(
        st.one_of(
            st.sampled_from(["app", "", "a b", "ü"]),
            ODD_TEXT.map(lambda text: quote_plus(text, errors="surrogatepass")),
        )
    )
    password = draw(st.one_of(st.none(), passwords()))
    userinfo = ""
    if password is not None:
        userinfo = f"{user}:{password}@"
    elif user and draw(st.booleans()):
        userinfo = f"{user}@"
    host = draw(
        st.one_of(
            st.sampled_from(["127.0.0.1", "db.internal", "[::1]", "", "hö.example", "h\x00"]),
            ODD_TEXT,
        )
    )
    port = draw(
        st.one_of(
            st.none(),
            st.integers(min_value=-10, max_value=100_000).map(str),
            st.sampled_from(["", "+5", " 5", "\u0665", "notaport", "5432"]),
        )
    )
    database = draw(st.one_of(st.sampled_from(["db", "", ":memory:", "a/b.db"]), ODD_TEXT))
    query = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["password", "PGPASSWORD", "pass%77ord", "token", "sslmode", ""]),
                st.one_of(st.just(MARKER), ODD_TEXT),
            ),
            max_size=3,
        )
    )
    pairs = []
    for key, value in query:
        if key in ("sslmode", ""):  # not a secret's name: never the marker, encoded
            value = quote_plus(value.replace(MARKER, "x"), errors="surrogatepass")
        pairs.append(f"{key}={value}")
    authority = f"{userinfo}{host}" + (f":{port}" if port is not None else "")
    url = f"{scheme}://{authority}/{database}"
    return url + ("?" + "&".join(pairs) if pairs else "")


@FEW
@given(url=urls())
def test_any_url_is_accepted_or_refused_with_a_sessionforge_error(url: str) -> None:
    try:
        db = SessionFactory(url)
        assert_nothing_shown(db)
        db.engine  # noqa: B018 - built without connecting: build errors show here
        assert_nothing_shown(db)
    except Exception as exc:
        assert_clean_failure(exc)
        event(type(exc).__name__)
    else:
        event("accepted")
        dispose_unused(db)


# --- factory options -------------------------------------------------------------------

# Every option the factory declares, plus names users try that are not ours.
OPTION_NAMES = st.sampled_from(
    [
        *sorted(
            ENGINE_OPTIONS | PRESET_OPTIONS | SESSION_LEVEL_OPTIONS - {"class_", "sync_class_"}
        ),
        "url",
        "bind",
        "binds",
        "pool_pre_ping",
        "future",
        "poolclass",
        "json_serializer",
        "twophase",
        "pool_sizes",
    ]
)
TARGETS = st.sampled_from(
    [
        "sqlite:////nonexistent-sessionforge-dir/app.db",
        "sqlite://",
        "postgresql+asyncpg://app:" + MARKER + "@db.invalid/shop",
        "postgresql://app@db.invalid/shop?password=" + MARKER,
    ]
)
GOOD_VALUES: dict[str, Any] = {
    "pool_size": 2,
    "pool_timeout": 3.5,
    "ping_after": 0,
    "sqlite_busy_timeout": 0.5,
    "sqlite_journal_mode": "delete",
    "isolation_level": "serializable",
    "connect_args": {"password": MARKER},
    "info": {"token": MARKER},
}


@st.composite
def option_dicts(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(OPTION_NAMES, max_size=3, unique=True))
    return {
        name: draw(st.one_of(st.just(GOOD_VALUES.get(name, True)), ANY_VALUE)) for name in names
    }


@FEW
@given(target=TARGETS, options=option_dicts())
def test_any_options_are_accepted_or_refused_with_a_sessionforge_error(
    target: str, options: dict[str, Any]
) -> None:
    try:
        db = SessionFactory(target, **options)
        assert_nothing_shown(db)
        db.engine  # noqa: B018 - an option only the engine build trips over shows here
        db.sync.engine  # noqa: B018
        assert_nothing_shown(db)
    except Exception as exc:
        assert_clean_failure(exc)
    else:
        dispose_unused(db)
        db.sync.dispose()


# --- per-transaction options -----------------------------------------------------------

ISOLATION_LEVELS = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "SERIALIZABLE",
            "repeatable_read",
            "READ UNCOMMITTED",
            "read committed",
            "AUTOCOMMIT",
            "SNAPSHOT",
            "",
            " serializable ",
        ]
    ),
    ANY_VALUE,
)
SETTING_NAMES = st.one_of(
    st.sampled_from(["app.tenant_id", "statement_timeout", "work_mem", "app.x\n", "a b", "1x"]),
    ODD_TEXT,
    st.integers(),
)
TRANSACTION_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "isolation_level": ISOLATION_LEVELS,
        "readonly": st.one_of(st.booleans(), ANY_VALUE),
        "timeout": st.one_of(st.none(), NUMBERS, ANY_VALUE),
        "settings": st.one_of(
            st.none(),
            st.dictionaries(SETTING_NAMES, ANY_VALUE, max_size=2),
            ANY_VALUE,
        ),
    },
)
BEGIN_TARGETS = st.sampled_from(["sqlite://", "postgresql+asyncpg://app@db.invalid/shop"])


class Ended(Exception):
    """Raised by the transaction function before its first statement: no I/O."""


def outcome(call: Any) -> str:
    """'ok' (valid options), or the refusal, checked to be a clean SessionForgeError."""
    try:
        call()
    except Ended:
        return "ok"
    except Exception as exc:
        assert_clean_failure(exc)
        return type(exc).__name__
    return "ok"


@FEW
@given(target=BEGIN_TARGETS, options=TRANSACTION_OPTIONS)
def test_begin_options_fail_the_same_clean_way_on_every_entry_point(
    target: str, options: dict[str, Any]
) -> None:
    db = SessionFactory(target)

    async def ended(session: Any) -> None:
        raise Ended

    def ended_sync(session: Any) -> None:
        raise Ended

    def run_async() -> None:
        with asyncio.Runner() as runner:
            runner.run(db.run_transaction(ended, retries=0, **options))

    outcomes = {
        "begin": outcome(lambda: db.begin(**options)),
        "sync.begin": outcome(lambda: db.sync.begin(**options)),
        "run_transaction": outcome(run_async),
        "sync.run_transaction": outcome(
            lambda: db.sync.run_transaction(ended_sync, retries=0, **options)
        ),
    }
    assert len(set(outcomes.values())) == 1, outcomes  # the twins agree
    event(outcomes["begin"])  # --hypothesis-show-statistics: how many were valid
    timeout = options.get("timeout")
    if outcomes["begin"] == "ok" and timeout is not None:
        assert math.isfinite(timeout)
        assert timeout > 0
    assert_nothing_shown(db)
    dispose_unused(db)
    db.sync.dispose()


@pytest.mark.parametrize("marker_in", ["password", "query"])
def test_the_marker_is_really_masked_where_it_is_given(marker_in: str) -> None:
    # The properties would pass vacuously if the marker never reached the factory.
    url = (
        f"postgresql://app:{MARKER}@db.invalid/shop"
        if marker_in == "password"
        else f"postgresql://app@db.invalid/shop?password={MARKER}"
    )
    db = SessionFactory(url)
    assert MARKER in (db.url.password or "") + str(db.url.query.get("password"))
    assert_nothing_shown(db)
