"""``sessionforge check URL --replica URL ...`` against a real primary and two replicas.

The topology (``tests/pgcluster.replicated_postgres``) serves the module; a test that
stops or pauses a replica puts it back before it ends. What a user reads is checked:
each server's role, cluster and lag, the error line and the exit code (4 when the primary
answers but a replica does not pass, ``sessionforge.cli.exits.EXIT_TOPOLOGY``), and that
no password reaches the terminal.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy.engine import URL

from sessionforge.cli import main

from .pgcluster import (
    LOGIN,
    WRONG_PASSWORD,
    PostgresServer,
    Replicated,
    private_postgres,
    replicated_postgres,
    spellings,
)

pytestmark = pytest.mark.postgres

#: More WAL than an idle primary writes between two reads of its position (a standby
#: snapshot record is some 50 bytes), and less than ``_write`` makes.
IDLE_WAL: Final = 4096
ROWS: Final = 1000


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test in its own directory, without the caller's DATABASE_URL."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Replicated]:
    """A primary and two asynchronous replicas for the module."""
    with replicated_postgres(replicas=2) as built:
        built.primary.sql("CREATE TABLE items (n int)")
        built.wait_caught_up()
        yield built


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``sessionforge check args`` in-process: (exit code, stdout, stderr)."""
    code = main(["check", "--timeout", "5", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def replica_args(*servers: PostgresServer) -> list[str]:
    return [arg for server in servers for arg in ("--replica", server.url)]


def block(out: str, url: str) -> list[str]:
    """The lines ``check`` printed under ``replica:  url``, up to the next server."""
    lines = out.splitlines()
    start = lines.index(f"replica:  {url}") + 1
    end = start
    while end < len(lines) and lines[end].startswith("  "):
        end += 1
    return lines[start:end]


def lag(lines: list[str]) -> int:
    """The bytes a replica's ``lag:`` line shows."""
    found = [re.fullmatch(r"  lag:      (\d+) bytes behind the primary.*", line) for line in lines]
    (match,) = [m for m in found if m]
    return int(match[1])


def lsn(text: str) -> int:
    """A ``pg_lsn`` as psql prints it (``0/3000148``), in bytes."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def system_identifier(server: PostgresServer) -> str:
    return server.scalar("SELECT system_identifier FROM pg_control_system()")


def test_every_server_shows_its_role_cluster_and_lag(
    cluster: Replicated, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.wait_caught_up()

    code, out, err = check(capsys, cluster.primary.url, *replica_args(*cluster.replicas))

    assert (code, err) == (0, "")
    identifier = system_identifier(cluster.primary)
    lines = out.splitlines()
    assert lines[0] == f"url:      {cluster.primary.url} (command line)"
    assert "role:     primary" in lines
    assert f"cluster:  {identifier} (system identifier)" in lines
    for replica in cluster.replicas:
        shown = block(out, replica.url)
        assert "  role:     replica (in recovery)" in shown
        assert f"  cluster:  {identifier} (system identifier)" in shown
        assert lag(shown) < IDLE_WAL
        assert not any("error:" in line or "warning:" in line for line in shown)
    assert lines[-1] == "ok"


def test_a_paused_replica_shows_the_wal_it_has_not_replayed(
    cluster: Replicated, capsys: pytest.CaptureFixture[str]
) -> None:
    paused, running = cluster.replicas
    cluster.pause_replay(paused)
    try:
        cluster.primary.sql(f"INSERT INTO items SELECT generate_series(1, {ROWS})")
        written = lsn(cluster.wait_caught_up(replicas=[running]))
        behind = written - lsn(paused.scalar("SELECT pg_last_wal_replay_lsn()"))

        code, out, _ = check(capsys, cluster.primary.url, *replica_args(paused, running))
    finally:
        cluster.resume_replay(paused)

    assert code == 0
    assert behind > IDLE_WAL
    shown = block(out, paused.url)
    assert lag(shown) >= behind  # the primary only moves on; the paused replica does not
    (line,) = [line for line in shown if line.startswith("  lag:")]
    assert ", last replayed commit made " in line
    assert line.endswith(", replay paused (SELECT pg_wal_replay_resume() on it resumes)")
    assert lag(block(out, running.url)) < IDLE_WAL
    assert out.splitlines()[-1] == "ok"


def test_a_stopped_replica_is_explained_and_exits_4(
    cluster: Replicated, capsys: pytest.CaptureFixture[str]
) -> None:
    running, stopped = cluster.replicas
    cluster.stop(stopped)
    try:
        code, out, err = check(capsys, cluster.primary.url, *replica_args(running, stopped))
    finally:
        cluster.start(stopped)
        cluster.wait_streaming()

    assert code == 4
    reason = f"cannot reach the database at {stopped.url} (ConnectionRefusedError"
    (error,) = block(out, stopped.url)
    assert error.startswith(f"  error:    {reason}")
    assert error.endswith(
        "check that the server is up, the host and port, and any firewall in between"
    )
    assert "  role:     replica (in recovery)" in block(out, running.url)
    assert "ok" not in out.splitlines()
    (line,) = err.splitlines()
    assert line.startswith(
        f"sessionforge check: the primary answered, but 1 of 2 replicas failed the check: {reason}"
    )


def test_a_server_of_another_cluster_is_an_error(
    cluster: Replicated, capsys: pytest.CaptureFixture[str]
) -> None:
    with private_postgres() as other:
        code, out, err = check(capsys, cluster.primary.url, "--replica", other.url)
        theirs = system_identifier(other)

    ours = system_identifier(cluster.primary)
    assert code == 4
    assert theirs != ours
    shown = block(out, other.url)
    assert "  role:     primary" in shown
    assert "  lag:      n/a (not a standby of this primary)" in shown
    assert "  warning:  not in recovery: this server is a primary, not a streaming replica" in (
        "\n".join(shown)
    )
    reason = f"another cluster: system identifier {theirs}, the primary's is {ours}"
    assert (
        f"  error:    {reason}; it cannot be a replica of this primary: fix the replica URL"
        in (shown)
    )
    assert err.splitlines() == [
        "sessionforge check: the primary answered, but 1 of 1 replica failed the check: "
        f"replica {other.url}: {reason}; it cannot be a replica of this primary: fix the "
        "replica URL"
    ]


@pytest.mark.parametrize(
    ("attrs", "answering", "role"),
    [
        pytest.param("?target_session_attrs=read-write", "primary", "primary", id="read-write"),
        pytest.param("", "replica1", "replica (in recovery)", id="first-host-is-a-standby"),
    ],
)
def test_a_host_list_names_the_host_that_answered(
    cluster: Replicated, capsys: pytest.CaptureFixture[str], attrs: str, answering: str, role: str
) -> None:
    replica = cluster.replicas[0]
    hosts = f"127.0.0.1:{replica.port},127.0.0.1:{cluster.primary.port}"
    url = f"postgresql://postgres@{hosts}/postgres{attrs}"

    code, out, err = check(capsys, url)

    assert (code, err) == (0, "")
    port = cluster.topology.servers[answering].port
    lines = out.splitlines()
    assert (
        f"url:      postgresql+asyncpg://postgres@{hosts}/postgres{attrs} (command line)" in lines
    )
    assert f"role:     {role}" in lines
    assert f"host:     127.0.0.1:{port} answered" in lines
    warning = "warning:  the primary URL reached a standby (in recovery): writes will fail"
    if answering == "primary":
        assert lines[-1] == "ok"
        assert not any(line.startswith("warning:") for line in lines)
    else:
        assert lines[-1] == "ok (1 warning)"
        assert any(line.startswith(warning) for line in lines)


@pytest.fixture(scope="module")
def login_cluster() -> Iterator[Replicated]:
    """A primary and one replica that ask for ``LOGIN``'s password over TCP."""
    with replicated_postgres(replicas=1, login=LOGIN) as built:
        yield built


def test_no_password_reaches_the_terminal(login_cluster: Replicated, tmp_path: Path) -> None:
    primary, (replica,) = login_cluster.primary, login_cluster.replicas
    right = replica.login_url
    wrong = right.set(password=WRONG_PASSWORD)
    command = [sys.executable, "-m", "sessionforge", "check", "--timeout", "5"]
    command += [_render(primary.login_url), "--replica", _render(right)]
    command += ["--replica", _render(wrong)]

    done = subprocess.run(
        command,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    shown = f"postgresql+asyncpg://app:***@127.0.0.1:{replica.port}/postgres"
    assert done.returncode == 4, done.stderr
    assert (
        f"url:      postgresql+asyncpg://app:***@127.0.0.1:{primary.port}/postgres" in done.stdout
    )
    assert done.stdout.count(f"replica:  {shown}") == 2
    assert "  role:     replica (in recovery)" in done.stdout
    refusal = f'the server at {shown} answered, but password authentication failed for user "app"'
    assert (
        f"  error:    {refusal}: check the password (in the URL, or what password= returns)"
        in done.stdout
    )
    (line,) = done.stderr.splitlines()
    assert refusal in line
    assert "Traceback" not in done.stderr
    for spelling in spellings(LOGIN.password) | spellings(WRONG_PASSWORD):
        assert spelling not in done.stdout + done.stderr


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def test_help_documents_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="0"):
        main(["check", "--help"])

    out = " ".join(capsys.readouterr().out.split())
    assert "--replica URL" in out
    assert "4 the primary answered, but a replica is unreachable, refused the connection or" in out
    assert "a warning, such as a replica that is not in recovery, leaves it 0" in out


def test_replicas_of_a_sqlite_database_are_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = check(capsys, "sqlite:///app.db", "--replica", "postgresql://u:pw@h/app")

    assert (code, out) == (2, "")
    (line,) = err.splitlines()
    assert line.startswith("sessionforge check: ")
    assert "PostgreSQL" in line
    assert ":pw@" not in err
