"""The benchmark suite: every scenario against one database, in one process, one report.

``python -m benchmarks.suite`` runs the scenarios listed in ``SCENARIOS`` one after
another (each with the harness's interleaved, rotated rounds), prints each table, and
writes:

* ``benchmarks/results/suite-<backend>-<UTC timestamp>.json``, plus copies named
  ``latest.json`` and ``latest-<backend>.json`` (git-ignored): the raw numbers of
  every scenario, the targets and the machine;
* ``docs/benchmarks/suite-<backend>.png`` (committed): ratio to each scenario's
  baseline per contender, with the targets marked;
* ``docs/benchmarks/results.md`` (committed): the tables of every backend that has a
  ``latest-<backend>.json``, with the date and the machine.

``--out DIR`` sends all of it to ``DIR`` instead. ``<backend>`` is ``sqlite`` or
``postgres`` or ``mariadb``. ``--url sqlite`` (the default) is a SQLite file in a
temporary directory; any other SQLAlchemy URL works too (the driver defaults to
aiosqlite / asyncpg / aiomysql). On MariaDB/MySQL only the scenarios whose
``backends`` name ``mysql`` run (the others say "not for mysql").
The chart needs matplotlib (``pip install 'sessionforge[bench]'``); without it the
suite says so and still writes the JSON and the tables.

After the scenarios come the measurements of ``EXTRAS`` (SQLite and PostgreSQL): the
deterministic counts (``bench_calls``: Python calls and SQLite thread hops per
operation), the memory per open session (``bench_memory``), the scaling grid
(``bench_scaling``, charted in ``docs/benchmarks/scaling.png``) and, on PostgreSQL,
``replicas`` on a cluster it builds. ``TARGETS`` are issue 16's, per backend.

Run: ``python -m benchmarks.suite`` (about 4.5 minutes on SQLite, 4 on PostgreSQL on
a 2-core machine), ``python -m benchmarks.suite --quick`` (about half a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from . import (
    bench_asgi,
    bench_calls,
    bench_cancel,
    bench_factory,
    bench_liveness,
    bench_memory,
    bench_read,
    bench_replicas,
    bench_scaling,
    bench_sqlite,
    bench_write,
    harness,
)
from .harness import Contender, ContenderSource, Params, Report

ROOT = harness.BENCH_DIR.parent
DOCS_DIR = ROOT / "docs" / "benchmarks"
BENCH_EXTRA_HINT = harness.BENCH_EXTRA_HINT


@asynccontextmanager
async def sqlite_commits(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """bench_sqlite's write workload (``BEGIN IMMEDIATE``, one INSERT, COMMIT), on a
    file of its own in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="sf-bench-sqlite-") as directory:
        source = bench_sqlite.source(Path(directory) / "bench.db", "write")
        async with source(params) as contenders:
            yield contenders


@dataclass(frozen=True)
class Scenario:
    """One scenario of the suite: where its contenders come from, and its baseline."""

    name: str
    title: str
    source: ContenderSource
    baseline: str
    backends: frozenset[str] = frozenset({"postgresql", "sqlite"})


# The suite runs these, in this order. Adding a scenario is one line here.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "factory",
        "begin + one read",
        bench_factory.contenders,
        bench_factory.BASELINE,
        frozenset({"postgresql", "sqlite", "mysql"}),
    ),
    Scenario("write", "begin + one insert", bench_write.contenders, bench_write.BASELINE),
    Scenario("read", "read-only request", bench_read.contenders, bench_read.BASELINE),
    Scenario("asgi", "FastAPI endpoint", bench_asgi.contenders, bench_asgi.BASELINE),
    Scenario(
        "sqlite",
        "SQLite commits",
        sqlite_commits,
        bench_sqlite.BASELINE,
        frozenset({"sqlite"}),
    ),
    Scenario("cancel", "half cancelled", bench_cancel.contenders, bench_cancel.BASELINE),
    Scenario("liveness", "busy pool", bench_liveness.contenders, bench_liveness.BASELINE),
)


@dataclass(frozen=True)
class Target:
    """``contender`` must reach ``minimum`` x the throughput of ``versus`` (same round).

    ``backends``: where the target applies. ``minimum=None``: the ratio is reported,
    with no target. ``counts``: the two ``bench_calls`` contenders doing the same
    operation, whose calls/op and hops/op ratio is shown beside the timed one.
    """

    scenario: str
    contender: str
    versus: str
    minimum: float | None
    label: str
    backends: frozenset[str] = frozenset({"postgresql", "sqlite", "mysql"})
    counts: tuple[str, str] | None = None


SQLITE = frozenset({"sqlite"})
POSTGRESQL = frozenset({"postgresql"})
MYSQL = frozenset({"mysql"})
READ_COUNTS = (bench_calls.SESSIONFORGE_BEGIN, bench_calls.BASELINE)
READER_COUNTS = (bench_calls.SESSIONFORGE_READER, bench_calls.BASELINE)
WRITE_COUNTS = (bench_calls.SESSIONFORGE_WRITE, bench_calls.WRITE_BASELINE)

