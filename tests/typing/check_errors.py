"""Each line must be an error under mypy --strict (test_typing.py checks the count)."""

from __future__ import annotations

from sessionforge import SessionFactory

SessionFactory("sqlite://", pool_size="5")  # E: wrong type
SessionFactory("sqlite://", pool_sizes=5)  # E: unknown option
SessionFactory("sqlite://", sqlite_begin="exclusive")  # E: not a Literal choice
SessionFactory("sqlite://", class_=dict)  # E: not an AsyncSession subclass
