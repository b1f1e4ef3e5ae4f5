"""Private PostgreSQL servers built from nothing, for tests that must stop or break one.

The shared server (port 5432) is never touched: each ``PostgresServer`` is a fresh
``initdb`` in a temporary directory, listening on a free loopback port with trust
authentication, run as the ``postgres`` OS user (the tests run as root, and PostgreSQL
refuses to run as root). ``Topology`` owns the temporary directory and every server in
it, and stops them all (``pg_ctl stop -m immediate``) and removes the directory when it
closes — a paused server is resumed first, or it could not be stopped. It is built for
more than one server: the scale-out tests add a primary and its streaming replicas to
one topology (``settings`` for ``wal_level`` and friends, ``run`` for
``pg_basebackup``).

A server built with a ``Login`` checks passwords instead: ``pg_hba.conf`` asks every
TCP connection (on 127.0.0.1) for a scram-sha-256 password, and the login's role is
created with its password as the server starts. The ``postgres`` superuser keeps trust
over the server's private unix socket, which is how the module administers it;
``login_url`` is the URL a client uses.

``private_postgres()`` skips when the PostgreSQL binaries are missing, except under
``CI=true``, where it fails (conftest's ``IN_CI``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy.engine import URL

from .conftest import IN_CI

__all__ = [
    "PG_BIN",
    "Login",
    "PostgresServer",
    "Topology",
    "missing_binaries",
    "private_postgres",
]

PG_BIN: Final = Path(os.environ.get("SESSIONFORGE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER: Final = "postgres"
START_TIMEOUT: Final = 30.0

#: Settings for a throwaway server: nothing durable, little memory, quick to start.
FAST_SETTINGS: Final[Mapping[str, str]] = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
    "max_wal_senders": "4",
    "logging_collector": "off",
}


#: ``pg_hba.conf`` of a server with a ``Login``; the ``postgres`` superuser is trusted on
#: the private socket only (``unix_socket_directories`` is the server's own directory).
PASSWORD_HBA: Final = """\
# tests/pgcluster.py: a password for every TCP connection
local   all   postgres                  trust
host    all   all        127.0.0.1/32   scram-sha-256
"""


@dataclass(frozen=True, slots=True)
class Login:
    """A role that logs in with ``password`` over TCP, created as the server starts."""

    user: str
    password: str


def missing_binaries(*, login: bool = False) -> str | None:
    """Why private servers (with a ``Login``: psql too) cannot be built here, or ``None``."""
    for program in ("initdb", "pg_ctl", "postgres", *(["psql"] if login else [])):
        if not (PG_BIN / program).is_file():
            return f"PostgreSQL binary {PG_BIN / program} not found"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no {OS_USER!r} OS user to run PostgreSQL as"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != OS_USER:
        return f"private PostgreSQL servers need root or the {OS_USER!r} user"
    return None


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run(*args: str | Path, timeout: float = START_TIMEOUT) -> str:
    """Run a PostgreSQL program as the ``postgres`` user; return its output."""
    command = [str(arg) for arg in args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", OS_USER, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


class PostgresServer:
    """One PostgreSQL server in ``directory``, on ``port`` (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        login: Login | None = None,
    ) -> None:
        self.directory = directory
        self.login = login
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.port = port if port is not None else free_port()
        self.settings = {**FAST_SETTINGS, **(settings or {}), "port": str(self.port)}
        self.settings["unix_socket_directories"] = f"'{self.sockets}'"
        if login is not None:
            self.settings["password_encryption"] = "'scram-sha-256'"
        self._paused = False
        self._running = False

    def __repr__(self) -> str:
        return f"<PostgresServer {self.data} on 127.0.0.1:{self.port}>"

    @property
    def url(self) -> str:
        """The asyncpg URL of the ``postgres`` database as the ``postgres`` user."""
        return f"postgresql+asyncpg://{OS_USER}@127.0.0.1:{self.port}/postgres"

    @property
    def login_url(self) -> URL:
        """The asyncpg URL of the ``postgres`` database as the login's role, with its password.

        Only for a server built with a ``Login``; ``.set(password=...)`` gives a wrong one.
        """
        if self.login is None:
            raise RuntimeError(f"{self!r} was built without a Login: it trusts every connection")
        return URL.create(
            "postgresql+asyncpg",
            username=self.login.user,
            password=self.login.password,
            host="127.0.0.1",
            port=self.port,
            database="postgres",
        )

    @property
    def paused(self) -> bool:
        return self._paused

    def init(self) -> None:
        """``initdb`` with trust authentication and the server's settings appended.

        With a ``Login``, ``pg_hba.conf`` is replaced by ``PASSWORD_HBA``.
        """
        for path in (self.directory, self.sockets):
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, OS_USER, OS_USER)
        run(
            PG_BIN / "initdb",
            "-D",
            self.data,
            "-U",
            OS_USER,
            "--auth=trust",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
        )
        lines = [f"{name} = {value}" for name, value in self.settings.items()]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgcluster.py\n" + "\n".join(lines) + "\n")
        if self.login is not None:
            (self.data / "pg_hba.conf").write_text(PASSWORD_HBA)

    def start(self) -> None:
        """Start the server, wait until it accepts connections, create the login's role."""
        run(
            PG_BIN / "pg_ctl",
            "-D",
            self.data,
            "-l",
            self.directory / "server.log",
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        self._running = True
        if self.login is not None:
            self.sql(
                f"CREATE ROLE {_identifier(self.login.user)} LOGIN "
                f"PASSWORD {_literal(self.login.password)}"
            )

    def sql(self, statement: str) -> str:
        """Run ``statement`` as ``postgres`` over the private socket (psql); its output."""
        return run(
            PG_BIN / "psql",
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.sockets}",
            f"--port={self.port}",
            f"--username={OS_USER}",
            "--dbname=postgres",
            f"--command={statement}",
        )

    def stop(self) -> None:
        """Stop at once (no checkpoint: the data is thrown away); resume first if paused."""
        if not self._running:
            return
        self.resume()
        run(PG_BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        self._running = False

    def postmaster_pid(self) -> int:
        """The postmaster's pid, from the first line of ``postmaster.pid``."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """The postmaster and every process it forked (backends, checkpointer...)."""
        postmaster = self.postmaster_pid()
        return [postmaster, *_children(postmaster)]

    def pause(self) -> None:
        """Freeze the server: SIGSTOP to its postmaster and all its processes.

        The kernel still completes TCP handshakes and buffers what clients send, but
        nothing answers: a hung server, as a client sees one. The postmaster is stopped
        first so that it forks no new backend meanwhile.
        """
        postmaster = self.postmaster_pid()
        os.kill(postmaster, signal.SIGSTOP)
        self._paused = True
        for pid in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo ``pause()``: SIGCONT to the backends, then the postmaster."""
        if not self._paused:
            return
        postmaster = self.postmaster_pid()
        for pid in _children(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        os.kill(postmaster, signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused_for(self) -> Iterator[None]:
        """``pause()`` for the block, ``resume()`` after it however it ends."""
        self.pause()
        try:
            yield
        finally:
            self.resume()


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A SQL string literal (``standard_conforming_strings`` is on: no backslash escapes)."""
    return "'" + value.replace("'", "''") + "'"


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (every PostgreSQL process is one)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


class Topology:
    """A temporary directory of PostgreSQL servers, all stopped and removed at close."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sessionforge-pg-"))
        shutil.chown(self.root, OS_USER, OS_USER)
        self.servers: dict[str, PostgresServer] = {}

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add(
        self,
        name: str,
        *,
        settings: Mapping[str, str] | None = None,
        login: Login | None = None,
    ) -> PostgresServer:
        """Build and start a new server called ``name`` (a directory under ``root``)."""
        server = PostgresServer(self.root / name, settings=settings, login=login)
        self.servers[name] = server  # registered first: a failed start is still stopped
        server.init()
        server.start()
        return server

    def close(self) -> None:
        """Stop every server (resuming paused ones), then remove the directory."""
        errors: list[BaseException] = []
        for server in reversed(self.servers.values()):
            try:
                server.stop()
            except Exception as error:  # stop the others anyway
                errors.append(error)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def private_postgres(
    settings: Mapping[str, str] | None = None, *, login: Login | None = None
) -> Iterator[PostgresServer]:
    """One private server for the block; skip without binaries (fail under CI=true).

    With ``login``, the server checks passwords (see the module docstring).
    """
    problem = missing_binaries(login=login is not None)
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; CI=true requires the private-server tests to run")
        pytest.skip(problem)
    with Topology() as topology:
        yield topology.add("primary", settings=settings, login=login)