# The targets of issue 16 (performance round two). On SQLite sessionforge runs on the
# URL as a user writes it (sqlite:///file.db), the baselines on sqlite+aiosqlite.
TARGETS: tuple[Target, ...] = (
    Target(
        "factory",
        "sessionforge",
        bench_factory.BASELINE,
        1.5,
        "SQLite: begin + one read >= 1.5x bare SQLAlchemy + aiosqlite",
        SQLITE,
        READ_COUNTS,
    ),
    Target(
        "write",
        "sessionforge",
        bench_write.BASELINE,
        1.5,
        "SQLite: begin + one insert >= 1.5x bare SQLAlchemy + aiosqlite",
        SQLITE,
        WRITE_COUNTS,
    ),
    Target(
        "read",
        bench_read.READER,
        bench_read.BASELINE,
        1.5,
        "SQLite: reader() >= 1.5x bare begin() on aiosqlite",
        SQLITE,
        READER_COUNTS,
    ),
    Target(
        "asgi",
        "sessionforge dependency",
        bench_asgi.BASELINE,
        1.5,
        "SQLite: FastAPI dependency >= 1.5x hand-written on aiosqlite",
        SQLITE,
    ),
    Target(
        "cancel",
        bench_cancel.SESSIONFORGE,
        bench_cancel.BASELINE,
        1.5,
        "SQLite: half-cancelled load >= 1.5x bare SQLAlchemy + aiosqlite",
        SQLITE,
    ),
    Target(
        "liveness",
        bench_liveness.SESSIONFORGE,
        bench_liveness.BASELINE,
        1.5,
        "SQLite: busy pool >= 1.5x bare SQLAlchemy + aiosqlite",
        SQLITE,
    ),
    Target(
        "sqlite",
        bench_sqlite.DEFAULT_URL_CONTENDER,
        bench_sqlite.BASELINE,
        2.5,
        "SQLite commits: sqlite:/// >= 2.5x SQLAlchemy + aiosqlite",
        SQLITE,
    ),
    Target(
        "factory",
        "sessionforge",
        bench_factory.BASELINE,
        1.0,
        "PostgreSQL: begin + one read >= 1.0x bare async_sessionmaker",
        POSTGRESQL,
        READ_COUNTS,
    ),
    Target(
        "write",
        "sessionforge",
        bench_write.BASELINE,
        1.0,
        "PostgreSQL: begin + one insert >= 1.0x bare async_sessionmaker",
        POSTGRESQL,
        WRITE_COUNTS,
    ),
    Target(
        "factory",
        "sessionforge",
        "raw asyncpg",
        None,
        "PostgreSQL: begin + one read, sessionforge / raw asyncpg",
        POSTGRESQL,
    ),
    Target(
        "read",
        bench_read.READER,
        bench_read.BASELINE,
        1.5,
        "PostgreSQL: reader() >= 1.5x bare begin()",
        POSTGRESQL,
        READER_COUNTS,
    ),
    Target(
        "asgi",
        "sessionforge dependency",
        bench_asgi.BASELINE,
        1.1,
        "PostgreSQL: FastAPI dependency >= 1.1x hand-written",
        POSTGRESQL,
    ),
    Target(
        "asgi",
        "sessionforge dependency",
        "advanced-alchemy",
        1.3,
        "PostgreSQL: FastAPI dependency >= 1.3x advanced-alchemy",
        POSTGRESQL,
    ),
    Target(
        "asgi",
        "sessionforge dependency",
        "raw asyncpg",
        None,
        "PostgreSQL: FastAPI dependency, sessionforge / raw asyncpg",
        POSTGRESQL,
    ),
    Target(
        "liveness",
        bench_liveness.SESSIONFORGE,
        bench_liveness.PRE_PING,
        1.15,
        "PostgreSQL: ping_after >= 1.15x pool_pre_ping on a busy pool (round one)",
        POSTGRESQL,
    ),
    *(
        Target(f"replicas-{part}", contender, versus, minimum, label, POSTGRESQL)
        for part, contender, versus, minimum, label in bench_replicas.TARGETS
    ),
    Target(
        "factory",
        "sessionforge",
        bench_factory.BASELINE,
        0.97,
        "MariaDB: begin + one read >= 0.97x bare async_sessionmaker, same driver",
        MYSQL,
        READ_COUNTS,
    ),
)

FULL = {"rounds": 4, "seconds": 0.9, "warmup": 0.25}
QUICK = {"rounds": 1, "seconds": 0.3, "warmup": 0.1}

#: Measurements that are not harness scenarios, run after them (in this order): the
#: deterministic counts, the memory per session, and the scaling grid (its own rounds:
#: bench_scaling.FULL / QUICK). Named in --scenarios like the scenarios.
EXTRAS: tuple[str, ...] = ("calls", "memory", "scaling", "replicas")
EXTRA_BACKENDS: dict[str, frozenset[str]] = {
    "calls": frozenset({"postgresql", "sqlite"}),
    "memory": frozenset({"postgresql", "sqlite"}),
    "scaling": frozenset({"postgresql", "sqlite"}),
    # A primary and two replicas built on loopback (bench_replicas), whatever --url is.
    "replicas": POSTGRESQL,
}
REPLICAS_FULL = {"rounds": 3, "seconds": 0.8, "warmup": 0.25}
REPLICAS_QUICK = {"rounds": 1, "seconds": 0.2, "warmup": 0.05}
CALLS_OPS = {"full": (300, 30), "quick": (20, 5)}  # (counted ops, warm-up ops)


