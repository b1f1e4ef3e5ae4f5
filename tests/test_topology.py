"""The replica topology of tests/pgcluster.py: the ground the scale-out tests stand on.

One primary with two streaming replicas serves the module; promotion, which ends a
topology's usefulness, gets a small synchronous one of its own. These tests check the
test infrastructure, not sessionforge: that a replica really lags, pauses, catches up
and takes over when the helpers say so, and that nothing is left running after.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .pgcluster import PostgresServer, Replicated, Topology, replicated_postgres

pytestmark = pytest.mark.postgres

APPLY_DELAY = 1.0
TABLE = "CREATE TABLE items (label text PRIMARY KEY)"


def _write(server: PostgresServer) -> str:
    """Commit a new row on ``server``; its label."""
    label = uuid.uuid4().hex
    server.sql(f"INSERT INTO items VALUES ('{label}')")
    return label


def _has(server: PostgresServer, label: str) -> bool:
    return server.scalar(f"SELECT count(*) FROM items WHERE label = '{label}'") == "1"


def _running_pids(cluster: Replicated) -> list[int]:
    servers = cluster.topology.servers.values()
    return [pid for server in servers if server.running for pid in server.pids()]


def _leftovers(topology: Topology, pids: list[int]) -> list[str]:
    """What of a closed ``topology`` is still there: processes, its directory."""
    listing = subprocess.run(
        ["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for line in listing.splitlines():
        pid, stat, _ = line.split(maxsplit=2)
        if stat.startswith("Z"):  # dead, only not reaped yet
            continue
        if int(pid) in pids or str(topology.root) in line:
            found.append(line)
    if topology.root.exists():
        found.append(f"directory {topology.root}")
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Replicated]:
    """A primary and two asynchronous replicas for the module, checked gone after."""
    with replicated_postgres(replicas=2) as built:
        built.primary.sql(TABLE)
        yield built
        topology, pids = built.topology, _running_pids(built)
    assert _leftovers(topology, pids) == []


@pytest.mark.parametrize(
    ("name", "in_recovery"),
    [
        pytest.param("primary", False, id="primary"),
        pytest.param("replica1", True, id="replica1"),
        pytest.param("replica2", True, id="replica2"),
    ],
)
async def test_url_reaches_a_server_in_its_role(
    cluster: Replicated, name: str, in_recovery: bool
) -> None:
    engine = create_async_engine(cluster.topology.servers[name].url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SELECT pg_is_in_recovery()")) is in_recovery
    finally:
        await engine.dispose()


def test_a_write_on_the_primary_reaches_every_replica(cluster: Replicated) -> None:
    label = _write(cluster.primary)
    cluster.wait_caught_up()
    assert [_has(replica, label) for replica in cluster.replicas] == [True, True]


def test_a_paused_replica_misses_what_the_other_has(cluster: Replicated) -> None:
    paused, other = cluster.replicas
    cluster.pause_replay(paused)
    try:
        label = _write(cluster.primary)
        cluster.wait_caught_up(replicas=[other])
        with pytest.raises(TimeoutError, match="replica1"):
            cluster.wait_caught_up(0.3, replicas=[paused])
        assert paused.scalar("SELECT pg_get_wal_replay_pause_state()") == "paused"
        assert (_has(paused, label), _has(other, label)) == (False, True)
    finally:
        cluster.resume_replay(paused)
    cluster.wait_caught_up()
    assert _has(paused, label)


def test_an_apply_delay_makes_a_replica_lag_until_reset(cluster: Replicated) -> None:
    prompt, delayed = cluster.replicas
    cluster.set_apply_delay(delayed, APPLY_DELAY)
    try:
        label = _write(cluster.primary)
        written = time.monotonic()
        cluster.wait_caught_up(replicas=[prompt])
        assert not _has(delayed, label)
        cluster.wait_caught_up(APPLY_DELAY + 5, replicas=[delayed])
        lag = time.monotonic() - written
        assert _has(delayed, label)
        assert APPLY_DELAY * 0.8 < lag < APPLY_DELAY + 2
    finally:
        cluster.set_apply_delay(delayed, 0)
    label = _write(cluster.primary)
    written = time.monotonic()
    cluster.wait_caught_up(replicas=[delayed])
    assert time.monotonic() - written < APPLY_DELAY / 2
    assert _has(delayed, label)


def test_a_stopped_replica_catches_up_when_started(cluster: Replicated) -> None:
    replica = cluster.replicas[1]
    cluster.stop(replica)
    try:
        label = _write(cluster.primary)  # asynchronous: the primary does not wait for it
    finally:
        cluster.start(replica)
    cluster.wait_caught_up()
    assert _has(replica, label)
    cluster.wait_streaming()


def test_a_promoted_synchronous_replica_has_every_acknowledged_write() -> None:
    with replicated_postgres(replicas=1, synchronous=True) as small:
        (standby,) = small.replicas
        small.primary.sql(TABLE)
        # 200 transactions, each acknowledged once the standby has flushed it.
        small.primary.sql(
            "DO $$ BEGIN FOR n IN 1..200 LOOP"
            " INSERT INTO items VALUES ('row ' || n); COMMIT; END LOOP; END $$"
        )
        small.stop(small.primary)  # a crash: no shutdown checkpoint, nothing sent after
        small.promote(standby)
        assert standby.scalar("SELECT pg_is_in_recovery()") == "f"
        assert standby.scalar("SELECT count(*) FROM items") == "200"
        assert _has(standby, _write(standby))
        topology, pids = small.topology, _running_pids(small)
    assert _leftovers(topology, pids) == []
