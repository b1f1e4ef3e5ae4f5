"""Private PostgreSQL servers built from nothing, for tests that must stop or break one.

The shared server (port 5432) is never touched: each ``PostgresServer`` is a fresh
``initdb`` in a temporary directory, listening on a free loopback port with trust
authentication, run as the ``postgres`` OS user (the tests run as root, and PostgreSQL
refuses to run as root). ``Topology`` owns the temporary directory and every server in
it, and stops them all (``pg_ctl stop -m immediate``) and removes the directory when it
closes — a paused server is resumed first, or it could not be stopped.

A server added with ``replication=True`` is a primary that streaming replicas can be
built from: ``Topology.add_replica`` copies it with ``pg_basebackup -R -X stream`` into a
server of its own (own port, own socket, a physical replication slot named after it, and
its name as ``application_name`` so ``synchronous_standby_names`` can name it).
``replicated_postgres()`` builds a primary and N replicas and yields a ``Replicated``
that makes them lag, catch up, fail over and restart, for the scale-out tests.

A server built with a ``Login`` checks passwords instead: ``pg_hba.conf`` asks every
TCP connection (on 127.0.0.1) for a scram-sha-256 password, and the login's role is
created with its password as the server starts. The ``postgres`` superuser keeps trust
over the server's private unix socket, which is how the module administers it;
``login_url`` is the URL a client uses.

``private_postgres()`` and ``replicated_postgres()`` skip when the PostgreSQL binaries
are missing, except under ``CI=true``, where they fail (conftest's ``IN_CI``).
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
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy.engine import URL

from .conftest import IN_CI

__all__ = [
    "LOGIN",
    "PG_BIN",
    "POSTGRES_DRIVERS",
    "WRONG_PASSWORD",
    "Login",
    "PostgresServer",
    "Replicated",
    "Topology",
    "missing_binaries",
    "multi_host_url",
    "private_postgres",
    "replicated_postgres",
    "spellings",
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

#: Added for a primary that replicas stream from. ``synchronous_commit`` is on again: with
#: it off, COMMIT returns before its WAL is written, so ``pg_current_wal_lsn()`` read right
#: after it can be short of the commit record and the WAL reaches the replicas up to
#: ``wal_writer_delay`` (200 ms) late — neither is what a deployment shows.
REPLICATION_SETTINGS: Final[Mapping[str, str]] = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "synchronous_commit": "on",
}

#: Appended to a replication primary's ``pg_hba.conf`` (``all`` does not match replication
#: connections, so ``PASSWORD_HBA`` alone would refuse ``pg_basebackup`` and the replicas).
REPLICATION_HBA: Final = f"host    replication   {OS_USER}   127.0.0.1/32   trust\n"

#: How often the ``wait_*`` helpers poll; one psql round trip costs about 10 ms.
POLL_INTERVAL: Final = 0.01


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


#: The role of password-checking servers (``password_server`` in conftest.py) and a
#: wrong password; both need percent-encoding in a URL, to test the masking of each form.
LOGIN: Final = Login("app", "p@ss:w/rd%")
WRONG_PASSWORD: Final = "s3cret-wrong:p@ss/w%rd"

#: Both PostgreSQL drivers: asyncpg's refusals carry a SQLSTATE, psycopg's only libpq's
#: text at connect.
POSTGRES_DRIVERS: Final = [
    pytest.param("postgresql+asyncpg", id="asyncpg"),
    pytest.param("postgresql+psycopg", id="psycopg"),
]


def spellings(password: str) -> set[str]:
    """``password`` as it is typed, and as a URL may percent-encode it."""
    return {password, quote(password, safe=""), quote_plus(password)}


def missing_binaries(*, login: bool = False, replication: bool = False) -> str | None:
    """Why private servers cannot be built here, or ``None``.

    A ``Login`` needs psql too; replicas need psql and pg_basebackup.
    """
    extra = [
        *(["psql"] if login or replication else []),
        *(["pg_basebackup"] if replication else []),
    ]
    for program in ("initdb", "pg_ctl", "postgres", *extra):
        if not (PG_BIN / program).is_file():
            return f"PostgreSQL binary {PG_BIN / program} not found"
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no {OS_USER!r} OS user to run PostgreSQL as"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != OS_USER:
        return f"private PostgreSQL servers need root or the {OS_USER!r} user"
    return None


def _require_binaries(*, login: bool = False, replication: bool = False) -> None:
    """Skip the test without the binaries; fail it under CI=true."""
    problem = missing_binaries(login=login, replication=replication)
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; CI=true requires the private-server tests to run")
        pytest.skip(problem)


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
    """One PostgreSQL server in ``directory``, on ``port`` (see the module docstring).

    With ``replication``, a primary that replicas can stream from; with ``standby_of``, a
    streaming replica of that primary, built by ``pg_basebackup`` instead of ``initdb``
    (it inherits the primary's login, whose role it already has).
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        login: Login | None = None,
        replication: bool = False,
        standby_of: PostgresServer | None = None,
    ) -> None:
        self.directory = directory
        self.standby_of = standby_of
        self.login: Login | None = standby_of.login if standby_of is not None else login
        # A standby has its primary's configuration: it can be copied too (cascading, or
        # after a promotion).
        self.replication = replication or standby_of is not None
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.port = port if port is not None else free_port()
        base = standby_of.settings if standby_of is not None else FAST_SETTINGS
        extra = REPLICATION_SETTINGS if replication else {}
        self.settings: dict[str, str] = {
            **base,
            **extra,
            **(settings or {}),
            "port": str(self.port),
        }
        self.settings["unix_socket_directories"] = f"'{self.sockets}'"
        if self.login is not None:
            self.settings["password_encryption"] = "'scram-sha-256'"
        self._paused = False
        self._running = False
        self._role_created = standby_of is not None

    def __repr__(self) -> str:
        return f"<PostgresServer {self.data} on 127.0.0.1:{self.port}>"

    @property
    def name(self) -> str:
        """The server's name in its topology (its directory's name)."""
        return self.directory.name

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

        With a ``Login``, ``pg_hba.conf`` is replaced by ``PASSWORD_HBA``; with
        ``replication``, ``REPLICATION_HBA`` is added. A standby is a base backup instead.
        """
        for path in (self.directory, self.sockets):
            path.mkdir(parents=True, exist_ok=True)
            shutil.chown(path, OS_USER, OS_USER)
        if self.standby_of is not None:
            self._base_backup(self.standby_of)
            return
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
        if self.replication:
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(REPLICATION_HBA)

    def _base_backup(self, primary: PostgresServer) -> None:
        """Copy ``primary`` as a standby: ``standby.signal``, ``primary_conninfo``, a slot.

        The copied ``postgresql.conf`` still names the primary's port and socket; this
        server's settings are appended after them, and the last one read wins.
        """
        conninfo = (
            f"host=127.0.0.1 port={primary.port} user={OS_USER} application_name={self.name}"
        )
        run(
            PG_BIN / "pg_basebackup",
            f"--dbname={conninfo}",
            f"--pgdata={self.data}",
            "--write-recovery-conf",
            "--wal-method=stream",
            "--create-slot",
            f"--slot={self.name}",
            "--checkpoint=fast",
            "--no-sync",
        )
        lines = [f"{name} = {value}" for name, value in self.settings.items()]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# tests/pgcluster.py: standby {self.name}\n" + "\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the server, wait until it accepts connections, create the login's role.

        A standby accepts (read-only) connections once it has reached a consistent state.
        """
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
        if self.login is not None and not self._role_created:
            self.sql(
                f"CREATE ROLE {_identifier(self.login.user)} LOGIN "
                f"PASSWORD {_literal(self.login.password)}"
            )
            self._role_created = True

    def sql(self, statement: str) -> str:
        """Run ``statement`` as ``postgres`` over the private socket (psql); its output."""
        return self._psql(statement)

    def scalar(self, query: str) -> str:
        """The one value ``query`` returns, as psql prints it (``t``, ``0/3000148``)."""
        return self._psql(query, "--tuples-only", "--no-align").strip()

    def _psql(self, statement: str, *options: str) -> str:
        return run(
            PG_BIN / "psql",
            "--no-psqlrc",
            "--quiet",
            *options,
            "--set=ON_ERROR_STOP=1",
            f"--host={self.sockets}",
            f"--port={self.port}",
            f"--username={OS_USER}",
            "--dbname=postgres",
            f"--command={statement}",
        )

    @property
    def running(self) -> bool:
        """Started and not stopped since (by this object)."""
        return self._running

    def stop(self, mode: str = "immediate") -> None:
        """Stop (by default at once: no checkpoint, the data is thrown away).

        A paused server is resumed first. ``mode`` is ``pg_ctl``'s: ``fast`` and ``smart``
        shut down cleanly (a primary sends its standbys all its WAL first).
        """
        if not self._running:
            return
        self.resume()
        run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")
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
        replication: bool = False,
    ) -> PostgresServer:
        """Build and start a new server called ``name`` (a directory under ``root``).

        With ``replication``, a primary that ``add_replica`` can copy.
        """
        server = PostgresServer(
            self.root / name, settings=settings, login=login, replication=replication
        )
        return self._start(server)

    def add_replica(
        self, name: str, primary: PostgresServer, *, settings: Mapping[str, str] | None = None
    ) -> PostgresServer:
        """Build and start ``name``, a streaming replica of ``primary`` (``replication=True``)."""
        if not primary.replication:
            raise ValueError(f"{primary!r} was built without replication=True")
        server = PostgresServer(self.root / name, settings=settings, standby_of=primary)
        return self._start(server)

    def _start(self, server: PostgresServer) -> PostgresServer:
        if server.name in self.servers:
            raise ValueError(f"this topology already has a server called {server.name!r}")
        self.servers[server.name] = server  # registered first: a failed start is still stopped
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
    _require_binaries(login=login is not None)
    with Topology() as topology:
        yield topology.add("primary", settings=settings, login=login)


