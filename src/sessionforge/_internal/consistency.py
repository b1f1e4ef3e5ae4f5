"""Where a context keeps the position its reads must see, and the consistency token.

After a transaction that wrote commits on the primary, the context that ran it holds a
``Consistency``: the cluster's system identifier and the primary's WAL position after
that COMMIT (``routing.py`` takes it). ``ContextConsistency`` (the base of
``replicas.Replicas``) keeps it per context in a ``contextvars.ContextVar`` holding a
mutable ``Holder``: it follows the task, is shared with the threads the task hands work
to, and is copied, not shared, into tasks it starts (``Holder``). The token
(``Consistency.token()``) is ``sf1-<system>-<position>`` in hex: ``sf1`` is the format's
version; a token of another cluster, or one that does not parse, is ignored (and
logged).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Consistency", "ContextConsistency", "Holder"]

logger = logging.getLogger("sessionforge.replicas")

_TOKEN: Final = re.compile(r"^sf1-([0-9a-f]{1,16})-([0-9a-f]{1,16})$")


@dataclass(frozen=True, slots=True)
class Consistency:
    """The position a context's reads must see: its last commit on the primary."""

    system: int  # 0: not known
    position: int

    def token(self) -> str:
        return f"sf1-{self.system:x}-{self.position:x}"

    @classmethod
    def parse(cls, token: str) -> Consistency | None:
        match = _TOKEN.match(token) if isinstance(token, str) else None
        if match is None:
            return None
        return cls(int(match.group(1), 16), int(match.group(2), 16))

    def newer(self, other: Consistency | None) -> Consistency:
        """The later of two positions of one cluster (``self`` for another cluster)."""
        if other is None or other.system != self.system or other.position < self.position:
            return self
        return other


class Holder:
    """A context's consistency, mutable so that copies of the context share it.

    ``owner`` is the asyncio task that made it (``None`` outside any task). A commit in
    the owner, or in a thread running a copy of its context (``asyncio.to_thread``, a
    threadpool endpoint), updates it in place, so the owner sees it; a commit in
    another task (one the owner started: it inherited the holder) gives that task a
    holder of its own — contextvars semantics, and no sharing between sibling tasks.
    """

    __slots__ = ("owner", "value")

    def __init__(self, value: Consistency | None, owner: asyncio.Task[Any] | None) -> None:
        self.value = value
        self.owner = owner


def _task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return None


class ContextConsistency:
    """The running context's consistency, for one factory (see the module docstring)."""

    def __init__(self, *, read_your_writes: bool) -> None:
        self.read_your_writes = read_your_writes
        #: The cluster's system identifier, once a primary or replica told it.
        self.system: int | None = None
        #: The newest commit position seen on the primary (``replicas``: ``lag_bytes``).
        self.newest = 0
        self._foreign: set[int] = set()
        self._current: ContextVar[Holder | None] = ContextVar(
            "sessionforge_consistency", default=None
        )

    def value(self) -> Consistency | None:
        """The running context's consistency (``None``: it needs none)."""
        holder = self._current.get()
        return None if holder is None else holder.value

    def token(self) -> str | None:
        value = self.value()
        return None if value is None else value.token()

    def apply(self, value: Consistency) -> None:
        """Make the running context's reads see at least ``value`` (see ``Holder``)."""
        holder, task = self._current.get(), _task()
        if holder is not None and (task is None or holder.owner is task):
            holder.value = value.newer(holder.value)
        else:
            self._current.set(Holder(value.newer(self.value()), task))

    def hold(self) -> None:
        """Give the running task a holder now, before it hands work to a thread."""
        holder, task = self._current.get(), _task()
        if holder is None or (task is not None and holder.owner is not task):
            self._current.set(Holder(None if holder is None else holder.value, task))

    def enter(self, value: Consistency | None) -> Token[Holder | None]:
        """Give the running context a holder of its own (a request's, a block's)."""
        return self._current.set(Holder(value, _task()))

    def leave(self, token: Token[Holder | None]) -> Consistency | None:
        """Undo ``enter``; return what the holder ended with."""
        holder = self._current.get()
        self._current.reset(token)
        return None if holder is None else holder.value

    def usable(self, given: Consistency, source: str) -> bool:
        """Whether ``given`` (from a token) may be applied: it parsed, and it is this
        cluster's as far as known. A token of another cluster is logged and ignored."""
        if given.system and self.system is not None and given.system != self.system:
            self._log_foreign(given.system, source)
            return False
        return True

    def committed(self, position: int, system: int | None) -> Consistency:
        if system is not None and self.system is None:
            self.system = system
        self.newest = max(self.newest, position)
        return Consistency(self.system or 0, position)

    @contextmanager
    def consistent_with(self, token: str | None) -> Iterator[None]:
        """Apply ``token`` for the block; commits made in it are kept after it."""
        given = None if token is None else Consistency.parse(token)
        if token is not None and given is None:
            logger.warning(
                "ignored a consistency token that is not one of sessionforge's: %.40r", token
            )
        if given is None or not self.usable(given, "consistent_with()"):
            yield
            return
        before = self.value()
        entered = self.enter(given.newer(before))
        try:
            yield
        finally:
            inside = self.leave(entered)
            if inside is not None and inside != given.newer(before):
                self.apply(inside)  # the block committed: keep its position

    def _log_foreign(self, system: int, source: str) -> None:
        if system not in self._foreign:
            self._foreign.add(system)
            logger.warning(
                "ignored a consistency token of another cluster from %s (system %d, this is %d)",
                source,
                system,
                self.system,
            )

    def needed(self) -> int | None:
        if not self.read_your_writes:
            return None
        value = self.value()
        if value is None:
            return None
        if value.system and self.system is not None and value.system != self.system:
            self._log_foreign(value.system, "this context")
            return None
        return value.position
