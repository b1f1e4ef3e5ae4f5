"""One round trip on a checked-out connection: what ``ping()`` sends, on both twins.

PostgreSQL and SQLite run ``SELECT 1`` in AUTOCOMMIT, so no BEGIN/ROLLBACK surrounds
it. The MySQL drivers have no cheap AUTOCOMMIT switch (aiomysql and asyncmy send
``SET AUTOCOMMIT``, then restore the connection's isolation level and mode: six
commands in all), so there the driver's own ping (COM_PING) is the round trip
(``dialects.mysql.ping``). Both twins call ``round_trip``: the sync one directly, the
async one through ``AsyncConnection.run_sync``.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from sessionforge.dialects import mysql

__all__ = ["round_trip"]


def round_trip(connection: Connection) -> None:
    """Make one round trip to the server on ``connection``, outside any transaction."""
    if mysql.is_mysql(connection.engine.url):
        mysql.ping(connection)
        return
    connection.execution_options(isolation_level="AUTOCOMMIT")
    connection.exec_driver_sql("SELECT 1")
