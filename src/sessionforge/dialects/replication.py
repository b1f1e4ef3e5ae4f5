"""PostgreSQL streaming replication as read-your-writes needs it: WAL positions, roles.

A *position* is a WAL location as an int (``pg_lsn - '0/0'``: bytes since the start of
the WAL), which both asyncpg and psycopg return as a ``Decimal``; a *system* is the
cluster's ``system_identifier`` (``pg_control_system()``, readable by every role), the
same on a primary and its physical replicas, and kept across a promotion.

- After a transaction that wrote commits on the primary, ``commit_position`` asks the
  same connection for ``pg_current_wal_insert_lsn()``: it is at or past the end of the
  commit record, also under ``synchronous_commit = off`` (where
  ``pg_current_wal_lsn()``, the *write* position, can still be short of it).
- Before a replica serves a read that must see a commit, ``replica_position`` asks it
  for ``pg_last_wal_replay_lsn()`` (the *replay* position: the receive position runs
  ahead under an apply delay), in a statement of its own, before the read's snapshot
  exists — asked in the same statement as the read, the answer races the snapshot.

Both run on the DBAPI connection in autocommit (one round trip: no BEGIN, nothing left
open); ``in_transaction=True`` runs them in a transaction instead, for asyncpg behind
PgBouncer in transaction mode, where a statement prepared outside a transaction may be
run on another server connection (SQLAlchemy #12836).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "ServerPosition",
    "commit_position",
    "format_lsn",
    "parse_lsn",
    "replica_position",
]

_COMMIT: Final = "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"
_COMMIT_AND_SYSTEM: Final = (
    "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn, "
    "(SELECT system_identifier FROM pg_control_system())"
)
# A server that is not in recovery (a promoted replica, or a primary listed as a
# replica) has every commit of its own timeline: its insert position stands in.
_REPLICA: Final = (
    "SELECT CASE WHEN pg_is_in_recovery() "
    "THEN COALESCE(pg_last_wal_replay_lsn(), '0/0'::pg_lsn) "
    "ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn, "
    "pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system())"
)
_LSN: Final = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


@dataclass(frozen=True, slots=True)
class ServerPosition:
    """What a replica answered: its position, whether it replays, its cluster."""

    position: int
    in_recovery: bool
    system: int


def commit_position(
    dbapi_connection: Any, *, with_system: bool, in_transaction: bool
) -> tuple[int, int | None]:
    """The primary's position after a COMMIT on this connection (and its system)."""
    row = _fetch(dbapi_connection, _COMMIT_AND_SYSTEM if with_system else _COMMIT, in_transaction)
    return int(row[0]), (int(row[1]) if with_system else None)


def replica_position(dbapi_connection: Any, *, in_transaction: bool) -> ServerPosition:
    """A replica's replay position, whether it is in recovery, and its system."""
    row = _fetch(dbapi_connection, _REPLICA, in_transaction)
    return ServerPosition(int(row[0]), bool(row[1]), int(row[2]))


def _fetch(dbapi_connection: Any, statement: str, in_transaction: bool) -> Any:
    if in_transaction:
        try:
            return _row(dbapi_connection, statement)
        finally:
            dbapi_connection.rollback()
    was = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        return _row(dbapi_connection, statement)
    finally:
        dbapi_connection.autocommit = was


def _row(dbapi_connection: Any, statement: str) -> Any:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement)
        return cursor.fetchone()
    finally:
        cursor.close()


def format_lsn(position: int) -> str:
    """``position`` as PostgreSQL writes an LSN: ``16/B374D848``."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int | None:
    """The position of an LSN written ``16/B374D848``, or ``None``."""
    match = _LSN.match(text)
    if match is None:
        return None
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)