# command line ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    names = [s.name for s in SCENARIOS] + list(EXTRAS)
    add("--scenarios", default="all", help=f"comma-separated, from: {', '.join(names)}")
    add(
        "--url",
        default=os.environ.get(harness.URL_ENV) or "sqlite",
        help=f"database URL, or 'sqlite' for a temporary file (default: ${harness.URL_ENV} "
        "if set, else 'sqlite')",
    )
    add(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round of 0.3 s per contender, a short scaling grid, few counts",
    )
    add("--rounds", type=int, default=None, help=f"rounds (default {FULL['rounds']})")
    add("--seconds", type=float, default=None, help=f"seconds (default {FULL['seconds']})")
    add("--warmup", type=float, default=None, help=f"warm-up (default {FULL['warmup']})")
    add("--tasks", type=int, default=10, help="concurrent asyncio tasks")
    add("--pool-size", type=int, default=10, help="connection pool size of every contender")
    add(
        "--scaling-tasks",
        default=",".join(map(str, bench_scaling.TASKS)),
        help="the scaling grid's task counts, comma-separated",
    )
    add(
        "--scaling-pools",
        default=",".join(map(str, bench_scaling.POOLS)),
        help="the scaling grid's pool sizes, comma-separated",
    )
    add(
        "--out",
        type=Path,
        default=None,
        help="put the JSON, the chart and results.md here (default: JSON in "
        "benchmarks/results/, chart and results.md in docs/benchmarks/)",
    )
    add(
        "--redraw",
        action="store_true",
        help="measure nothing: redraw the charts and results.md from the latest JSON files",
    )
    add(
        "--skip-unreachable",
        action="store_true",
        help="exit 0 with a message when the database cannot be reached",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.scenarios == "all":
        args.scenarios = names
    else:
        args.scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
        unknown = sorted(set(args.scenarios) - set(names))
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {names}")
    if args.rounds < 1 or args.tasks < 1 or args.pool_size < 1 or args.seconds <= 0:
        parser.error("--rounds, --tasks and --pool-size must be >= 1, --seconds > 0")
    try:
        args.scaling_tasks = [int(n) for n in args.scaling_tasks.split(",")]
        args.scaling_pools = [int(n) for n in args.scaling_pools.split(",")]
    except ValueError:
        parser.error("--scaling-tasks and --scaling-pools take comma-separated whole numbers")
    if min(args.scaling_tasks + args.scaling_pools) < 1:
        parser.error("--scaling-tasks and --scaling-pools must be >= 1")
    return args


def resolve_url(url: str, stack: ExitStack) -> URL:
    """``sqlite`` -> a file in a temporary directory; default async drivers filled in."""
    return resolve_urls(url, stack)[0]


def resolve_urls(url: str, stack: ExitStack) -> tuple[URL, str]:
    """The URL for plain SQLAlchemy (async driver named) and the one for sessionforge.

    The second is the URL as a user writes it: without a driver when none was given
    (``sqlite`` -> ``sqlite:///<temporary directory>/bench.db``), so sessionforge uses
    its own default driver, as an application would.
    """
    if url in {"sqlite", "sqlite://"}:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sf-bench-"))
        url = f"sqlite:///{directory}/bench.db"
    parsed = make_url(url)
    written = parsed.render_as_string(hide_password=False)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() in {"pysqlite", ""}:
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql" and (
        "+" not in parsed.drivername or parsed.get_driver_name() == "psycopg2"
    ):
        # SQLAlchemy 2.1's default for postgresql:// is psycopg; sessionforge's is asyncpg.
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend in {"mysql", "mariadb"}:
        # mariadb:// is folded to mysql, as sessionforge does; mysqldb is SQLAlchemy's
        # default when no driver is named.
        driver = parsed.get_driver_name()
        parsed = parsed.set(
            drivername=f"mysql+{'aiomysql' if driver in {'mysqldb', ''} else driver}"
        )
    if backend == "sqlite" and parsed.database in {None, "", ":memory:"}:
        raise SystemExit("the suite needs a SQLite file, not an in-memory database")
    return parsed, written


#: The file-name label of each backend (``suite-<label>.png``, ``latest-<label>.json``).
LABELS = {"postgresql": "postgres", "mysql": "mariadb"}


def backend_label(url: URL) -> str:
    return LABELS.get(url.get_backend_name(), url.get_backend_name())


