"""examples/worker.py: SIGTERM mid-run leaves no half-written job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).parent.parent / "examples" / "worker.py"


@pytest.fixture
def worker_url(db_url: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worker.db'}" if db_url == "sqlite://" else db_url


@pytest.mark.parametrize("grace", [pytest.param(5.0, id="drain"), pytest.param(0.0, id="cancel")])
def test_sigterm_finishes_or_rolls_back_jobs_in_flight(
    worker_url: str, grace: float, tmp_path: Path
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-W", "error", str(WORKER), "--jobs", "5000", "--grace", str(grace)],
        env={**os.environ, "DATABASE_URL": worker_url},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # jobs are in flight
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, out + err
    assert err == ""
    assert "stopping: draining jobs in flight" in out
    assert "CONSISTENT" in out.splitlines()[-1]
    done = int(re.search(r"jobs done (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < done < 5000  # stopped part-way, by the signal


def test_worker_runs_to_the_end_without_a_signal(worker_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(WORKER), "--jobs", "100"],
        env={**os.environ, "DATABASE_URL": worker_url},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jobs done 100 ledger lines 100" in result.stdout
