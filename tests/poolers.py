"""A private PgBouncer for tests: transaction mode, in front of the shared test server.

``pgbouncer()`` writes a config (``pool_mode = transaction``, ``auth_type = trust`` with
an ``auth_file``, one ``[databases]`` entry for the shared server's database) into a
temporary directory, starts PgBouncer on a free loopback port as the ``postgres`` OS user
(``-u``; PgBouncer refuses to run as root), waits until it accepts connections, and
yields a ``PgBouncer`` whose ``url(driver)`` points a client at it. On exit — also when
the test fails — it stops the process and removes the directory. The server pool is
smaller than the tests' client pools, so transactions of different clients really do
share server connections (what breaks named prepared statements).

Without the ``pgbouncer`` binary the test is skipped, except under ``CI=true``, where it
fails (``.ci/run`` installs PgBouncer from Debian).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
from sqlalchemy.engine import URL, make_url

from .conftest import IN_CI, PG_URL, require_postgres
from .pgcluster import OS_USER, START_TIMEOUT, free_port

__all__ = ["PgBouncer", "pgbouncer"]

PGBOUNCER: Final = os.environ.get("SESSIONFORGE_TEST_PGBOUNCER", "pgbouncer")
#: Server connections per database/user pair: fewer than the tests' client connections.
SERVER_POOL_SIZE: Final = 4


class PgBouncer:
    """One running PgBouncer in front of ``target`` (see the module docstring)."""

    def __init__(self, directory: Path, target: URL, port: int) -> None:
        self.directory = directory
        self.target = target
        self.port = port
        self.log = directory / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, driver: str = "asyncpg") -> str:
        """The URL of the target database through this PgBouncer, with ``driver``."""
        return self.target.set(
            drivername=f"postgresql+{driver}", host="127.0.0.1", port=self.port
        ).render_as_string(hide_password=False)

    def write_config(self) -> Path:
        database = self.target.database or "postgres"
        user = self.target.username or OS_USER
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            f"""\
[databases]
{database} = host={self.target.host or "127.0.0.1"} port={self.target.port or 5432} \
dbname={database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.directory / "userlist.txt"}
pool_mode = transaction
default_pool_size = {SERVER_POOL_SIZE}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits
logfile = {self.log}
"""
        )
        return config

    def start(self) -> None:
        config = self.write_config()
        command = [PGBOUNCER, "-q", str(config)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", OS_USER]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self._log_text()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}:\n{self._log_text()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # SIGTERM: PgBouncer's immediate shutdown
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def _log_text(self) -> str:
        stderr = ""
        if self._process is not None and self._process.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                stderr = self._process.stderr.read().decode(errors="replace")
        logged = self.log.read_text(errors="replace") if self.log.exists() else ""
        return logged + stderr


def _missing() -> str | None:
    if shutil.which(PGBOUNCER) is None:
        return f"the {PGBOUNCER!r} binary is not installed (Debian: apt-get install pgbouncer)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"no {OS_USER!r} OS user to run PgBouncer as"
    return None


@contextlib.contextmanager
def pgbouncer(target: str = PG_URL) -> Iterator[PgBouncer]:
    """A private PgBouncer in transaction mode in front of ``target``; stopped after."""
    problem = _missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; CI=true requires the PgBouncer tests to run")
        pytest.skip(problem)
    require_postgres()
    directory = Path(tempfile.mkdtemp(prefix="sessionforge-pgbouncer-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    bouncer = PgBouncer(directory, make_url(target), free_port())
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.stop()
        shutil.rmtree(directory, ignore_errors=True)
