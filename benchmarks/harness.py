"""A small runner for throughput benchmarks of async database access paths.

Why interleaved rounds: on a shared or noisy machine the available CPU drifts over
seconds, so measuring contender A for a minute and then B for a minute compares two
different machines. Here every round measures every contender once, for a short
fixed time, in an order rotated each round (A B C, then B C A, ...), all in one
process. Each contender is reported as its median ops/s across rounds, and against
the baseline as the median of the per-round ratios: two contenders measured seconds
apart saw nearly the same machine, so the per-round ratio cancels most of the drift.

A scenario module supplies an async context manager that yields the contenders (and
cleans up after them), then calls ``main()``; see ``bench_factory.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

__all__ = [
    "Contender",
    "Overall",
    "Params",
    "Report",
    "Sample",
    "document",
    "main",
    "measure",
    "run",
]

URL_ENV: str = "SESSIONFORGE_BENCH_URL"
# The name the first scenario scripts read; still honoured, after URL_ENV.
OLD_URL_ENV: str = "SESSIONFORGE_BENCH_POSTGRES_URL"
DEFAULT_URL: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
BENCH_EXTRA_HINT: str = "pip install 'sessionforge[bench]'"
BENCH_DIR: Path = Path(__file__).resolve().parent
RESULTS_DIR: Path = BENCH_DIR / "results"
_VERSIONED = ("sessionforge", "sqlalchemy", "asyncpg", "aiosqlite", "greenlet", "psycopg")


@dataclass(frozen=True)
class Contender:
    """One way of doing the operation under test; ``op`` performs it once.

    ``after``, when given, runs after each measured window (not after the warm-up) and
    returns figures to record for that round, e.g. outcome counts or the pool's
    checked-out connections; they land in ``Report.notes`` and in the JSON.
    """

    name: str
    op: Callable[[], Awaitable[object]]
    after: Callable[[], Awaitable[Mapping[str, float]]] | None = None


@dataclass(frozen=True)
class Params:
    """What the command line chose; scenarios read ``url`` and ``pool_size``.

    ``url`` names the driver (what the plain-SQLAlchemy contenders get); ``factory_url``
    is the same database as a user writes it for ``SessionFactory`` (``sqlite:///x.db``,
    so sessionforge picks its default driver); ``None`` means ``url``. Scenarios read it
    through ``sessionforge_url()``.
    """

    url: str
    rounds: int = 7
    seconds: float = 2.0
    ops: int | None = None
    warmup: float = 0.5
    tasks: int = 10
    pool_size: int = 10
    factory_url: str | None = None

    def sessionforge_url(self) -> str:
        """The URL the sessionforge contenders are given."""
        return self.factory_url or self.url


@dataclass
class Report:
    """Raw numbers of one run, and the summaries derived from them."""

    scenario: str
    baseline: str
    params: Params
    orders: list[list[str]] = field(default_factory=list)
    ops_per_s: dict[str, list[float]] = field(default_factory=dict)
    cpu_us_per_op: dict[str, list[float]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def ratios(self, name: str) -> list[float]:
        """Per-round throughput of ``name`` divided by the baseline's, same round."""
        base = self.ops_per_s[self.baseline]
        return [a / b for a, b in zip(self.ops_per_s[name], base, strict=True)]

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "median_ops_per_s": statistics.median(values),
                "min_ops_per_s": min(values),
                "max_ops_per_s": max(values),
                "ratio_to_baseline": statistics.median(self.ratios(name)),
                "ratio_min": min(self.ratios(name)),
                "ratio_max": max(self.ratios(name)),
                "median_cpu_us_per_op": statistics.median(self.cpu_us_per_op[name]),
            }
            for name, values in self.ops_per_s.items()
        }


# measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One measurement: throughput, and this process's CPU time per operation."""

    ops_per_s: float
    cpu_us_per_op: float


