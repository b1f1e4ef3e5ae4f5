"""``sessionforge check [URL] [--replica URL ...]``: connect, ping and describe a database.

Gathering (``resolve_config``, ``gather_check`` into a ``CheckReport``) is apart from
printing (``format_check``), and ``run_check`` ties them to the command line. Also here,
because ``demo`` uses them as well: the SQLite pre-check ``refuse_unopenable_sqlite`` and
``figure``, the way a pool figure is printed.

With replicas, or a PostgreSQL URL that lists several hosts, the report has a
``Topology`` too (``topology.py``): every server's role, cluster and lag. Exit codes: 0
the database answered (warnings about roles leave it 0); 1 the primary is unreachable or
refused the connection; 2 a configuration error; 3 the SQLite file does not exist yet;
4 the primary answered, but a replica is unreachable, refused the connection or belongs
to another cluster (the report is printed first, then one stderr line naming each).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from sessionforge import dialects
from sessionforge._internal.diagnosis import sqlite_cannot_open, unavailable
from sessionforge._internal.engines import EngineStatus, describe_presets, engine_status
from sessionforge.config import FactoryConfig, mask_url
from sessionforge.dialects import mysql
from sessionforge.dialects.sqlite import sqlite_path, sqlite_unopenable
from sessionforge.errors import DatabaseUnavailableError
from sessionforge.factory import SessionFactory

from .exits import EXIT_NOT_CREATED, EXIT_OK, EXIT_TOPOLOGY, fail
from .topology import Topology, check_replicas, server_facts, server_version

__all__ = [
    "CheckReport",
    "figure",
    "format_check",
    "gather_check",
    "refuse_unopenable_sqlite",
    "resolve_config",
    "run_check",
]


@dataclass(frozen=True, slots=True)
class CheckReport:
    """Everything ``sessionforge check`` prints about a reachable database."""

    url: str
    source: str
    dialect: str
    driver: str
    server_version: str
    presets: dict[str, Any]
    pool: EngineStatus
    ping_seconds: float
    #: Only with replicas or a multi-host URL (PostgreSQL).
    topology: Topology | None = None
    #: The server's product where the dialect does not say it ("MariaDB" or "MySQL").
    server: str | None = None


def resolve_config(
    url: str | None, replicas: Sequence[str] | None = None
) -> tuple[FactoryConfig, str]:
    """Return the config for ``url`` (else DATABASE_URL, else the default) and its source.

    ``replicas`` (the ``--replica`` URLs), when given, become the config's ``replicas``.
    """
    options: dict[str, Any] = {} if replicas is None else {"replicas": list(replicas)}
    if url is not None:
        return FactoryConfig.from_url(url, **options), "command line"
    source = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded default"
    return FactoryConfig.from_env(**options), source


async def gather_check(config: FactoryConfig, source: str, timeout: float) -> CheckReport:
    """Build a factory, ping it and describe what it connected to; always dispose it.

    With replicas or a multi-host URL, the topology too; the replicas are checked once
    the primary has answered. Raises ``ConfigurationError``, or
    ``DatabaseUnavailableError`` when the primary cannot be checked.
    """
    with_topology = bool(config.replicas) or dialects.listed_hosts(config.async_url) is not None
    # Every server on a factory of its own: check reads each one, it routes nothing.
    async with SessionFactory(config.replace(replicas=())) as db:
        seconds = await db.ping(timeout=timeout)
        engine = db.engine
        report = CheckReport(
            url=mask_url(db.url),
            source=source,
            dialect=engine.dialect.name,
            driver=engine.dialect.driver,
            server_version=server_version(engine),
            presets=describe_presets(db.config, db.url),
            pool=engine_status("async", engine.sync_engine),
            ping_seconds=seconds,
            server=mysql.server_name(engine.dialect) if mysql.is_mysql(db.url) else None,
        )
        if not with_topology:
            return report
        try:
            primary = await server_facts(engine, timeout)
        except (DBAPIError, OSError, TimeoutError) as exc:
            raise unavailable(engine.url, exc, timeout) from exc
    topology = Topology(primary, await check_replicas(config, timeout))
    return dataclasses.replace(report, topology=topology)


def format_check(report: CheckReport) -> list[str]:
    """The lines ``sessionforge check`` prints for a reachable database."""
    pool = report.pool
    presets = ", ".join(f"{name}={value}" for name, value in report.presets.items())
    return [
        f"url:      {report.url} ({report.source})",
        f"dialect:  {report.dialect}",
        f"driver:   {report.driver}",
        f"server:   {report.server or report.dialect} {report.server_version}",
        f"presets:  {presets or 'none'}",
        f"pool:     {pool.pool} size={figure(pool.size)} "
        f"max_overflow={figure(pool.max_overflow)} timeout={figure(pool.timeout)}s",
        f"ping:     {report.ping_seconds * 1000:.1f} ms",
        *(["ok"] if report.topology is None else report.topology.lines()),
    ]


def figure(value: object) -> str:
    """A pool figure as printed: ``n/a`` for none, a float without trailing zeros."""
    return "n/a" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def refuse_unopenable_sqlite(url: URL) -> None:
    """Raise ``DatabaseUnavailableError`` when the path shows SQLite cannot open the file.

    Checked before connecting because aiosqlite (0.22) leaves the thread of a failed
    connect running, to post its result into an event loop that may be closed by then
    ("Event loop is closed" printed from a thread as the command exits).
    """
    if sqlite_unopenable(url) is not None:
        raise DatabaseUnavailableError(sqlite_cannot_open(url))


def run_check(args: argparse.Namespace) -> int:
    """``sessionforge check [URL] [--replica URL ...]``: what the URL connects to, or why not.

    A SQLite file that does not exist is reported, not created (exit 3); a replica that
    fails the check is reported after the rest is printed (exit 4).
    """
    config, source = resolve_config(args.url, args.replica)
    url = config.async_url
    refuse_unopenable_sqlite(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return fail(
            "check",
            f"the SQLite database {mask_url(url)} ({source}) does not exist yet: "
            f"{path.absolute()} will be created on first use; check created nothing",
            EXIT_NOT_CREATED,
        )
    report = asyncio.run(gather_check(config, source, args.timeout))
    for line in format_check(report):
        print(line)
    failure = None if report.topology is None else report.topology.failure()
    return EXIT_OK if failure is None else fail("check", failure, EXIT_TOPOLOGY)