async def server_version(url: str) -> str:
    """The database's version; raises when it cannot be reached."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
                return f"PostgreSQL {version}"
            if engine.dialect.name in {"mysql", "mariadb"}:
                version = str((await conn.execute(text("SELECT VERSION()"))).scalar_one())
                server = "MariaDB" if "mariadb" in version.lower() else "MySQL"
                return f"{server} {version.split('-')[0]}"
            return f"SQLite {sqlite3.sqlite_version}"
    finally:
        await engine.dispose()


cpu_model = harness.cpu_model


# running ---------------------------------------------------------------------------


async def run_all(
    scenarios: Sequence[Scenario], params: Params
) -> tuple[list[Report], dict[str, str]]:
    """Run each scenario in turn; a failing scenario is recorded and the rest still run."""
    reports: list[Report] = []
    failures: dict[str, str] = {}
    estimate = 5  # contenders per scenario, until a scenario says how many it has
    overall = harness.Overall(total=len(scenarios) * estimate * params.rounds)
    harness.OVERALL = overall
    try:
        for index, scenario in enumerate(scenarios):
            overall.label = f"{index + 1}/{len(scenarios)} {scenario.name}:"
            harness.progress("setting up ...")
            try:
                async with scenario.source(params) as contenders:
                    left = len(scenarios) - index - 1
                    overall.total = overall.done + params.rounds * (len(contenders) + left * 5)
                    report = await harness.run(
                        scenario.name, contenders, scenario.baseline, params
                    )
            except Exception:
                harness.progress("")
                failures[scenario.name] = traceback.format_exc()
                print(f"\n{scenario.name}: FAILED\n{failures[scenario.name]}", file=sys.stderr)
                continue
            reports.append(report)
            print(f"\n## {scenario.name}: {scenario.title}\n")
            print(harness.format_table(report))
            for line in extra_lines(report):
                print(line)
            sys.stdout.flush()
    finally:
        harness.OVERALL = None
    return reports, failures


def run_extras(
    names: Sequence[str],
    params: Params,
    server: str,
    quick: bool,
    grid: tuple[Sequence[int], Sequence[int]],
    failures: dict[str, str],
) -> dict[str, Any]:
    """Run the measurements of ``EXTRAS`` named in ``names``; a failure is recorded in
    ``failures`` and the others still run. Returns their documents by name."""
    factory_url = params.sessionforge_url()
    measured: dict[str, Any] = {}
    for name in names:
        try:
            if name == "calls":
                ops, warmup = CALLS_OPS["quick" if quick else "full"]
                counts = asyncio.run(bench_calls.measure(params.url, ops, warmup, factory_url))
                measured[name] = bench_calls.document(params.url, factory_url, ops, counts)
                table = bench_calls.format_counts(counts)
                title = "deterministic counts per operation"
            elif name == "memory":
                sessions, held, repeats = (
                    bench_memory.QUICK
                    if quick
                    else (bench_memory.SESSIONS, bench_memory.HELD, bench_memory.REPEATS)
                )
                states = asyncio.run(
                    bench_memory.measure(params.url, factory_url, sessions, held, repeats)
                )
                measured[name] = bench_memory.document(params.url, factory_url, states, repeats)
                table = bench_memory.format_table(measured[name])
                title = "bytes per open session"
            elif name == "replicas":
                timing = REPLICAS_QUICK if quick else REPLICAS_FULL
                point = Params(
                    url=params.url,
                    rounds=int(timing["rounds"]),
                    seconds=timing["seconds"],
                    warmup=timing["warmup"],
                    tasks=8,
                    pool_size=8,
                )
                harness.progress("replicas: building a primary and two replicas ...")
                try:
                    parts = bench_replicas.measure(point)
                except bench_replicas.ClusterUnavailable as exc:
                    harness.progress("")
                    print(f"\nreplicas: skipped, no replicated cluster could be built: {exc}")
                    continue
                measured.setdefault("reports", []).extend(parts)
                table = "\n\n".join(harness.format_table(r) for r in parts)
                for report in parts:
                    table += "\n" + "\n".join(extra_lines(report))
                title = "reads on replicas, read-your-writes"
            else:
                preset = bench_scaling.QUICK if quick else bench_scaling.FULL
                point = Params(
                    url=params.url,
                    rounds=int(preset["rounds"]),
                    seconds=preset["seconds"],
                    warmup=preset["warmup"],
                    factory_url=params.factory_url,
                )
                reports = asyncio.run(bench_scaling.measure(point, *grid))
                measured[name] = bench_scaling.document(reports, server)
                table = bench_scaling.format_table(measured[name])
                title = "cost by tasks and pool size"
        except Exception:
            harness.progress("")
            failures[name] = traceback.format_exc()
            print(f"\n{name}: FAILED\n{failures[name]}", file=sys.stderr)
            continue
        print(f"\n## {name}: {title}\n")
        print(table)
        sys.stdout.flush()
    return measured


def pair_ratio(report: Report, contender: str, versus: str) -> list[float]:
    ours, theirs = report.ops_per_s[contender], report.ops_per_s[versus]
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def backend_of(report: Report) -> str:
    return make_url(report.params.url).get_backend_name()


def evaluate(
    reports: Sequence[Report], counts: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Each target whose scenario ran on its backend: the median per-round ratio, whether
    it is met (``None``: only reported), and the matching deterministic counts."""
    by_name = {r.scenario: r for r in reports}
    results = []
    for target in TARGETS:
        report = by_name.get(target.scenario)
        if report is None or backend_of(report) not in target.backends:
            continue
        if not {target.contender, target.versus} <= report.ops_per_s.keys():
            continue
        ratios = pair_ratio(report, target.contender, target.versus)
        value = statistics.median(ratios)
        entry: dict[str, Any] = {
            "scenario": target.scenario,
            "contender": target.contender,
            "versus": target.versus,
            "minimum": target.minimum,
            "label": target.label,
            "ratio": value,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "met": None if target.minimum is None else value >= target.minimum,
        }
        if target.counts is not None and counts is not None:
            entry["counts"] = count_ratio(counts, *target.counts)
        results.append(entry)
    return results


