"""The current session of a task (or thread): what ``scope()`` and ``atomic()`` set.

One ``contextvars.ContextVar`` per factory twin, so the value follows ``await`` within a
task, is copied (never shared back) into tasks the task starts, and is separate per
thread for the sync twin.

The ASGI middleware sets a ``Deferred`` instead of a session: the request's session is
made on first use, so a request that never asks for it costs nothing. Tasks the
request starts share the one ``Deferred`` (contexts are copied by reference), so they
all get the request's session.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Generic, TypeVar

from sessionforge.errors import NoCurrentSessionError

__all__ = ["CurrentSession", "Deferred"]

_S = TypeVar("_S")


class Deferred(Generic[_S]):
    """A current session made on first use (by ``make``), then the same one.

    Making it is guarded by a lock: sync endpoints run in worker threads, and two of
    them asking at once must still get one session.
    """

    __slots__ = ("lock", "make", "session")

    def __init__(self, make: Callable[[], _S]) -> None:
        self.make = make
        self.session: _S | None = None
        self.lock = threading.Lock()

    def get(self) -> _S:
        session = self.session
        if session is None:
            with self.lock:
                session = self.session
                if session is None:
                    session = self.session = self.make()
        return session


class CurrentSession(Generic[_S]):
    """The current session of one factory twin in the running context."""

    __slots__ = ("_var",)

    def __init__(self, name: str) -> None:
        self._var: ContextVar[_S | Deferred[_S] | None] = ContextVar(name, default=None)

    def peek(self) -> _S | None:
        value = self._var.get()
        if isinstance(value, Deferred):
            return value.get()
        return value

    def raw(self) -> _S | Deferred[_S] | None:
        """The value as set: a ``Deferred`` stays unmade."""
        return self._var.get()

    def get(self, describe: Callable[[], str]) -> _S:
        session = self.peek()
        if session is None:
            raise NoCurrentSessionError(
                f"no current session for {describe()} in this task: run the code inside "
                "`async with db.scope():` or `db.atomic()` (`with` for the sync twin), or "
                "pass the session explicitly; one session per task"
            )
        return session

    def set(self, session: _S | Deferred[_S]) -> Token[_S | Deferred[_S] | None]:
        return self._var.set(session)

    def reset(self, token: Token[_S | Deferred[_S] | None]) -> None:
        self._var.reset(token)