async def measure(
    op: Callable[[], Awaitable[object]], *, tasks: int, seconds: float, ops: int | None = None
) -> Sample:
    """Run ``op`` in ``tasks`` concurrent loops; return throughput and CPU per op.

    The loops stop after ``seconds`` or, when ``ops`` is given, once ``ops`` operations
    have been started. Elapsed time runs until the last loop finishes, so an
    operation in flight at the deadline is counted and timed. CPU time is the whole
    process's (all threads), so it excludes the database server's.
    """
    remaining = ops
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal remaining, done
        while True:
            if remaining is None:
                if time.perf_counter() >= deadline:
                    return
            elif remaining <= 0:
                return
            else:
                remaining -= 1
            await op()
            done += 1

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(loop() for _ in range(tasks)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return Sample(done / elapsed, cpu / max(done, 1) * 1e6)


def rotated(items: Sequence[Contender], round_index: int) -> list[Contender]:
    """``items`` rotated left by ``round_index``: A B C, B C A, C A B, ..."""
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


async def run(
    scenario: str, contenders: Sequence[Contender], baseline: str, params: Params
) -> Report:
    """Measure every contender once per round, in rotated order; return the numbers."""
    if baseline not in {c.name for c in contenders}:
        raise ValueError(f"baseline {baseline!r} is not among the contenders")
    report = Report(scenario, baseline, params, machine=machine_info())
    for contender in contenders:
        report.ops_per_s[contender.name] = []
        report.cpu_us_per_op[contender.name] = []
    for index in range(params.rounds):
        order = rotated(contenders, index)
        report.orders.append([c.name for c in order])
        for position, contender in enumerate(order, 1):
            where = f"round {index + 1}/{params.rounds}  {position}/{len(order)} {contender.name}"
            progress(f"{where} ...")
            if params.warmup > 0:
                await measure(contender.op, tasks=params.tasks, seconds=params.warmup)
            gc.collect()
            sample = await measure(
                contender.op, tasks=params.tasks, seconds=params.seconds, ops=params.ops
            )
            report.ops_per_s[contender.name].append(sample.ops_per_s)
            report.cpu_us_per_op[contender.name].append(sample.cpu_us_per_op)
            if contender.after is not None:
                figures = dict(await contender.after())
                report.notes.setdefault(contender.name, []).append(figures)
            if OVERALL is not None:
                OVERALL.done += 1
            progress(f"{where}: {sample.ops_per_s:,.0f} ops/s")
    progress("")
    return report


@dataclass
class Overall:
    """Progress over a whole suite: measurements done of ``total``, and time left."""

    total: int
    label: str = ""
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def prefix(self) -> str:
        share = self.done / self.total if self.total else 1.0
        elapsed = time.perf_counter() - self.started
        left = f", ~{elapsed / share - elapsed:.0f}s left" if self.done else ""
        return f"[{share:4.0%}{left}] {self.label} "


# Set by a suite (benchmarks/suite.py) to prefix every progress line.
OVERALL: Overall | None = None


def installed(module: str) -> bool:
    """Whether an optional contender's library (the ``bench`` extra) can be imported."""
    if importlib.util.find_spec(module) is not None:
        return True
    progress("")
    sys.stderr.write(f"skipping the {module} contender: not installed ({BENCH_EXTRA_HINT})\n")
    return False


def progress(message: str) -> None:
    """Show one progress line on stderr, overwritten in place on a terminal."""
    if message and OVERALL is not None:
        message = OVERALL.prefix() + message
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[2K{message}")
    elif message:
        sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


# reporting -------------------------------------------------------------------------


def format_table(report: Report) -> str:
    """The summary as an aligned text table, baseline marked with ``*``."""
    summary = report.summary()
    header = (
        "contender",
        "median ops/s",
        "min..max ops/s",
        "ratio",
        "ratio min..max",
        "CPU µs/op",
    )
    rows = [header]
    for name, s in summary.items():
        mark = " *" if name == report.baseline else ""
        rows.append(
            (
                name + mark,
                f"{s['median_ops_per_s']:,.0f}",
                f"{s['min_ops_per_s']:,.0f}..{s['max_ops_per_s']:,.0f}",
                f"{s['ratio_to_baseline']:.3f}",
                f"{s['ratio_min']:.3f}..{s['ratio_max']:.3f}",
                f"{s['median_cpu_us_per_op']:,.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    p = report.params
    amount = f"{p.ops} ops" if p.ops is not None else f"{p.seconds:g}s"
    lines.append(
        f"\n{report.scenario}: {p.rounds} rounds x {amount} per contender, {p.tasks} tasks, "
        f"pool {p.pool_size}, {masked(p.url)}"
        + (f" (sessionforge: {masked(p.sessionforge_url())})" if p.factory_url else "")
        + "\n"
        f"ratio = median over rounds of (contender / {report.baseline}) in the same round; "
        "* = baseline\n"
        "CPU µs/op = this process's CPU time per op (client side only), median over rounds"
    )
    git = report.machine.get("git")
    if git:
        changed = " + uncommitted changes in src/" if git["src_changed"] else ""
        lines.append(f"measured at commit {git['commit'][:12]}{changed}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "git": git_state(),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "versions": versions,
    }


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_state() -> dict[str, Any] | None:
    """The commit measured, and whether ``src/`` differs from it (``None`` outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        src_changed = bool(git("status", "--porcelain", "--", "../src"))
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "src_changed": src_changed}


def masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def document(report: Report, now: datetime | None = None) -> dict[str, Any]:
    """The raw numbers, summaries and machine info of ``report``, as JSON-ready data."""
    now = now or datetime.now(UTC)
    params = asdict(report.params) | {
        "url": masked(report.params.url),
        "factory_url": masked(report.params.sessionforge_url()),
    }
    return {
        "scenario": report.scenario,
        "created": now.isoformat(),
        "machine": report.machine,
        "params": params,
        "baseline": report.baseline,
        "rounds": [
            {
                "order": order,
                "ops_per_s": {name: report.ops_per_s[name][i] for name in order},
                "cpu_us_per_op": {name: report.cpu_us_per_op[name][i] for name in order},
            }
            | (
                {"notes": {name: notes[i] for name, notes in report.notes.items()}}
                if report.notes
                else {}
            )
            for i, order in enumerate(report.orders)
        ],
        "summary": report.summary(),
    }


def write_json(report: Report, path: Path | None) -> Path:
    """Write the raw numbers, summaries and machine info; return the file's path."""
    now = datetime.now(UTC)
    if path is None:
        path = RESULTS_DIR / f"{report.scenario}-{now:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(report, now), indent=2) + "\n")
    return path


# command line ----------------------------------------------------------------------

ContenderSource = Callable[[Params], AbstractAsyncContextManager[Sequence[Contender]]]


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    """``--url``, defaulting to ``$SESSIONFORGE_BENCH_URL`` (``sqlite`` = a temporary file)."""
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV) or DEFAULT_URL,
        help=f"database URL, or sqlite (default: ${URL_ENV} if set, else {DEFAULT_URL})",
    )


def save_figure(fig: Any, path: Path) -> bool:
    """Lay out, write (110 dpi) and close a matplotlib figure; ``True`` once written."""
    import matplotlib.pyplot as plt  # the bench extra's; callers checked it is installed

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(scenario: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.bench_{scenario}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--rounds", type=int, default=7, help="rounds; each measures every contender once")
    add("--seconds", type=float, default=2.0, help="measured seconds per contender per round")
    add("--ops", type=int, default=None, help="fixed op count per round instead of --seconds")
    add("--warmup", type=float, default=0.5, help="warm-up seconds before each measurement")
    add("--tasks", type=int, default=10, help="concurrent asyncio tasks")
    add("--pool-size", type=int, default=10, help="connection pool size of every contender")
    add(
        "--url",
        default=os.environ.get(URL_ENV) or os.environ.get(OLD_URL_ENV) or DEFAULT_URL,
        help=f"database URL (default: ${URL_ENV} if set, else {DEFAULT_URL})",
    )
    add(
        "--json",
        type=Path,
        default=None,
        dest="json_path",
        help="results file (default: benchmarks/results/<scenario>-<timestamp>.json)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks < 1 or args.pool_size < 1 or args.seconds <= 0:
        parser.error("--rounds, --tasks and --pool-size must be >= 1, --seconds > 0")
    if args.ops is not None and args.ops < args.tasks:
        parser.error("--ops must be at least --tasks")
    return args


def main(
    scenario: str,
    description: str,
    source: ContenderSource,
    baseline: str,
    argv: Sequence[str] | None = None,
) -> Report:
    """Parse the command line, run ``scenario``, print the table and write the JSON."""
    args = parse_args(scenario, description, argv)
    params = Params(
        url=args.url,
        rounds=args.rounds,
        seconds=args.seconds,
        ops=args.ops,
        warmup=args.warmup,
        tasks=args.tasks,
        pool_size=args.pool_size,
    )

    async def go() -> Report:
        async with source(params) as contenders:
            return await run(scenario, contenders, baseline, params)

    report = asyncio.run(go())
    print(format_table(report))
    print(f"results: {write_json(report, args.json_path)}")
    return report
