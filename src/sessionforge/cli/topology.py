"""What ``sessionforge check`` shows of a PostgreSQL topology (DESIGN.md §9).

With replicas (``--replica``, or the config's ``replicas``) or a primary URL that lists
several hosts, ``check`` asks every server where it stands (``server_facts``): its role
(``pg_is_in_recovery()``), its WAL position, its cluster (``pg_control_system()``'s
system identifier) and, for a multi-host URL, which listed host answered. Each replica
is checked on a factory of its own with the primary's options (``check_replicas``),
concurrently, once the primary has answered. ``Topology`` judges the facts and words
them:

- an **error** (exit 4, ``EXIT_TOPOLOGY``: the primary is fine, so not exit 1): a replica
  is unreachable or refused the connection (worded by ``_internal/diagnosis.py``, as the
  primary's failure is), or belongs to another cluster than the primary;
- a **warning** (the exit code stays 0): a "replica" that is not in recovery (a primary:
  promoted by a failover, or a wrong URL), or a primary URL that reached a standby.

A replica's lag is the WAL it has yet to replay, in bytes: the primary's
``pg_current_wal_lsn()`` (read first) minus its ``pg_last_wal_replay_lsn()``; when it
is behind, also how long ago the last commit it replayed was made
(``pg_last_xact_replay_timestamp()``; on an idle primary that age says nothing, so it is
not shown for a replica that is caught up).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from sessionforge import dialects
from sessionforge._internal.diagnosis import explain
from sessionforge.config import FactoryConfig, mask_url
from sessionforge.errors import DatabaseUnavailableError
from sessionforge.factory import SessionFactory

__all__ = [
    "Finding",
    "ReplicaReport",
    "ServerFacts",
    "Topology",
    "check_replicas",
    "server_facts",
    "server_version",
]

# One statement, in a transaction so that a pooler in transaction mode keeps it on one
# server connection. CASE evaluates lazily: a standby refuses pg_current_wal_lsn() and a
# primary pg_is_wal_replay_paused() (55000). Positions are bytes (pg_lsn - pg_lsn is
# numeric), so both drivers return a number.
_FACTS: Final = text(
    """
    SELECT pg_is_in_recovery() AS in_recovery,
           ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                  ELSE pg_current_wal_lsn() END) - '0/0'::pg_lsn)::bigint AS position,
           extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age,
           CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END
               AS replay_paused,
           host(inet_server_addr()) AS address,
           inet_server_port() AS port
    """
)
_SYSTEM_IDENTIFIER: Final = text("SELECT system_identifier::text FROM pg_control_system()")


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """Where one PostgreSQL server stands in its topology, as it says itself."""

    in_recovery: bool
    #: Bytes: the current WAL position of a primary, the replayed one of a standby.
    position: int | None
    #: Seconds since the last commit a standby replayed (``None`` on a primary).
    replay_age: float | None
    replay_paused: bool
    #: The cluster's system identifier, else why it could not be read.
    system_identifier: str | None
    identifier_error: str | None
    #: For a URL that lists several hosts, the listed ``host:port`` that answered.
    answered_by: str | None


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """One replica: its masked URL, and its facts or why there are none (``error``)."""

    url: str
    server_version: str = "unknown"
    ping_seconds: float = 0.0
    facts: ServerFacts | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem found: on the primary (``replica`` is ``None``) or the replica at an index."""

    level: Literal["error", "warning"]
    replica: int | None
    text: str


async def server_facts(engine: AsyncEngine, timeout: float) -> ServerFacts:
    """Ask the PostgreSQL server behind ``engine`` where it stands; driver errors propagate."""
    async with asyncio.timeout(timeout), engine.connect() as connection:
        row = (await connection.execute(_FACTS)).one()
        await connection.rollback()
        try:
            identifier = (await connection.execute(_SYSTEM_IDENTIFIER)).scalar_one()
            identifier_error = None
        except DBAPIError as exc:  # a role that a managed service denies the function
            identifier, identifier_error = None, explain(engine.url, exc, None)
        await connection.rollback()
    return ServerFacts(
        in_recovery=bool(row.in_recovery),
        position=None if row.position is None else int(row.position),
        replay_age=row.replay_age if row.in_recovery else None,
        replay_paused=bool(row.replay_paused),
        system_identifier=identifier,
        identifier_error=identifier_error,
        answered_by=await _answering_host(engine.url, row.address, row.port),
    )


async def _answering_host(url: URL, address: str | None, port: int | None) -> str | None:
    """The host of ``url``'s list that is the server at ``address:port``; ``None`` for one.

    A listed name is resolved to compare it with the address the server reports; when
    none matches (a pooler, NAT in between), the reported address is shown.
    """
    listed = dialects.listed_hosts(url)
    if listed is None:
        return None
    if address is None or port is None:
        return "a unix socket"
    loop = asyncio.get_running_loop()
    for spec in listed.split(","):
        host, _, listed_port = spec.rpartition(":")
        if listed_port != str(port):
            continue
        if host.strip("[]") == address:
            return spec
        try:
            resolved = await loop.getaddrinfo(host.strip("[]"), port)
        except OSError:
            continue
        if any(info[4][0] == address for info in resolved):
            return spec
    return f"{address}:{port} (as the server sees itself; no listed host matches)"


async def check_replicas(config: FactoryConfig, timeout: float) -> tuple[ReplicaReport, ...]:
    """Ping each of ``config.replicas`` and read its facts, concurrently."""
    return tuple(
        await asyncio.gather(*(_check_replica(config, url, timeout) for url in config.replicas))
    )