def count_ratio(counts: dict[str, Any], contender: str, versus: str) -> dict[str, Any] | None:
    """``contender``'s calls/op and hops/op against ``versus``'s (bench_calls' JSON)."""
    by_name = {c["contender"]: c for c in counts["counts"]}
    if contender not in by_name or versus not in by_name:
        return None
    ours, theirs = by_name[contender], by_name[versus]
    hops = None
    if ours["hops_per_op"] is not None and theirs["hops_per_op"]:
        hops = ours["hops_per_op"] / theirs["hops_per_op"]
    return {
        "contender": contender,
        "versus": versus,
        "calls_per_op": ours["calls_per_op"],
        "versus_calls_per_op": theirs["calls_per_op"],
        "calls_ratio": ours["calls_per_op"] / theirs["calls_per_op"],
        "hops_per_op": ours["hops_per_op"],
        "versus_hops_per_op": theirs["hops_per_op"],
        "hops_ratio": hops,
    }


NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mysql": "MariaDB"}


def extra_targets(
    backend: str,
    scaling: dict[str, Any] | None,
    memory: dict[str, Any] | None,
    counts: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """The scaling target (the worst point of the grid) and the memory one."""
    name = NAMES.get(backend, backend)
    results = []
    if scaling is not None:
        worst, target = scaling["worst"], scaling["target"]
        best = max(p["ratio"] for p in scaling["points"])
        sign = ">" if target["strict"] else ">="
        tasks = "/".join(map(str, scaling["tasks"]))
        pools = "/".join(map(str, scaling["pools"]))
        entry = {
            "scenario": "scaling",
            "contender": scaling["contender"],
            "versus": scaling["baseline"],
            "minimum": target["minimum"],
            "label": f"{name}: scaling, sessionforge {sign} {target['minimum']:g}x bare at "
            f"every point ({tasks} tasks x pools {pools}); worst point shown, "
            f"{worst['tasks']} tasks, pool {worst['pool_size']}",
            "ratio": worst["ratio"],
            "ratio_min": worst["ratio"],
            "ratio_max": best,
            "met": target["met"],
        }
        if counts is not None:
            entry["counts"] = count_ratio(counts, *READ_COUNTS)
        results.append(entry)
    if memory is not None:
        ratios = [
            state["contenders"][memory["contender"]]["ratio_to_baseline"]
            for state in memory["states"].values()
        ]
        results.append(
            {
                "scenario": "memory",
                "contender": memory["contender"],
                "versus": memory["baseline"],
                "maximum": memory["target"]["maximum"],
                "minimum": None,
                "label": f"{name}: bytes per open session <= "
                f"{memory['target']['maximum']:g}x bare (worst state shown)",
                "ratio": max(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "met": memory["target"]["met"],
            }
        )
    return results


def cancel_outcomes(report: Report) -> dict[str, dict[str, float]]:
    """Per contender of the cancel scenario: outcome totals and the worst leak."""
    outcomes = {}
    for name, rounds in report.notes.items():
        total: Counter[str] = Counter()
        for notes in rounds:
            total.update({k: int(v) for k, v in notes.items() if k != "checked_out_after"})
        figures: dict[str, float] = dict(total)
        figures["checked_out_after_max"] = max(
            (notes.get("checked_out_after", 0) for notes in rounds), default=0
        )
        outcomes[name] = figures
    return outcomes


def extra_lines(report: Report) -> list[str]:
    lines = []
    if report.scenario == "cancel":
        for name, figures in cancel_outcomes(report).items():
            leaked = figures.pop("checked_out_after_max")
            verdict = "no leak" if not leaked else f"LEAK: {leaked:.0f} connection(s) checked out"
            details = ", ".join(f"{k} {v:.0f}" for k, v in sorted(figures.items()))
            lines.append(f"{name}: {details}; {verdict}")
    for target in evaluate([report]):
        if target["minimum"] is None:
            verdict = "reported, no target"
        else:
            met = "met" if target["met"] else "NOT MET"
            verdict = f"target >= {target['minimum']:g}: {met}"
        lines.append(
            f"{target['contender']} / {target['versus']}: {target['ratio']:.3f} ({verdict})"
        )
    return lines


# output ----------------------------------------------------------------------------


def suite_document(
    reports: Sequence[Report],
    failures: dict[str, str],
    params: Params,
    backend: str,
    server: str,
    started: datetime,
    elapsed: float,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The suite's JSON; ``extras`` holds the ``calls``, ``memory`` and ``scaling``
    documents of the runs that were made."""
    machine = harness.machine_info() | {"cpu_model": cpu_model(), "server": server}
    extras = extras or {}
    counts, memory, scaling = extras.get("calls"), extras.get("memory"), extras.get("scaling")
    name = make_url(params.url).get_backend_name()
    return {
        "suite": "sessionforge benchmarks",
        "created": started.isoformat(),
        "elapsed_seconds": round(elapsed, 1),
        "backend": backend,
        "url": harness.masked(params.url),
        "machine": machine,
        "params": {
            "rounds": params.rounds,
            "seconds": params.seconds,
            "warmup": params.warmup,
            "tasks": params.tasks,
            "pool_size": params.pool_size,
        },
        "scenarios": {
            r.scenario: harness.document(r, started)
            | {"title": title_of(r.scenario)}
            | ({"outcomes": cancel_outcomes(r)} if r.scenario == "cancel" else {})
            for r in reports
        },
        "calls": counts,
        "memory": memory,
        "scaling": scaling,
        "failures": failures,
        "targets": evaluate(reports, counts) + extra_targets(name, scaling, memory, counts),
    }


EXTRA_TITLES = {
    "replicas-read": "reader() on a replica and on the primary",
    "replicas-write": "a write, then a read of it (read-your-writes)",
}


def title_of(name: str) -> str:
    return next((s.title for s in SCENARIOS if s.name == name), EXTRA_TITLES.get(name, name))


def write_chart(document: dict[str, Any], path: Path) -> bool:
    """Draw ratio-to-baseline bars per scenario and contender; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    rows: list[tuple[str, str, dict[str, float], bool]] = []  # scenario, name, summary, base
    for name, scenario in document["scenarios"].items():
        for contender, summary in scenario["summary"].items():
            rows.append((name, contender, summary, contender == scenario["baseline"]))
    if not rows:
        return False
    cap = min(max(r[2]["ratio_to_baseline"] for r in rows), 2.5) * 1.08
    positions: dict[tuple[str, str], float] = {}
    y = 0.0
    ticks, labels = [], []
    previous = None
    for scenario_name, contender, _, _ in rows:
        if previous is not None and scenario_name != previous:
            y += 0.8
        previous = scenario_name
        positions[(scenario_name, contender)] = y
        ticks.append(y)
        labels.append(f"{scenario_name}: {contender}")
        y += 1.0
    height = 1.2 + 0.28 * y
    fig, ax = plt.subplots(figsize=(10, height))
    for (_, contender, summary, is_base), pos in zip(rows, positions.values(), strict=True):
        ratio = summary["ratio_to_baseline"]
        colour = (
            "#9e9e9e"
            if is_base
            else "#1f6fb4"
            if "sessionforge" in contender
            else "#c8c8c8"
            if contender.startswith("raw ")
            else "#e08a2c"
        )
        shown = min(ratio, cap)
        ax.barh(pos, shown, color=colour, height=0.75)
        if not is_base and ratio <= cap:
            low, high = summary["ratio_min"], summary["ratio_max"]
            ax.errorbar(
                ratio,
                pos,
                xerr=[[ratio - low], [high - ratio]],
                color="#333333",
                capsize=2,
                linewidth=0.8,
            )
        label = f"{ratio:.2f}x" + (" →" if ratio > cap else "")
        right = min(max(ratio, summary["ratio_max"]), cap)  # past the error bar
        ax.text(right + 0.012 * cap, pos, label, va="center", fontsize=7)
    seen: Counter[float] = Counter()
    for target in document["targets"]:
        row = positions.get((target["scenario"], target["contender"]))
        if row is None or target["minimum"] is None:
            continue  # a scenario not charted here (scaling, memory), or no target
        versus = document["scenarios"][target["scenario"]]["summary"][target["versus"]]
        where = min(target["minimum"] * versus["ratio_to_baseline"], cap)
        ax.plot([where, where], [row - 0.45, row + 0.45], color="#c62828", linewidth=2)
        above = seen[row] % 2 == 0  # a second target on the same row goes below it
        seen[row] += 1
        ax.text(
            where,
            row - 0.5 if above else row + 0.5,
            f"target {target['minimum']:g}x {short(target['versus'])}",
            color="#c62828",
            fontsize=6,
            ha="center",
            va="bottom" if above else "top",
        )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, cap * 1.12)
    ax.set_xlabel("throughput / the scenario's baseline (median of per-round ratios)")
    machine = document["machine"]
    commit = (machine.get("git") or {}).get("commit", "?")[:12]
    ax.set_title(
        f"sessionforge benchmarks on {machine['server']} — {document['created'][:10]}, "
        f"{machine.get('cpu_model') or 'unknown CPU'}, {machine['cpu_count']} CPUs, "
        f"commit {commit}, {document['params']['rounds']} rounds\n"
        "grey: baseline, blue: sessionforge, orange: other libraries, light: raw driver; "
        "red: target",
        fontsize=8,
    )
    return harness.save_figure(fig, path)


def short(name: str) -> str:
    return {
        bench_liveness.PRE_PING: "pre_ping",
        bench_read.BASELINE: "begin()",
        bench_asgi.BASELINE: "hand-written",
    }.get(name, name)


def markdown(documents: Sequence[dict[str, Any]]) -> str:
    """results.md: per backend, the machine, the targets and every scenario's table."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`python -m benchmarks.suite`); see "
        "[benchmarks/README.md](../../benchmarks/README.md) for what each scenario does and "
        "how to read the numbers. Ratios are medians of per-round ratios against the "
        "scenario's baseline (marked *), measured in one process with interleaved rounds.",
    ]
    for doc in documents:
        machine, params, versions = doc["machine"], doc["params"], doc["machine"]["versions"]
        python = machine["python"].split()[0]
        git = machine.get("git") or {}
        commit = git.get("commit", "?")[:12] + (
            " + local changes" if git.get("src_changed") else ""
        )
        lines += [
            "",
            f"## {machine['server']}",
            "",
            f"Measured {doc['created'][:16].replace('T', ' ')} UTC at commit {commit}; "
            f"{machine.get('cpu_model') or 'unknown CPU'}, {machine['cpu_count']} CPUs, "
            f"{machine['platform']}; Python {python}, SQLAlchemy {versions['sqlalchemy']}, "
            f"asyncpg {versions['asyncpg']}, aiosqlite {versions['aiosqlite']}. "
            f"{params['rounds']} rounds x {params['seconds']:g} s per contender "
            f"({params['warmup']:g} s warm-up), {params['tasks']} tasks, pool "
            f"{params['pool_size']}; database and client on the same machine.",
            "",
            f"![ratio to baseline per scenario]({'suite-' + doc['backend'] + '.png'})",
        ]
        lines += target_table(doc)
        lines += counts_table(doc.get("calls"))
        lines += scaling_table(doc.get("scaling"))
        lines += memory_table(doc.get("memory"))
        for name, scenario in doc["scenarios"].items():
            lines += [
                "",
                f"### {name}: {scenario['title']}",
                "",
                "| contender | median ops/s | ratio | ratio min..max | CPU µs/op |",
                "|---|---:|---:|---:|---:|",
            ]
            for contender, s in scenario["summary"].items():
                mark = " *" if contender == scenario["baseline"] else ""
                lines.append(
                    f"| {contender}{mark} | {s['median_ops_per_s']:,.0f} | "
                    f"{s['ratio_to_baseline']:.3f} | {s['ratio_min']:.2f}..{s['ratio_max']:.2f}"
                    f" | {s['median_cpu_us_per_op']:,.0f} |"
                )
            if "outcomes" in scenario:
                lines += [
                    "",
                    "| contender | completed | cancelled | errors | stray errors "
                    "| connections left checked out |",
                    "|---|---:|---:|---:|---:|---:|",
                ]
                for contender, o in scenario["outcomes"].items():
                    stray = sum(
                        v for k, v in o.items() if k.startswith(("logged:", "unretrieved:"))
                    )
                    lines.append(
                        f"| {contender} | {o.get('completed', 0):,.0f} | "
                        f"{o.get('cancelled', 0):,.0f} | {o.get('errors', 0):,.0f} | "
                        f"{stray:,.0f} | {o['checked_out_after_max']:.0f} |"
                    )
        for name in doc["failures"]:
            lines += ["", f"### {name}: FAILED (see the JSON for the traceback)"]
    return "\n".join(lines) + "\n"


#: Targets of the issue that the suite does not measure, and how to measure them.
UNMEASURED: dict[str, tuple[str, ...]] = {
    "postgres": tuple(label for *_, label in bench_replicas.TARGETS),
}
UNMEASURED_HOW = (
    "not measured in this run (the replicated cluster could not be built, or `replicas` "
    "was not among --scenarios): `python -m benchmarks.bench_replicas --part read` / "
    "`--part write`"
)


def target_table(doc: dict[str, Any]) -> list[str]:
    """The targets of one backend: measured figure, verdict, and the counts beside it."""
    lines = [
        "",
        "| target | measured (min..max) | | calls/op vs | hops/op vs |",
        "|---|---:|---|---:|---:|",
    ]
    for t in doc["targets"]:
        verdict = "reported" if t["met"] is None else "met" if t["met"] else "**not met**"
        counts = t.get("counts")
        calls = hops = "-"
        if counts:
            calls = f"{counts['calls_ratio']:.3f}"
            if counts["hops_ratio"] is not None:
                hops = f"{counts['hops_per_op']:g} / {counts['versus_hops_per_op']:g}"
        lines.append(
            f"| {t['label']} | {t['ratio']:.3f} ({t['ratio_min']:.2f}..{t['ratio_max']:.2f})"
            f" | {verdict} | {calls} | {hops} |"
        )
    measured = {t["label"] for t in doc["targets"]}
    for label in UNMEASURED.get(doc["backend"], ()):
        if label in measured:
            continue
        lines.append(f"| {label} | - | {UNMEASURED_HOW} | - | - |")
    lines += [
        "",
        "*calls/op vs*: Python calls per operation of the same operation, sessionforge / "
        "the baseline (`bench_calls`, deterministic: a noisy run moves the timed ratio, "
        "not this); *hops/op*: hand-offs to the SQLite driver thread per operation, "
        "sessionforge / baseline.",
    ]
    return lines


def counts_table(counts: dict[str, Any] | None) -> list[str]:
    if counts is None:
        return []
    with_hops = any(c["hops_per_op"] is not None for c in counts["counts"])
    lines = [
        "",
        f"### Deterministic counts (`bench_calls`, {counts['ops']} operations, one task)",
        "",
        "| contender | calls/op | vs | hops/op | vs |"
        if with_hops
        else "| contender | calls/op | vs |",
        "|---|---:|---:|---:|---:|" if with_hops else "|---|---:|---:|",
    ]
    for c in counts["counts"]:
        share = counts["ratios"][c["contender"]]
        mark = " *" if c["contender"] == c["versus"] else ""
        row = f"| {c['contender']}{mark} | {c['calls_per_op']:,.0f} | {share['calls']:.3f} |"
        if with_hops:
            hops = "-" if c["hops_per_op"] is None else f"{c['hops_per_op']:g}"
            ratio = "-" if share["hops"] is None else f"{share['hops']:.3f}"
            row += f" {hops} | {ratio} |"
        lines.append(row)
    lines += ["", "vs: ratio to the contender marked * above it (read, then write)."]
    return lines


def scaling_table(scaling: dict[str, Any] | None) -> list[str]:
    if scaling is None:
        return []
    params = scaling["params"]
    lines = [
        "",
        "### scaling: begin + one read, by tasks and pool size",
        "",
        f"sessionforge on `{params['factory_url']}`, bare on `{params['url']}`; "
        f"{params['rounds']} rounds x {params['seconds']:g} s per contender and point. "
        "Chart: [scaling.png](scaling.png).",
        "",
        "| tasks | pool | sessionforge ops/s | bare ops/s | ratio | ratio min..max |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for point in scaling["points"]:
        ops = point["ops_per_s"]
        lines.append(
            f"| {point['tasks']} | {point['pool_size']} | {ops[scaling['contender']]:,.0f} | "
            f"{ops[scaling['baseline']]:,.0f} | {point['ratio']:.3f} | "
            f"{point['ratio_min']:.2f}..{point['ratio_max']:.2f} |"
        )
    return lines


def memory_table(memory: dict[str, Any] | None) -> list[str]:
    if memory is None:
        return []
    lines = [
        "",
        "### memory: bytes per open session (tracemalloc)",
        "",
        "| state | contender | sessions | bytes/session | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for state, entry in memory["states"].items():
        for name, values in entry["contenders"].items():
            mark = " *" if name == memory["baseline"] else ""
            lines.append(
                f"| {state} | {name}{mark} | {entry['sessions']} | "
                f"{values['bytes_per_session']:,.0f} | {values['ratio_to_baseline']:.3f} |"
            )
    return lines


def publish(results_dir: Path, docs_dir: Path, labels: Sequence[str]) -> None:
    """Draw the chart of each backend in ``labels`` and rebuild results.md (all backends)."""
    documents = {
        name: json.loads((results_dir / f"latest-{name}.json").read_text())
        for name in ("sqlite", "postgres", "mariadb")
        if (results_dir / f"latest-{name}.json").exists()
    }
    for label in labels:
        if label not in documents:
            continue
        chart = docs_dir / f"suite-{label}.png"
        if write_chart(documents[label], chart):
            print(f"chart: {chart}")
        else:
            print(f"chart: not drawn, it needs matplotlib: {BENCH_EXTRA_HINT}")
    scaling = [
        doc["scaling"]
        | {"machine": doc["scaling"]["machine"] | {"server": doc["machine"]["server"]}}
        for doc in documents.values()
        if doc.get("scaling")
    ]
    if scaling and any(documents[label].get("scaling") for label in labels if label in documents):
        chart = docs_dir / "scaling.png"
        if bench_scaling.write_chart(scaling, chart):
            print(f"chart: {chart}")
    table = docs_dir / "results.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(markdown(list(documents.values())))
    print(f"table: {table}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results_dir = args.out or harness.RESULTS_DIR
    docs_dir = args.out or DOCS_DIR
    if args.redraw:
        publish(results_dir, docs_dir, ("sqlite", "postgres", "mariadb"))
        return 0
    with ExitStack() as stack:
        url, written = resolve_urls(args.url, stack)
        url_text = url.render_as_string(hide_password=False)
        backend = url.get_backend_name()
        label = backend_label(url)
        try:
            server = asyncio.run(server_version(url_text))
        except Exception as exc:
            message = f"{harness.masked(url_text)} is not reachable: {exc}"
            if args.skip_unreachable:
                print(f"skipped: {message}")
                return 0
            print(message, file=sys.stderr)
            return 2
        chosen = [s for s in SCENARIOS if s.name in args.scenarios]
        skipped = [s.name for s in chosen if backend not in s.backends]
        chosen = [s for s in chosen if backend in s.backends]
        extras = [name for name in EXTRAS if name in args.scenarios]
        skipped += [name for name in extras if backend not in EXTRA_BACKENDS[name]]
        extras = [name for name in extras if backend in EXTRA_BACKENDS[name]]
        if skipped:
            print(f"not for {backend}: {', '.join(skipped)}")
        params = Params(
            url=url_text,
            rounds=args.rounds,
            seconds=args.seconds,
            warmup=args.warmup,
            tasks=args.tasks,
            pool_size=args.pool_size,
            factory_url=written if written != url_text else None,
        )
        print(f"# sessionforge benchmark suite on {server} ({harness.masked(url_text)})")
        if params.factory_url:
            print(f"# sessionforge contenders on {harness.masked(params.factory_url)}")
        started, clock = datetime.now(UTC), time.perf_counter()
        reports, failures = asyncio.run(run_all(chosen, params))
        grid = (args.scaling_tasks, args.scaling_pools)
        measured = run_extras(extras, params, server, args.quick, grid, failures)
        reports += measured.pop("reports", [])
        document = suite_document(
            reports,
            failures,
            params,
            label,
            server,
            started,
            time.perf_counter() - clock,
            measured,
        )

    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"suite-{label}-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    for name in ("latest.json", f"latest-{label}.json"):
        shutil.copyfile(path, results_dir / name)
    print(f"\nresults: {path}")

    publish(results_dir, docs_dir, (label,))
    print(f"took {document['elapsed_seconds']:.0f} s")
    if failures:
        print(f"FAILED scenarios: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
