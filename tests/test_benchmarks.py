"""The benchmark suite runs end to end (a smoke run on SQLite; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_ADVANCED_ALCHEMY = importlib.util.find_spec("advanced_alchemy") is not None


def run_suite(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.suite",
            "--quick",
            "--rounds",
            "1",
            "--seconds",
            "0.2",
            "--url",
            f"sqlite:///{tmp_path / 'bench.db'}",
            "--out",
            str(out),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def latest(tmp_path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((tmp_path / "out" / "latest-sqlite.json").read_text())
    return document


def test_suite_quick_run_writes_json_chart_and_table(tmp_path: Path) -> None:
    stdout = run_suite(tmp_path, "--scenarios", "factory,write")
    document = latest(tmp_path)

    assert document["backend"] == "sqlite"
    assert document["failures"] == {}
    assert set(document["scenarios"]) == {"factory", "write"}
    expected = {
        "factory": {
            "sessionforge",
            "bare async_sessionmaker",
            "async_sessionmaker + pre_ping",
            "raw aiosqlite",
        },
        "write": {"sessionforge", "bare async_sessionmaker", "raw aiosqlite"}
        | ({"advanced-alchemy repository"} if HAS_ADVANCED_ALCHEMY else set()),
    }
    for name, contenders in expected.items():
        summary = document["scenarios"][name]["summary"]
        assert set(summary) == contenders
        for figures in summary.values():
            assert figures["median_ops_per_s"] > 0
            assert figures["ratio_to_baseline"] > 0
    [target] = document["targets"]  # only the factory target applies to these two
    assert target["scenario"] == "factory"
    assert target["ratio"] > 0
    assert document["machine"]["server"].startswith("SQLite ")

    out = tmp_path / "out"
    assert (out / "latest.json").exists()
    assert list(out.glob("suite-sqlite-*.json"))
    results = (out / "results.md").read_text()
    assert "### factory: begin + one read" in results
    assert "| sessionforge |" in results
    if HAS_MATPLOTLIB:
        assert (out / "suite-sqlite.png").stat().st_size > 0
    else:
        assert "pip install 'sessionforge[bench]'" in stdout


def test_suite_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    path = os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])

    stdout = run_suite(tmp_path, "--scenarios", "factory", env={"PYTHONPATH": path})

    assert "chart: not drawn, it needs matplotlib: pip install 'sessionforge[bench]'" in stdout
    assert not (tmp_path / "out" / "suite-sqlite.png").exists()
    assert set(latest(tmp_path)["scenarios"]) == {"factory"}
    assert (tmp_path / "out" / "results.md").exists()


def test_calls_per_operation_are_counted_for_every_contender(tmp_path: Path) -> None:
    result = tmp_path / "calls.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.bench_calls", "--url", "sqlite"),
            *("--ops", "5", "--warmup", "2", "--json", str(result)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(result.read_text())
    counts = {count["contender"]: count["calls_per_op"] for count in document["counts"]}
    assert set(counts) == {
        "sessionforge begin()",
        "bare async_sessionmaker.begin()",
        "sessionforge reader()",
        "async_sessionmaker, AUTOCOMMIT engine",
    }
    assert all(calls > 100 for calls in counts.values())  # an ORM read is hundreds of calls
    assert "bare async_sessionmaker.begin() *" in done.stdout
