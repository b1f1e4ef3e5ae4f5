"""What ``sessionforge.alembic`` needs without Alembic: SQLite's foreign-key guard.

**Foreign keys off on SQLite.** Alembic's batch mode changes a SQLite table by copying
it: ``CREATE TABLE _alembic_tmp_x``, ``INSERT ... SELECT``, ``DROP TABLE x``, ``ALTER
TABLE ... RENAME``. With enforcement on (the ``sqlite_foreign_keys`` preset), the ``DROP
TABLE`` deletes every row first, which fires the children's ``ON DELETE CASCADE`` /
``SET NULL``: the children's data is gone. So a migration connection runs with ``PRAGMA
foreign_keys = OFF`` (set outside any transaction: inside one SQLite ignores it) and
``PRAGMA foreign_key_check`` afterwards, which reports what enforcement would have
refused. The connection goes back to the pool with the pragma as it found it.

(An async factory's migration runs on a loop of its own: ``loops.run_on_own_loop``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from sessionforge.errors import MigrationError

__all__ = ["check_foreign_keys", "foreign_keys_off"]

_T = TypeVar("_T")


def _pragma(connection: Connection, statement: str) -> list[tuple[Any, ...]]:
    """Run a PRAGMA on the DBAPI connection: no BEGIN from SQLAlchemy's autobegin."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement)
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


@contextmanager
def foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite's foreign-key enforcement off for the block, as it was afterwards.

    ``connection`` must not be in a transaction yet. Whatever transaction the block
    leaves open (Alembic commits its own) is rolled back before the pragma is restored.
    """
    if connection.in_transaction():
        raise RuntimeError("foreign_keys_off() needs a connection outside a transaction")
    [(was_on,)] = _pragma(connection, "PRAGMA foreign_keys")
    _pragma(connection, "PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        if was_on:
            _pragma(connection, "PRAGMA foreign_keys = ON")


def check_foreign_keys(connection: Connection, *, rolled_back: bool) -> None:
    """``PRAGMA foreign_key_check`` on ``connection``; ``MigrationError`` naming the tables.

    ``rolled_back`` says whether raising undoes the migration (one transaction for the
    whole run) — the message tells the user which.
    """
    violations = [tuple(row) for row in connection.exec_driver_sql("PRAGMA foreign_key_check")]
    if not violations:
        return
    counts: dict[tuple[str, str], int] = {}
    for table, _rowid, parent, _index in violations:
        counts[table, parent] = counts.get((table, parent), 0) + 1
    found = "; ".join(
        f"{count} row{'s' if count > 1 else ''} of table {table!r} referring to missing rows "
        f"of {parent!r}"
        for (table, parent), count in sorted(counts.items())
    )
    outcome = (
        "the migration was rolled back"
        if rolled_back
        else "the migrations ran in several transactions and are committed"
    )
    raise MigrationError(
        f"the migration left rows whose foreign keys point nowhere (PRAGMA "
        f"foreign_key_check): {found}; {outcome}. Repair or delete those rows in the "
        "migration (op.execute), or fix the step that orphaned them",
        violations=violations,
    )
