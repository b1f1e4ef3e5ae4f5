"""Run SQLAlchemy's own sessionmaker / async_sessionmaker test cases against sessionforge.

How the parity figures in the README were measured (issue 11): SQLAlchemy's sdist
ships its test suite. This script unpacks it into a work directory, points the test
modules that exercise the factories at a shim that builds sessionforge's factories
instead (``SyncSessionFactory`` for ``sessionmaker``, ``SessionFactory`` for
``async_sessionmaker`` and for ``sessionmaker(..., class_=<an AsyncSession class>)``),
runs each module twice — with SQLAlchemy's own factories and with ours — and counts,
for the test cases that built a factory (the shim records them), how many pass.

    python tools/sqla_parity.py                       # sqlite:// and sqlite+aiosqlite://
    python tools/sqla_parity.py --dburi postgresql+asyncpg://postgres@127.0.0.1/sa_parity

Use a database of its own for PostgreSQL: SQLAlchemy's suite creates and drops generic
tables (``CREATE DATABASE sa_parity``, with schemas ``test_schema``/``test_schema_2``).
Needs network access to PyPI once (``pip download`` of the sdist). Not part of CI.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import sqlalchemy

FILES = [
    "test/orm/test_session.py",
    "test/orm/test_events.py",
    "test/orm/test_transaction.py",
    "test/orm/test_scoping.py",
    "test/orm/test_bind.py",
    "test/ext/asyncio/test_session.py",
    "test/ext/asyncio/test_scoping.py",
]
IMPORTS = {
    "from sqlalchemy.orm import sessionmaker": "from sf_shim import sessionmaker",
    "from sqlalchemy.ext.asyncio import async_sessionmaker": (
        "from sf_shim import async_sessionmaker"
    ),
    "sa.orm.sessionmaker(": "sessionmaker(",
}

SHIM = '''\
"""sessionmaker / async_sessionmaker -> sessionforge (SF_SHIM_MODE=sqla: SQLAlchemy's)."""
import os

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import async_sessionmaker as _async_sessionmaker
from sqlalchemy.orm import sessionmaker as _sessionmaker

_MODE = os.environ.get("SF_SHIM_MODE", "sessionforge")
_NAMED = {"autoflush", "expire_on_commit", "info", "binds", "join_transaction_mode"}


def _record(kind):
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(os.environ["SF_SHIM_LOG"], "a") as log:
        log.write(f"{kind}\\t{test}\\n")


def _options(kw, renames):
    kw = dict(kw)
    kw.setdefault("expire_on_commit", True)  # SQLAlchemy's default, made explicit
    options = {new: kw.pop(old) for old, new in renames.items() if old in kw}
    options.update({name: kw.pop(name) for name in list(kw) if name in _NAMED})
    if kw:
        options["session_options"] = kw
    return options


def sessionmaker(bind=None, **kw):
    _record("sync")
    if _MODE == "sqla":
        return _sessionmaker(bind, **kw)
    from sessionforge import SessionFactory, SyncSessionFactory

    given = kw.get("class_")
    if isinstance(given, type) and issubclass(given, AsyncSession):
        # sessionmaker(async_engine, class_=AsyncSession) makes AsyncSessions
        renames = {"class_": "class_", "sync_session_class": "sync_class_"}
        return SessionFactory(bind, **_options(kw, renames))
    return SyncSessionFactory(bind, **_options(kw, {"class_": "sync_class_"}))


def async_sessionmaker(bind=None, **kw):
    _record("async")
    if _MODE == "sqla":
        return _async_sessionmaker(bind, **kw)
    from sessionforge import SessionFactory

    return SessionFactory(bind, **_options(kw, {"sync_session_class": "sync_class_"}))
'''


def prepare(workdir: Path) -> Path:
    """Unpack SQLAlchemy's sdist (the installed version) and point its tests at the shim."""
    tree = workdir / "sqlalchemy"
    if tree.exists():
        return tree
    version = sqlalchemy.__version__
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"sqlalchemy=={version}", "-d", str(workdir), "-q"],
        check=True,
    )  # fmt: skip
    sdist = next(workdir.glob(f"sqlalchemy-{version}.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(workdir, filter="data")
    shutil.move(str(workdir / f"sqlalchemy-{version}"), tree)
    for name in FILES:
        path = tree / name
        text = path.read_text()
        for old, new in IMPORTS.items():
            text = text.replace(old, new)
        path.write_text(text)
    (tree / "shim").mkdir()
    (tree / "shim" / "sf_shim.py").write_text(SHIM)
    return tree


def run(tree: Path, mode: str, dburi: str, name: str, out: Path) -> tuple[Path, Path]:
    stem = name.replace("/", "_").removesuffix(".py")
    log, xml = out / f"{mode}-{stem}.rec", out / f"{mode}-{stem}.xml"
    log.unlink(missing_ok=True)
    env = {**os.environ, "SF_SHIM_MODE": mode, "SF_SHIM_LOG": str(log)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "shim"), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=500",
         "--dburi", dburi, f"--junitxml={xml}", name],
        cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    return log, xml


def outcomes(xml: Path) -> dict[str, str]:
    """Test id (as PYTEST_CURRENT_TEST names it) -> passed / failed / error / skipped."""
    found: dict[str, str] = {}
    if not xml.exists():
        return found
    for case in ET.parse(xml).iter("testcase"):
        parts = (case.get("classname") or "").split(".")
        module = max(i for i, part in enumerate(parts) if part.startswith("test_"))
        test = (
            "/".join(parts[: module + 1])
            + ".py::"
            + "::".join([*parts[module + 1 :], case.get("name") or ""])
        )
        status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        if found.get(test, "passed") == "passed":  # keep a failure over a teardown error
            found[test] = status
    return found  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dburi", action="append", help="repeatable; default: the SQLite two")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sf-sqla-parity"
    )
    args = parser.parse_args()  # fmt: skip
    args.workdir.mkdir(parents=True, exist_ok=True)
    tree = prepare(args.workdir)
    for dburi in args.dburi or ["sqlite://", "sqlite+aiosqlite://"]:
        out = args.workdir / "results" / dburi.split(":")[0].replace("+", "-")
        out.mkdir(parents=True, exist_ok=True)
        totals: collections.Counter[str] = collections.Counter()
        failing: list[str] = []
        for name in FILES:
            base_log, base_xml = run(tree, "sqla", dburi, name, out)
            sf_log, sf_xml = run(tree, "sessionforge", dburi, name, out)
            cases: dict[str, str] = {}
            for log in (base_log, sf_log):
                for line in log.read_text().splitlines() if log.exists() else []:
                    kind, test = line.split("\t", 1)
                    cases[test] = "async" if "async" in (kind, cases.get(test)) else "sync"
            base, ours = outcomes(base_xml), outcomes(sf_xml)
            for test, kind in cases.items():
                if base.get(test) == "skipped":
                    continue  # not for this database, with SQLAlchemy's factories too
                totals[f"{kind} cases"] += 1
                totals[f"{kind} pass with SQLAlchemy"] += base.get(test) == "passed"
                totals[f"{kind} pass with sessionforge"] += ours.get(test) == "passed"
                if ours.get(test) != "passed":
                    failing.append(f"  {test}: {ours.get(test, 'not run')}")
        print(f"== {dburi}")
        for kind in ("sync", "async"):
            n = totals[f"{kind} cases"]
            print(
                f"  {kind}: {totals[f'{kind} pass with sessionforge']}/{n} pass with "
                f"sessionforge, {totals[f'{kind} pass with SQLAlchemy']}/{n} with SQLAlchemy"
            )
        print("\n".join(failing) or "  no failing case")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
