"""The current session of a task (or thread): what ``scope()`` and ``atomic()`` set.

One ``contextvars.ContextVar`` per factory twin, so the value follows ``await`` within a
task, is copied (never shared back) into tasks the task starts, and is separate per
thread for the sync twin.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Generic, TypeVar

from .errors import NoCurrentSessionError

__all__ = ["CurrentSession"]

_S = TypeVar("_S")


class CurrentSession(Generic[_S]):
    """The current session of one factory twin in the running context."""

    __slots__ = ("_var",)

    def __init__(self, name: str) -> None:
        self._var: ContextVar[_S | None] = ContextVar(name, default=None)

    def peek(self) -> _S | None:
        return self._var.get()

    def get(self, describe: Callable[[], str]) -> _S:
        session = self._var.get()
        if session is None:
            raise NoCurrentSessionError(
                f"no current session for {describe()} in this task: run the code inside "
                "`async with db.scope():` or `db.atomic()` (`with` for the sync twin), or "
                "pass the session explicitly; one session per task"
            )
        return session

    def set(self, session: _S) -> Token[_S | None]:
        return self._var.set(session)

    def reset(self, token: Token[_S | None]) -> None:
        self._var.reset(token)
