"""Exit codes of the ``sessionforge`` command, and the one-line error it ends with.

Shared by ``main()`` (which maps exceptions to codes) and the commands (``check`` exits 3
for a SQLite file that does not exist yet, 4 when the primary answered but a replica
failed the check; ``demo`` exits 1 on a broken invariant).
"""

from __future__ import annotations

import sys
from typing import Final

__all__ = [
    "EXIT_CONFIGURATION",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_CREATED",
    "EXIT_OK",
    "EXIT_TOPOLOGY",
    "EXIT_UNAVAILABLE",
    "fail",
    "one_line",
]

EXIT_OK: Final = 0
EXIT_UNAVAILABLE: Final = 1
EXIT_FAILED: Final = 1
EXIT_CONFIGURATION: Final = 2
EXIT_NOT_CREATED: Final = 3
#: ``check``: the primary answered, but a replica is unreachable, refused the connection
#: or belongs to another cluster. Not 1: the database serves (reads can go elsewhere),
#: and a monitor can tell a degraded topology from an outage.
EXIT_TOPOLOGY: Final = 4
EXIT_INTERRUPTED: Final = 130


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (sessionforge messages never hold a password)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def fail(command: str, message: str, code: int) -> int:
    """Print ``sessionforge <command>: <message>`` on stderr and return ``code``."""
    print(f"sessionforge {command}: {message}", file=sys.stderr)
    return code