class Replicated:
    """A primary and its streaming replicas, with the means to make them misbehave.

    Built by ``replicated_postgres()``; every server is a ``PostgresServer`` (``.url``,
    ``.sql()``, ``.scalar()``). Positions are read with psql over each server's private
    socket, so a helper works whatever the test's own connections are doing.
    ``primary`` stays the server built as the primary, also after ``promote()``.
    """

    def __init__(
        self, topology: Topology, primary: PostgresServer, replicas: Iterable[PostgresServer]
    ) -> None:
        self.topology = topology
        self.primary = primary
        self.replicas = tuple(replicas)

    def __repr__(self) -> str:
        names = ", ".join(f"{server.name}:{server.port}" for server in self.replicas)
        return f"<Replicated primary:{self.primary.port} replicas=[{names}]>"

    def wait_streaming(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the primary shows every running replica as ``streaming``."""
        names = [replica.name for replica in self.replicas if replica.running]
        query = (
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' "
            f"AND application_name IN ({', '.join(map(_literal, names))})"
        )
        _wait_for(self.primary, query, str(len(names)), timeout)

    def wait_caught_up(
        self, timeout: float = 10.0, *, replicas: Iterable[PostgresServer] | None = None
    ) -> str:
        """Wait until each replica has replayed the primary's current WAL position; return it.

        The position is read once, when called: what was committed before is then
        visible on every replica (all of them unless ``replicas`` names some).
        ``TimeoutError`` when one has not got there within ``timeout`` (for each).
        """
        lsn = self.primary.scalar("SELECT pg_current_wal_lsn()")
        query = f"SELECT pg_last_wal_replay_lsn() >= {_literal(lsn)}::pg_lsn"
        for replica in self.replicas if replicas is None else replicas:
            _wait_for(replica, query, "t", timeout)
        return lsn

    def pause_replay(self, replica: PostgresServer) -> None:
        """Stop applying WAL on ``replica`` (it still receives it): its data stays as it is.

        The pause takes effect before the next WAL record: what the primary commits after
        this returns is not visible there until ``resume_replay``.
        """
        replica.sql("SELECT pg_wal_replay_pause()")

    def resume_replay(self, replica: PostgresServer) -> None:
        """Undo ``pause_replay``: ``replica`` applies what it received meanwhile."""
        replica.sql("SELECT pg_wal_replay_resume()")

    def set_apply_delay(self, replica: PostgresServer, seconds: float) -> None:
        """Make ``replica`` apply each commit ``seconds`` after the primary made it; 0 resets.

        ``recovery_min_apply_delay`` by ALTER SYSTEM and a reload, no restart; returns once
        the postmaster has reloaded (it signals the startup process right after).
        """
        milliseconds = round(seconds * 1000)
        self._alter_system(
            replica, "recovery_min_apply_delay", f"{milliseconds}ms" if milliseconds else None
        )
        query = "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
        _wait_for(replica, query, str(milliseconds), START_TIMEOUT)

    def set_synchronous(self, *replicas: PostgresServer) -> None:
        """Make every COMMIT on the primary wait until all of ``replicas`` have flushed it.

        ``synchronous_standby_names = 'FIRST n (...)'`` naming exactly those replicas; none
        makes replication asynchronous again. A listed replica that is down blocks every
        commit on the primary until it is back (or dropped from the list).
        """
        names = [_identifier(replica.name) for replica in replicas]
        value = f"FIRST {len(names)} ({', '.join(names)})" if names else None
        self._alter_system(self.primary, "synchronous_standby_names", value)
        wanted = sorted(replica.name for replica in replicas)
        query = (
            "SELECT coalesce(string_agg(application_name, ',' ORDER BY application_name), '') "
            "FROM pg_stat_replication WHERE sync_state = 'sync'"
        )
        _wait_for(self.primary, query, ",".join(wanted), START_TIMEOUT)

    def promote(self, replica: PostgresServer, timeout: float = START_TIMEOUT) -> None:
        """Make ``replica`` a primary (``pg_ctl promote``); return once it accepts writes.

        Nothing follows it: the other replicas still stream from ``primary`` (or wait for
        it, if it is stopped).
        """
        run(PG_BIN / "pg_ctl", "-D", replica.data, "-w", "-t", str(int(timeout)), "promote")
        _wait_for(replica, "SELECT pg_is_in_recovery()", "f", timeout)

    def stop(self, server: PostgresServer, *, mode: str = "immediate") -> None:
        """Stop ``server`` (``pg_ctl stop -m mode``; ``immediate`` is a crash)."""
        server.stop(mode)

    def start(self, server: PostgresServer) -> None:
        """Start ``server`` again; a replica reconnects to its primary and catches up."""
        server.start()

    @staticmethod
    def _alter_system(server: PostgresServer, name: str, value: str | None) -> None:
        # Two psql calls: ALTER SYSTEM refuses to run in the implicit transaction that one
        # multi-statement --command gets.
        if value is None:
            server.sql(f"ALTER SYSTEM RESET {name}")
        else:
            server.sql(f"ALTER SYSTEM SET {name} = {_literal(value)}")
        server.sql("SELECT pg_reload_conf()")


def _wait_for(server: PostgresServer, query: str, expected: str, timeout: float) -> None:
    """Run ``query`` on ``server`` every ``POLL_INTERVAL`` until it returns ``expected``."""
    deadline = time.monotonic() + timeout
    while (value := server.scalar(query)) != expected:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{server.name}: {query} returned {value!r}, not {expected!r}, after {timeout} s"
            )
        time.sleep(POLL_INTERVAL)


def multi_host_url(
    *servers: PostgresServer,
    driver: str = "postgresql+asyncpg",
    target_session_attrs: str = "read-write",
    comma_form: bool = True,
) -> str:
    """A URL listing ``servers`` (the ``postgres`` database and user), for failover.

    libpq's comma form (``h1:p1,h2:p2``, which sessionforge accepts) or, with
    ``comma_form=False``, SQLAlchemy's ``?host=h1:p1&host=h2:p2`` (what plain
    SQLAlchemy understands).
    """
    hosts = [f"127.0.0.1:{server.port}" for server in servers]
    attrs = f"target_session_attrs={target_session_attrs}"
    if comma_form:
        return f"{driver}://{OS_USER}@{','.join(hosts)}/postgres?{attrs}"
    listed = "&".join(f"host={host}" for host in hosts)
    return f"{driver}://{OS_USER}@/postgres?{listed}&{attrs}"


@contextlib.contextmanager
def replicated_postgres(
    replicas: int = 2,
    *,
    synchronous: bool = False,
    settings: Mapping[str, str] | None = None,
    login: Login | None = None,
) -> Iterator[Replicated]:
    """A primary and ``replicas`` streaming replicas for the block, all removed after.

    The replicas are called ``replica1``, ``replica2``...; each is streaming when the
    block starts. ``synchronous=True`` makes every commit wait for every replica
    (``Replicated.set_synchronous``), so a promoted one has every acknowledged write.
    ``settings`` and ``login`` are the primary's; the replicas copy them. Skips without
    the binaries (fails under CI=true), like ``private_postgres()``.
    """
    if replicas < 1:
        raise ValueError(f"replicas={replicas}: a replicated topology needs at least one")
    _require_binaries(login=login is not None, replication=True)
    with Topology() as topology:
        primary = topology.add("primary", settings=settings, login=login, replication=True)
        cluster = Replicated(
            topology,
            primary,
            [topology.add_replica(f"replica{n}", primary) for n in range(1, replicas + 1)],
        )
        cluster.wait_streaming()
        if synchronous:
            cluster.set_synchronous(*cluster.replicas)
        yield cluster
