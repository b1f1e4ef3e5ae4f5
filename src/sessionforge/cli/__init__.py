"""The ``sessionforge`` command: ``check`` a database URL, run the concurrency ``demo``.

Exit codes: 0 success; 1 the database is unavailable, refused the connection, or an
unexpected error (or the demo's invariant broke without ``--plain``); 2 a configuration
error (bad URL, unknown or missing driver, sync driver, bad option); 3 (``check``) the
SQLite file does not exist yet, and was not created; 4 (``check --replica``) the primary
answered, but a replica is unreachable, refused the connection or belongs to another
cluster (the report is printed, then the error line). Errors are one line on stderr,
``sessionforge <command>: <reason>``, with any password masked, and never a traceback.

This module is the entry point (``main``, the ``sessionforge`` script and
``python -m sessionforge``): the argument parser, dispatch to a command, and the mapping
of exceptions to exit codes. The commands are ``check.py`` and ``demo.py`` (its workload
in ``workload.py``); the codes and the error line are ``exits.py``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from sessionforge.config import DEFAULT_URL
from sessionforge.errors import ConfigurationError, DatabaseUnavailableError, SessionForgeError

from .check import run_check
from .demo import DEFAULT_DEMO_URL, run_demo_command
from .exits import (
    EXIT_CONFIGURATION,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_UNAVAILABLE,
    fail,
    one_line,
)

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


# arguments ---------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``sessionforge`` argument parser, with one sub-command per command."""
    parser = argparse.ArgumentParser(
        prog="sessionforge", description="Check a database URL, or run the concurrency demo."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check(commands)
    _add_demo(commands)
    return parser


def _add_check(commands: Any) -> None:
    check = commands.add_parser(
        "check",
        help="connect to a database and show what sessionforge makes of it",
        description="Connect, ping and describe a database. URL defaults to the "
        f"DATABASE_URL environment variable, else {DEFAULT_URL}. A SQLite file that "
        "does not exist is reported, not created. With --replica (PostgreSQL), or a URL "
        "that lists several hosts, every server's role, cluster and lag are shown too.",
        epilog="exit codes: 0 the database answered (a warning, such as a replica that is "
        "not in recovery, leaves it 0); 1 it is unreachable or refused the "
        "connection (the message says why), or an unexpected error; 2 a configuration "
        "error (URL, driver, option); 3 the SQLite file does not exist yet (it will be "
        "created on first use; check created nothing); 4 the primary answered, but a "
        "replica is unreachable, refused the connection or belongs to another cluster",
    )
    check.add_argument("url", nargs="?", metavar="URL", help="database URL (the primary)")
    check.add_argument(
        "--replica",
        action="append",
        metavar="URL",
        help="a streaming replica of the primary, checked too: role, cluster, lag in bytes "
        "(repeat for each replica)",
    )
    check.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up on the ping after this long (default: 10)",
    )
    check.set_defaults(handler=run_check)


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run concurrent bank transfers and verify nothing was lost",
        description="Run N workers x M transfers between K accounts and verify the total "
        f"balance and the transfer log. Runs on --url, else on {DEFAULT_DEMO_URL} "
        "(recreated each run) in the working directory.",
        epilog="exit codes: 0 the invariant holds, or --plain ran (whatever its outcome); "
        "1 the invariant broke, or the database is unavailable; 2 a bad option or URL "
        "(reported before anything runs)",
    )
    demo.add_argument("--url", help="database URL (default: the embedded demo file)")
    demo.add_argument("--workers", type=int, default=10, help="concurrent workers (10)")
    demo.add_argument("--transfers", type=int, default=200, help="transfers per worker (200)")
    demo.add_argument("--accounts", type=int, default=20, help="accounts (20)")
    demo.add_argument(
        "--table-prefix", default="sf_demo", help="prefix of the demo's tables (sf_demo)"
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed, for repeatable runs")
    demo.add_argument(
        "--plain",
        action="store_true",
        help="run the same workload through bare SQLAlchemy, without sessionforge: it "
        "may end in INVARIANT BROKEN (lost updates, or failed transfers), which is what it "
        "demonstrates, so it exits 0 either way",
    )
    demo.set_defaults(handler=run_demo_command)


# dispatch and errors ------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sessionforge`` command with ``argv`` (default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIGURATION
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigurationError as exc:
        return fail(args.command, one_line(exc), EXIT_CONFIGURATION)
    except DatabaseUnavailableError as exc:
        return fail(args.command, one_line(exc), EXIT_UNAVAILABLE)
    except SessionForgeError as exc:  # no other is expected here; still one line
        return fail(args.command, one_line(exc), EXIT_FAILED)
    except (SQLAlchemyError, OSError) as exc:
        # Not expected (ping and setup map these to DatabaseUnavailableError); the driver's
        # text is still shown without any password the URL held.
        return fail(args.command, _scrubbed(exc, args), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        return fail(args.command, "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours or a driver's: still one line, no password
        return fail(args.command, f"unexpected error: {_scrubbed(exc, args)}", EXIT_FAILED)


def _scrubbed(exc: BaseException, args: argparse.Namespace) -> str:
    """The driver's error on one line, with the passwords of the user's URLs as ***."""
    original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = f"{type(original).__name__}: {one_line(original)}"
    urls = [
        args.url or os.environ.get("DATABASE_URL") or "",
        *(getattr(args, "replica", None) or ()),
    ]
    for password in {password for url in urls for password in _passwords(url)}:
        text = text.replace(password, "***")
    return text


def _passwords(raw: str) -> set[str]:
    """Every spelling of the password in ``raw``, parsed or not (it may not parse)."""
    found = set()
    with contextlib.suppress(ArgumentError, ValueError):
        found.add(make_url(raw).password)
    # As mask_url does for a string: the user info runs up to the authority's last "@".
    user_info = raw.partition("://")[2].rpartition("@")[0]
    found.update({user_info.partition(":")[2], unquote(user_info.partition(":")[2])})
    return {str(password) for password in found if password}
