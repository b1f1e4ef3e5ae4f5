"""Tests of the ``sessionforge`` command (``check`` and ``demo``) and of ``demo.py``.

Most tests call ``main([...])`` in-process; a few run ``python -m sessionforge`` to see
what a user sees: the exit code and that no traceback or password reaches the terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy.engine import URL, make_url

from sessionforge import SessionFactory
from sessionforge._internal.core import FactoryStatus
from sessionforge._internal.engines import EngineStatus
from sessionforge.cli import main
from sessionforge.cli.demo import DemoResult, ProgressLine, format_demo, run_demo
from sessionforge.cli.workload import DemoProgress, DemoSettings, build_models
from sessionforge.errors import DatabaseUnavailableError

from .pgcluster import LOGIN, POSTGRES_DRIVERS, WRONG_PASSWORD, PostgresServer, spellings

SECRET = "s3cret"
UNREACHABLE = f"postgresql://u:{SECRET}@127.0.0.1:1/x"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
#: The role of the private server that checks passwords; both passwords need
#: percent-encoding in a URL.


# helpers -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own directory, without the caller's DATABASE_URL."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)


def run_module(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``python -m sessionforge args`` and return (exit code, stdout, stderr)."""
    environment = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    environment.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "sessionforge", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(err: str, command: str) -> str:
    """``err`` is exactly one ``sessionforge <command>: ...`` line; return it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sessionforge {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def existing_sqlite_url(path: Path) -> str:
    """The URL of a SQLite file made here (``check`` creates none)."""
    sqlite3.connect(path).close()
    return sqlite_url(path)


# check -------------------------------------------------------------------------------


def test_check_sqlite_file_describes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", existing_sqlite_url(tmp_path / "check.db")]) == 0

    out = capsys.readouterr().out
    assert f"url:      sqlite+sessionforge:///{tmp_path / 'check.db'} (command line)" in out
    assert "dialect:  sqlite\n" in out
    assert "driver:   sessionforge\n" in out
    assert "server:   sqlite 3." in out
    assert "begin=immediate" in out
    assert "journal_mode=WAL" in out
    assert "pool:     AsyncAdaptedQueuePool size=5 max_overflow=10 timeout=30s" in out
    assert "ping:     " in out
    assert " ms\n" in out


def test_check_defaults_to_the_embedded_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing_sqlite_url(tmp_path / "sessionforge.db")

    assert main(["check"]) == 0

    assert "sqlite+sessionforge:///sessionforge.db (embedded default)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        pytest.param(
            [], None, "sqlite+sessionforge:///sessionforge.db (embedded default)", id="default"
        ),
        pytest.param(
            ["sqlite:///new.db"], None, "sqlite+sessionforge:///new.db (command line)", id="url"
        ),
        pytest.param(
            [], "sqlite:///new.db", "sqlite+sessionforge:///new.db (DATABASE_URL)", id="env"
        ),
    ],
)
def test_check_reports_a_missing_sqlite_file_and_creates_nothing(
    args: list[str],
    env: str | None,
    shown: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if env is not None:
        monkeypatch.setenv("DATABASE_URL", env)

    assert main(["check", *args]) == 3

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert f"the SQLite database {shown} does not exist yet" in line
    assert "will be created on first use; check created nothing" in line
    assert list(tmp_path.iterdir()) == []


def test_check_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["check", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert "A SQLite file that does not exist is reported, not created." in out
    assert "3 the SQLite file does not exist yet" in out


def test_check_reads_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", existing_sqlite_url(tmp_path / "env.db"))

    assert main(["check"]) == 0

    assert f"{tmp_path / 'env.db'} (DATABASE_URL)" in capsys.readouterr().out


def test_check_unreachable_server_exits_1_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--timeout", "5", UNREACHABLE]) == 1

    captured = capsys.readouterr()
    line = assert_one_line_error(captured.err, "check")
    assert "cannot reach the database at postgresql+asyncpg://u:***@127.0.0.1:1/x" in line
    assert SECRET not in captured.out + captured.err


def test_check_unreachable_from_the_environment_in_a_subprocess(tmp_path: Path) -> None:
    code, out, err = run_module(
        "check", "--timeout", "5", cwd=tmp_path, env={"DATABASE_URL": UNREACHABLE}
    )

    assert code == 1
    assert_one_line_error(err, "check")
    assert SECRET not in out + err


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        pytest.param("not a url", "could not parse the database URL", id="malformed"),
        pytest.param(
            f"postgresql://u:{SECRET}@127.0.0.1:notaport/x",
            "127.0.0.1:notaport/x",
            id="bad-port",
        ),
        pytest.param(
            f"postgresql+nope://u:{SECRET}@127.0.0.1/x",
            "unknown driver 'nope' for postgresql",
            id="unknown-driver",
        ),
        pytest.param(
            f"nosuchdb://u:{SECRET}@h/x", "unknown database dialect", id="unknown-dialect"
        ),
        pytest.param(
            f"postgresql+psycopg2://u:{SECRET}@127.0.0.1/x",
            "postgresql+psycopg2 is a sync driver",
            id="sync-driver",
        ),
    ],
)
def test_check_configuration_errors_exit_2_with_one_line(
    url: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", url]) == 2

    captured = capsys.readouterr()
    assert reason in assert_one_line_error(captured.err, "check")
    assert SECRET not in captured.out + captured.err


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"postgresql://app:{SECRET}@127.0.0.1:99999/app", id="port-too-big"),
        pytest.param(f"postgresql://app:{SECRET}@127.0.0.1:-1/app", id="negative-port"),
    ],
)
def test_check_out_of_range_port_is_one_line_without_the_password(
    url: str, tmp_path: Path
) -> None:
    # ConfigurationError (exit 2) once the URL parser refuses such ports; until then
    # the driver's OverflowError, caught as unexpected (exit 1). Never a traceback.
    code, out, err = run_module("check", "--timeout", "5", url, cwd=tmp_path)

    assert code in (1, 2), err
    assert "port" in assert_one_line_error(err, "check")
    assert out == ""
    assert SECRET not in err


def test_an_unexpected_error_is_one_line_exit_1_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError(f"the driver said {SECRET!r}")

    monkeypatch.setattr("sessionforge.cli.check.gather_check", broken)

    assert main(["check", f"postgresql://u:{SECRET}@127.0.0.1/x"]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert line == "sessionforge check: unexpected error: RuntimeError: the driver said '***'"


def test_check_names_a_missing_sqlite_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path / "no" / "such" / "dir.db")

    assert main(["check", url]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert f"the directory {tmp_path / 'no' / 'such'} does not exist; create it" in line
    assert "check that the server is up" not in line
    assert list(tmp_path.iterdir()) == []


def test_check_names_a_directory_given_for_a_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()

    assert main(["check", sqlite_url(tmp_path / "data")]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert f"{tmp_path / 'data'} is a directory; the URL must name a file" in line
    assert "check that the server is up" not in line


def test_demo_names_a_missing_sqlite_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path / "nowhere" / "demo.db")

    assert main(["demo", "--url", url]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "demo")
    assert f"the directory {tmp_path / 'nowhere'} does not exist; create it" in line


def test_python_m_sessionforge_check_in_a_subprocess(tmp_path: Path) -> None:
    code, out, err = run_module("check", existing_sqlite_url(tmp_path / "sub.db"), cwd=tmp_path)

    assert code == 0, err
    assert "dialect:  sqlite" in out
    assert err == ""


def test_sync_driver_in_a_subprocess_is_one_line_exit_2(tmp_path: Path) -> None:
    code, out, err = run_module("check", f"postgresql+psycopg2://u:{SECRET}@h/x", cwd=tmp_path)

    assert code == 2
    assert_one_line_error(err, "check")
    assert SECRET not in out + err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: sessionforge" in capsys.readouterr().err


# demo on SQLite ----------------------------------------------------------------------


def test_demo_on_the_embedded_file_keeps_the_invariant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--workers", "4", "--transfers", "25", "--seed", "1"]) == 0

    out = capsys.readouterr().out
    assert "committed:   100 of 100 transfers (0 failed)" in out
    assert "log rows:    100" in out
    assert "total:       20000 (expected 20000 = 20 x 1000)" in out
    assert "reconciled:  20 of 20 accounts" in out
    assert "INVARIANT HOLDS" in out
    assert "transfers/s" in out
    assert "pool:        AsyncAdaptedQueuePool" in out
    assert (tmp_path / "sessionforge-demo.db").exists()


async def test_run_demo_returns_a_consistent_result_under_contention(tmp_path: Path) -> None:
    # Three accounts, eight workers: nearly every pair of transfers collides.
    seen: list[DemoProgress] = []
    settings = DemoSettings(
        url=sqlite_url(tmp_path / "hot.db"), workers=8, transfers=25, accounts=3, seed=7
    )

    result = await run_demo(settings, seen.append)

    assert result.problems() == []
    assert result.invariant_holds
    assert (result.committed, result.failed, result.logged) == (200, 0, 200)
    assert result.final_total == result.expected_total == 3000
    assert result.mismatched_accounts == 0
    assert result.pool.checked_out == 0
    assert result.throughput > 0
    assert seen[-1] == DemoProgress(done=200, failed=0, total=200, elapsed=seen[-1].elapsed)


def test_demo_runs_twice_on_the_same_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tables are dropped and recreated, so a second run starts from 20 x 1000 again.
    args = ["demo", "--url", sqlite_url(tmp_path / "again.db"), "--workers", "2"]
    assert main([*args, "--transfers", "10"]) == 0
    assert main([*args, "--transfers", "5"]) == 0

    out = capsys.readouterr().out
    assert out.count("INVARIANT HOLDS") == 2
    assert "committed:   10 of 10" in out


def test_demo_plain_reports_the_outcome_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    # Bare aiosqlite may or may not lose updates in a short run; either way the
    # numbers are reported and the exit code is 0.
    assert main(["demo", "--plain", "--workers", "4", "--transfers", "25", "--accounts", "3"]) == 0

    out = capsys.readouterr().out
    assert "bare SQLAlchemy async_sessionmaker" in out
    assert "(expected 3000 = 3 x 1000)" in out
    assert ("INVARIANT HOLDS" in out) != ("INVARIANT BROKEN" in out)


def _result(*, plain: bool, final_total: int) -> DemoResult:
    engine = EngineStatus(
        role="async",
        url="sqlite+aiosqlite:///x.db",
        pool="AsyncAdaptedQueuePool",
        size=5,
        max_overflow=10,
        timeout=30.0,
        checked_in=5,
        checked_out=0,
        overflow=0,
    )
    return DemoResult(
        mode="plain" if plain else "sessionforge",
        url="sqlite+aiosqlite:///x.db",
        dialect="sqlite",
        driver="aiosqlite",
        workers=2,
        accounts=2,
        attempted=10,
        committed=9,
        failed=1,
        logged=9,
        expected_total=2000,
        final_total=final_total,
        mismatched_accounts=0 if final_total == 2000 else 2,
        elapsed=1.0,
        pool=FactoryStatus(checked_out=0, engines=(engine,)),
        peak_checked_out=2,
        errors={"OperationalError: database is locked": 1},
    )


@pytest.mark.parametrize(("plain", "code"), [(False, 1), (True, 0)])
def test_a_broken_invariant_is_reported(
    plain: bool, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(settings: DemoSettings, progress: object = None) -> DemoResult:
        return _result(plain=settings.plain, final_total=1900)

    monkeypatch.setattr("sessionforge.cli.demo.run_demo", broken)

    assert main(["demo", *(["--plain"] if plain else [])]) == code

    out = capsys.readouterr().out
    assert "INVARIANT BROKEN:" in out
    assert "total balance is 1900, expected 2000 (off by -100)" in out
    assert "2 of 2 account balances disagree" in out
    assert "1 x OperationalError: database is locked" in out
    explained = "(expected with --plain: this is what bare SQLAlchemy does to the workload"
    assert (explained in out) == plain


def test_format_demo_counts_committed_against_logged() -> None:
    result = _result(plain=False, final_total=2000)
    lost = dataclasses.replace(result, logged=8)

    assert "INVARIANT HOLDS" in format_demo(result)[-1]
    assert "  - 9 transfers committed but 8 are in the log" in format_demo(lost)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--workers", "0"], "workers must be at least 1"),
        (["--transfers", "-1"], "transfers must be at least 0"),
        (["--accounts", "1"], "accounts must be at least 2"),
        (["--table-prefix", "no-dashes"], "table prefix 'no-dashes'"),
        (["--url", f"postgresql+psycopg2://u:{SECRET}@h/x"], "is a sync driver"),
        (["--url", "not a url"], "could not parse the database URL"),
    ],
)
def test_demo_configuration_errors_exit_2(
    args: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2

    captured = capsys.readouterr()
    assert reason in assert_one_line_error(captured.err, "demo")
    assert captured.out == ""  # the error comes before the header
    assert SECRET not in captured.err


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("postgresql://app@127.0.0.1:1/db", "app@127.0.0.1:1/db", id="no-password"),
        pytest.param(
            f"postgresql://app:{SECRET}@127.0.0.1:1/db", "app:***@127.0.0.1:1/db", id="password"
        ),
    ],
)
def test_demo_header_masks_only_the_password(
    url: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--url", url]) == 1  # nothing listens on port 1

    captured = capsys.readouterr()
    assert captured.out.startswith("demo: 10 workers x 200 transfers between 20 accounts on ")
    assert f" on postgresql+asyncpg://{shown} (sessionforge SessionFactory)" in captured.out
    assert SECRET not in captured.out + captured.err


def test_demo_help_says_plain_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["demo", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert "it may end in INVARIANT BROKEN" in out
    assert "so it exits 0 either way" in out
    assert "0 the invariant holds, or --plain ran (whatever its outcome)" in out


@pytest.mark.parametrize("plain", [False, True])
def test_demo_unreachable_server_exits_1_without_the_password(
    plain: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--url", UNREACHABLE, *(["--plain"] if plain else [])]) == 1

    captured = capsys.readouterr()
    assert "cannot reach the database" in assert_one_line_error(captured.err, "demo")
    assert SECRET not in captured.out + captured.err


async def test_run_demo_raises_database_unavailable() -> None:
    with pytest.raises(DatabaseUnavailableError, match=r"u:\*\*\*@127\.0\.0\.1:1"):
        await run_demo(DemoSettings(url=UNREACHABLE))


# progress ------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    stream = _Terminal()
    progress = ProgressLine(stream)

    progress(DemoProgress(done=1000, failed=0, total=2000, elapsed=2.0))
    progress(DemoProgress(done=2000, failed=1, total=2000, elapsed=4.0))
    progress.finish()

    text = stream.getvalue()
    assert text.startswith("\r1000/2000 transfers, 0 failed, 500 tx/s, 2.0 s")
    assert "\r2000/2000 transfers, 1 failed, 500 tx/s, 4.0 s" in text
    assert text.count("\n") == 1
    assert text.endswith("\n")


def test_progress_prints_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = ProgressLine(stream)

    progress(DemoProgress(done=10, failed=0, total=20, elapsed=0.5))
    progress(DemoProgress(done=20, failed=0, total=20, elapsed=1.0))
    progress.finish()

    assert stream.getvalue().splitlines() == [
        "  10/20 transfers, 0 failed, 20 tx/s, 0.5 s",
        "  20/20 transfers, 0 failed, 20 tx/s, 1.0 s",
    ]


# PostgreSQL --------------------------------------------------------------------------


async def _unreachable_reason(url: str) -> str | None:
    """``None`` when ``url`` answers a ping, else why not."""
    db = SessionFactory(url)
    try:
        await db.ping(timeout=5)
    except DatabaseUnavailableError as exc:
        return str(exc)
    finally:
        await db.dispose()
    return None


@pytest.fixture
def postgres_url() -> str:
    """The test server's URL; skip when it is down, unless CI=true says it must be up."""
    url = os.environ.get("SESSIONFORGE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    reason = asyncio.run(_unreachable_reason(url))
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required when CI=true: {reason}")
        pytest.skip(f"PostgreSQL is not reachable: {reason}")
    return url


@pytest.fixture
def table_prefix(postgres_url: str) -> Iterator[str]:
    """A prefix no other test run uses; its tables are dropped afterwards."""
    prefix = f"sf_demo_test_{uuid.uuid4().hex[:8]}"
    yield prefix
    db = SessionFactory(postgres_url)
    with db.sync.engine.begin() as connection:
        build_models(prefix).metadata.drop_all(connection)
    db.sync.dispose()


@pytest.mark.postgres
def test_check_postgres(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", postgres_url]) == 0

    out = capsys.readouterr().out
    assert "dialect:  postgresql" in out
    assert "server:   postgresql " in out
    assert "pgbouncer=False" in out


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
def test_check_names_a_missing_database(
    pg_url: str, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"sf_missing_{uuid.uuid4().hex[:8]}"

    assert main(["check", _render(make_url(pg_url).set(drivername=driver, database=name))]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert f'/{name} answered, but database "{name}" does not exist: create it' in line
    assert "check that the server is up" not in line


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
def test_check_names_a_missing_role(
    pg_url: str, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    role = f"sf_nobody_{uuid.uuid4().hex[:8]}"

    assert main(["check", _render(make_url(pg_url).set(drivername=driver, username=role))]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "check")
    assert f'answered, but role "{role}" does not exist: create it (CREATE ROLE' in line
    assert "check that the server is up" not in line


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
def test_check_names_a_wrong_password(
    password_server: PostgresServer, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = password_server.login_url.set(drivername=driver, password=WRONG_PASSWORD)

    assert main(["check", _render(url)]) == 1

    captured = capsys.readouterr()
    line = assert_one_line_error(captured.err, "check")
    assert line == (
        f"sessionforge check: the server at {driver}://app:***@127.0.0.1:"
        f"{password_server.port}/postgres answered, but password authentication failed "
        'for user "app": check the password (in the URL, or what password= returns)'
    )
    assert captured.out == ""
    for spelling in spellings(WRONG_PASSWORD) | {SECRET}:
        assert spelling not in captured.err


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
def test_check_with_the_right_password_masks_it(
    password_server: PostgresServer, driver: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = password_server.login_url.set(drivername=driver)

    assert main(["check", _render(url)]) == 0

    captured = capsys.readouterr()
    port = password_server.port
    assert f"url:      {driver}://app:***@127.0.0.1:{port}/postgres (command line)" in captured.out
    assert captured.out.endswith("ok\n")
    for spelling in spellings(LOGIN.password):
        assert spelling not in captured.out + captured.err


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("password", "code", "shown"),
    [
        # The server echoes nothing of the URL; check prints it, masked.
        pytest.param(LOGIN.password, 0, "url:      postgresql+asyncpg://app:***@", id="right"),
        # The server's refusal names the user.
        pytest.param(
            WRONG_PASSWORD, 1, 'password authentication failed for user "app"', id="wrong"
        ),
    ],
)
def test_check_never_prints_the_password(
    password_server: PostgresServer, password: str, code: int, shown: str, tmp_path: Path
) -> None:
    url = _render(password_server.login_url.set(password=password))
    assert quote(password, safe="") in url  # percent-encoded, as a user must write it

    returned, out, err = run_module("check", cwd=tmp_path, env={"DATABASE_URL": url})

    assert returned == code, err
    assert shown in out + err
    assert "Traceback" not in err
    for spelling in spellings(password) | {SECRET}:
        assert spelling not in out + err


@pytest.mark.postgres
def test_demo_names_a_missing_postgres_database(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"sf_missing_{uuid.uuid4().hex[:8]}"

    assert main(["demo", "--url", _render(make_url(pg_url).set(database=name))]) == 1

    line = assert_one_line_error(capsys.readouterr().err, "demo")
    assert f'database "{name}" does not exist: create it' in line


@pytest.mark.postgres
def test_demo_on_postgres_keeps_the_invariant(
    postgres_url: str, table_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three accounts make most transfers collide: without FOR UPDATE this loses updates.
    args = ["--workers", "8", "--transfers", "25", "--accounts", "3"]
    assert main(["demo", "--url", postgres_url, "--table-prefix", table_prefix, *args]) == 0

    out = capsys.readouterr().out
    assert "committed:   200 of 200 transfers (0 failed)" in out
    assert "total:       3000 (expected 3000 = 3 x 1000)" in out
    assert "INVARIANT HOLDS" in out


@pytest.mark.postgres
async def test_run_demo_on_postgres_plain_and_sessionforge(
    postgres_url: str, table_prefix: str
) -> None:
    for plain in (False, True):
        settings = DemoSettings(
            url=postgres_url,
            workers=6,
            transfers=20,
            accounts=4,
            table_prefix=table_prefix,
            plain=plain,
        )
        result = await run_demo(settings)
        assert result.problems() == [], result
        assert (result.committed, result.logged, result.final_total) == (120, 120, 4000)
        assert result.pool.checked_out == 0
