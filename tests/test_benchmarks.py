"""The benchmark suite runs end to end (a smoke run on SQLite; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
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
    # The SQLite targets of these two scenarios: sessionforge on sqlite:/// vs aiosqlite.
    targets = {t["scenario"]: t for t in document["targets"]}
    assert set(targets) == {"factory", "write"}
    assert all(t["minimum"] == 1.5 and t["ratio"] > 0 for t in targets.values())
    assert document["scenarios"]["factory"]["params"]["factory_url"].startswith("sqlite:///")
    assert document["scenarios"]["factory"]["params"]["url"].startswith("sqlite+aiosqlite:///")
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


def run_module(module: str, *args: str, timeout: float = 60) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_calls_and_thread_hops_are_counted_for_every_contender(tmp_path: Path) -> None:
    result = tmp_path / "calls.json"
    stdout = run_module(
        "benchmarks.bench_calls",
        *("--url", "sqlite", "--ops", "5", "--warmup", "2", "--json", str(result)),
    )
    document = json.loads(result.read_text())
    counts = {count["contender"]: count for count in document["counts"]}
    assert set(counts) == {
        "sessionforge begin()",
        "bare async_sessionmaker.begin()",
        "sessionforge reader()",
        "async_sessionmaker, AUTOCOMMIT engine",
        "sessionforge begin() + insert",
        "bare begin() + insert",
    }
    for name, count in counts.items():
        assert count["calls_per_op"] > 100  # an ORM transaction is hundreds of calls
        assert count["hops_per_op"] == sum(count["hops_by_kind"].values())
        if not name.startswith("sessionforge"):
            # On aiosqlite every operation reaches the driver's thread (its SELECT or
            # INSERT at least), a whole number of times: a warm one-task loop repeats.
            assert count["hops_per_op"] >= 1
    # sessionforge's default driver runs a warm loop's quick statements inline: fewer
    # hops than aiosqlite's (none, unless the machine is slow enough to time them out).
    for ours, bare in [
        ("sessionforge begin()", "bare async_sessionmaker.begin()"),
        ("sessionforge begin() + insert", "bare begin() + insert"),
    ]:
        assert counts[ours]["hops_per_op"] < counts[bare]["hops_per_op"]
    assert counts["bare async_sessionmaker.begin()"]["hops_by_kind"].keys() == {"aiosqlite"}
    assert document["factory_url"].startswith("sqlite:///")
    assert document["url"].startswith("sqlite+aiosqlite:///")
    assert document["ratios"]["bare begin() + insert"] == {"calls": 1.0, "hops": 1.0}
    assert "bare async_sessionmaker.begin() *" in stdout
    assert "hops/op" in stdout


def test_scaling_quick_run_writes_every_point_and_the_chart(tmp_path: Path) -> None:
    result, chart = tmp_path / "scaling.json", tmp_path / "scaling.png"
    stdout = run_module(
        "benchmarks.bench_scaling",
        *("--url", "sqlite", "--quick", "--tasks", "1,4", "--pools", "2,3"),
        *("--json", str(result), "--chart", str(chart)),
    )
    document = json.loads(result.read_text())

    assert document["tasks"] == [1, 4]
    assert document["pools"] == [2, 3]
    points = {(p["tasks"], p["pool_size"]): p for p in document["points"]}
    assert set(points) == {(1, 2), (4, 2), (1, 3), (4, 3)}
    for point in points.values():
        assert point["ops_per_s"].keys() == {"sessionforge", "bare async_sessionmaker"}
        assert all(ops > 0 for ops in point["ops_per_s"].values())
        assert point["ratio_min"] <= point["ratio"] <= point["ratio_max"]
        assert len(point["rounds"]) == 1
    assert document["worst"]["ratio"] == min(p["ratio"] for p in points.values())
    # On SQLite sessionforge must beat the baseline at every point (issue 16).
    assert document["target"]["minimum"] == 1.0
    assert document["target"]["strict"] is True
    assert document["params"]["factory_url"].startswith("sqlite:///")
    assert "worst point:" in stdout
    if HAS_MATPLOTLIB:
        assert chart.stat().st_size > 0
    else:
        assert "pip install 'sessionforge[bench]'" in stdout


def test_memory_quick_run_reports_bytes_per_session(tmp_path: Path) -> None:
    result = tmp_path / "memory.json"
    stdout = run_module(
        "benchmarks.bench_memory", "--url", "sqlite", "--quick", "--json", str(result)
    )
    document = json.loads(result.read_text())

    assert set(document["states"]) == {"new", "in transaction"}
    for state in document["states"].values():
        contenders = state["contenders"]
        assert contenders.keys() == {"sessionforge", "bare async_sessionmaker"}
        # A session is at least a few hundred bytes of Python objects; one in a
        # transaction with a loaded row holds more than a new one.
        assert all(c["bytes_per_session"] > 300 for c in contenders.values())
        assert contenders["bare async_sessionmaker"]["ratio_to_baseline"] == 1.0
    new, held = document["states"]["new"], document["states"]["in transaction"]
    assert (
        held["contenders"]["sessionforge"]["bytes_per_session"]
        > (new["contenders"]["sessionforge"]["bytes_per_session"])
    )
    assert document["target"]["maximum"] == 1.1
    assert "bytes/session" in stdout


def test_suite_runs_counts_memory_and_scaling_into_results(tmp_path: Path) -> None:
    stdout = run_suite(
        tmp_path,
        *("--scenarios", "calls,memory,scaling"),
        *("--scaling-tasks", "1,3", "--scaling-pools", "2"),
    )
    document = latest(tmp_path)

    assert document["failures"] == {}
    assert document["scenarios"] == {}
    assert {c["contender"] for c in document["calls"]["counts"]} >= {"sessionforge begin()"}
    assert [(p["tasks"], p["pool_size"]) for p in document["scaling"]["points"]] == [
        (1, 2),
        (3, 2),
    ]
    targets = {t["scenario"]: t for t in document["targets"]}
    assert set(targets) == {"scaling", "memory"}
    # The scaling target shows the deterministic counts of the same operation beside it.
    beside = targets["scaling"]["counts"]
    counted = {c["contender"]: c for c in document["calls"]["counts"]}
    assert beside["calls_ratio"] > 0
    assert (beside["hops_per_op"], beside["versus_hops_per_op"]) == (
        counted["sessionforge begin()"]["hops_per_op"],
        counted["bare async_sessionmaker.begin()"]["hops_per_op"],
    )
    results = (tmp_path / "out" / "results.md").read_text()
    for heading in (
        "### Deterministic counts",
        "### scaling: begin + one read, by tasks and pool size",
        "### memory: bytes per open session (tracemalloc)",
        "| SQLite: scaling, sessionforge > 1x bare at every point",
    ):
        assert heading in results
    if HAS_MATPLOTLIB:
        assert (tmp_path / "out" / "scaling.png").stat().st_size > 0
    assert "## scaling: cost by tasks and pool size" in stdout


def test_loop_latency_reports_every_contender(tmp_path: Path) -> None:
    result = tmp_path / "latency.json"
    stdout = run_module("benchmarks.bench_loop_latency", "--quick", "--json", str(result))
    document = json.loads(result.read_text())
    summary = document["summary"]
    assert set(summary) == {
        "bare SQLAlchemy + aiosqlite",
        "sessionforge, sqlite+aiosqlite",
        "sessionforge driver, thread only",
        "sessionforge driver (default)",
    }
    for name, runs in document["samples"].items():
        assert len(runs) == 1, name  # --quick: one round
        assert runs[0]["ops_per_s"] > 0, name  # every contender did the work...
        assert math.isfinite(runs[0]["late_max_ms"]), name  # ...beside a ticker that woke
    assert "p99 ms" in stdout