async def _check_replica(config: FactoryConfig, url: URL, timeout: float) -> ReplicaReport:
    async with SessionFactory(config.replace(url=url, replicas=())) as db:
        try:
            seconds = await db.ping(timeout=timeout)
            facts = await server_facts(db.engine, timeout)
        except DatabaseUnavailableError as exc:
            return ReplicaReport(mask_url(url), error=str(exc))
        except (DBAPIError, OSError, TimeoutError) as exc:
            return ReplicaReport(mask_url(url), error=explain(url, exc, timeout))
        return ReplicaReport(mask_url(url), server_version(db.engine), seconds, facts)


def server_version(engine: AsyncEngine) -> str:
    """The server's version as the dialect read it on first connect (after a ping)."""
    info = engine.dialect.server_version_info
    return ".".join(str(part) for part in info) if info else "unknown"


@dataclass(frozen=True, slots=True)
class Topology:
    """The primary's facts and every replica's report, judged and worded for ``check``."""

    primary: ServerFacts
    replicas: tuple[ReplicaReport, ...]

    def lag_bytes(self, replica: ReplicaReport) -> int | None:
        """Bytes of WAL ``replica`` has yet to replay; ``None`` when not comparable."""
        facts = replica.facts
        if facts is None or not facts.in_recovery or self._same_cluster(facts) is False:
            return None
        if self.primary.position is None or facts.position is None:
            return None
        # The primary was read first: a replica that replayed more since is not behind.
        return max(0, self.primary.position - facts.position)

    def _same_cluster(self, facts: ServerFacts) -> bool | None:
        if self.primary.system_identifier is None or facts.system_identifier is None:
            return None
        return self.primary.system_identifier == facts.system_identifier

    def findings(self) -> list[Finding]:
        """The errors and warnings, the primary's first."""
        found: list[Finding] = []
        if self.primary.in_recovery:
            found.append(Finding("warning", None, _PRIMARY_IS_STANDBY))
        for index, replica in enumerate(self.replicas):
            facts = replica.facts
            if facts is None:
                found.append(Finding("error", index, replica.error or "not checked"))
                continue
            if not facts.in_recovery:
                found.append(Finding("warning", index, _REPLICA_IS_PRIMARY))
            if self._same_cluster(facts) is False:
                found.append(
                    Finding(
                        "error",
                        index,
                        f"another cluster: system identifier {facts.system_identifier}, "
                        f"the primary's is {self.primary.system_identifier}; it cannot be a "
                        "replica of this primary: fix the replica URL",
                    )
                )
        return found

    def lines(self) -> list[str]:
        """The lines after the primary's own, down to ``ok`` when nothing is in error."""
        found = self.findings()
        lines = _facts_lines(self.primary, cluster=bool(self.replicas))
        lines += _finding_lines(found, None)
        for index, replica in enumerate(self.replicas):
            lines.append(f"replica:  {replica.url}")
            if replica.facts is not None:
                lines += [
                    f"  server:   postgresql {replica.server_version}",
                    *("  " + line for line in _facts_lines(replica.facts, cluster=True)),
                    f"  lag:      {self._lag_text(replica)}",
                    f"  ping:     {replica.ping_seconds * 1000:.1f} ms",
                ]
            lines += ["  " + line for line in _finding_lines(found, index)]
        if not any(finding.level == "error" for finding in found):
            warnings = len(found)
            lines.append(f"ok ({_count(warnings, 'warning')})" if warnings else "ok")
        return lines

    def _lag_text(self, replica: ReplicaReport) -> str:
        facts, behind = replica.facts, self.lag_bytes(replica)
        if facts is None or behind is None:
            return "n/a (not a standby of this primary)"
        shown = f"{behind} bytes behind the primary"
        if behind and facts.replay_age is not None:
            shown += f", last replayed commit made {facts.replay_age:.1f} s ago"
        if facts.replay_paused:
            shown += ", replay paused (SELECT pg_wal_replay_resume() on it resumes)"
        return shown

    def failure(self) -> str | None:
        """The reason for ``check``'s one stderr line when a replica is in error."""
        errors = [f for f in self.findings() if f.level == "error" and f.replica is not None]
        if not errors:
            return None
        failed = len({finding.replica for finding in errors})
        reasons = "; ".join(
            _naming(self.replicas[f.replica].url, f.text) for f in errors if f.replica is not None
        )
        total = _count(len(self.replicas), "replica")
        return f"the primary answered, but {failed} of {total} failed the check: {reasons}"


_PRIMARY_IS_STANDBY: Final = (
    "the primary URL reached a standby (in recovery): writes will fail; give the "
    "primary's URL, or add target_session_attrs=read-write to a list of hosts"
)
_REPLICA_IS_PRIMARY: Final = (
    "not in recovery: this server is a primary, not a streaming replica (promoted by a "
    "failover, or a wrong URL); reads sent to it may miss the primary's writes"
)


def _facts_lines(facts: ServerFacts, *, cluster: bool) -> list[str]:
    lines = [f"role:     {'replica (in recovery)' if facts.in_recovery else 'primary'}"]
    if facts.answered_by is not None:
        lines.append(f"host:     {facts.answered_by} answered")
    if cluster:
        identifier = facts.system_identifier or f"unknown ({facts.identifier_error})"
        lines.append(f"cluster:  {identifier} (system identifier)")
    return lines


def _finding_lines(found: list[Finding], replica: int | None) -> list[str]:
    return [f"{f.level + ':':<10}{f.text}" for f in found if f.replica == replica]


def _naming(url: str, reason: str) -> str:
    """``reason``, led by the replica's URL unless it names it (as diagnosis words do)."""
    return reason if url in reason else f"replica {url}: {reason}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
