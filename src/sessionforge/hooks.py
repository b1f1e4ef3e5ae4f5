"""On-commit and after-rollback hooks, with Django's ``transaction.on_commit`` semantics.

A hook belongs to the innermost transaction in progress when it is registered (or, with
none in progress, to the next one the session begins). When a SAVEPOINT is released its
hooks move to the enclosing transaction; when it rolls back, its on-commit hooks are
dropped and its after-rollback hooks run. When the outermost transaction commits, its
on-commit hooks run in registration order, right after COMMIT and before ``commit()``
returns; async hooks are awaited there (in the session's greenlet). A hook that raises
does not undo anything: the error is logged on the ``sessionforge.hooks`` logger,
recorded in ``hook_errors(session)``, and the remaining hooks run.

At the end of ``begin()`` (and of a request) the COMMIT, and so the hooks, run in a task
of its own that a cancellation does not interrupt (``cancellation.end_and_close``): a
hook that hangs delays the caller's cancellation, and a hook's ``ContextVar`` changes
stay in that task's copy of the context.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession, async_session
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import await_

from ._internal.sqla import in_greenlet
from .errors import ConfigurationError

__all__ = ["HookError", "after_rollback", "hook_errors", "install", "on_commit"]

logger = logging.getLogger("sessionforge.hooks")

Hook = Callable[[], Any]
Kind = Literal["on_commit", "after_rollback"]


#: Key in the ``info`` of a connection whose sessions' on-commit hooks are handed to the
#: callable stored there instead of running (``sessionforge.testing.isolated`` sets it:
#: there the outermost COMMIT of a session is only a SAVEPOINT release).
CAPTURE_KEY: Final = "sessionforge_capture_hooks"


@dataclass(frozen=True, slots=True)
class HookError:
    """The record of a hook that raised: which one, on what event, and the exception.

    Not an exception, and never raised: a hook's failure leaves the transaction's
    outcome standing, so it is recorded (and logged) instead, and read back with
    ``hook_errors(session)``. The exceptions sessionforge raises are in ``errors``.
    Example::

        async with db.begin() as session:
            sessionforge.on_commit(session, send_welcome_mail)
        for failed in sessionforge.hook_errors(session):
            print(failed.kind, failed.hook, failed.error)
    """

    hook: Hook
    kind: Kind
    error: Exception


@dataclass(slots=True)
class _Registered:
    kind: Kind
    fn: Hook


@dataclass(slots=True)
class _State:
    pending: list[_Registered] = field(default_factory=list)
    by_transaction: dict[SessionTransaction, list[_Registered]] = field(default_factory=dict)
    errors: list[HookError] = field(default_factory=list)
    # The transaction whose hooks are running, and the batch being run. It has ended:
    # a hook of the same kind registered by one of them joins the running batch
    # ("after this commit" has come), a hook of the other kind waits for the next
    # transaction.
    ending: SessionTransaction | None = None
    running: list[_Registered] | None = None


def on_commit(session: Session | AsyncSession, fn: Hook) -> None:
    """Run ``fn()`` after the outermost transaction of ``session`` commits.

    Example::

        async with db.begin() as session:
            session.add(order)
            sessionforge.on_commit(session, lambda: queue.put_nowait(order.id))
    """
    _register(session, "on_commit", fn)


def after_rollback(session: Session | AsyncSession, fn: Hook) -> None:
    """Run ``fn()`` when the transaction it was registered in rolls back or is discarded."""
    _register(session, "after_rollback", fn)


def hook_errors(session: Session | AsyncSession) -> list[HookError]:
    """The hooks of ``session`` that raised so far, oldest first."""
    state = _hooks_of(_sync_session(session))
    return list(state.errors) if state is not None else []


def _hooks_of(session: Session) -> _State | None:
    """The hooks of a sessionforge session (in its ``SessionState``), if any yet."""
    state = getattr(session, "_sessionforge_state", None)  # None: not a factory's session
    return None if state is None else state.hooks


def _sync_session(session: Session | AsyncSession) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _register(session: Session | AsyncSession, kind: Kind, fn: Hook) -> None:
    sync = _sync_session(session)
    if not _is_ours(type(sync)):
        raise ConfigurationError(
            f"{kind}() needs a session made by a sessionforge factory; "
            f"{type(session).__name__} was made elsewhere"
        )
    if not callable(fn):
        raise ConfigurationError(f"{kind}() takes a callable, got {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn) and async_session(sync) is None:
        raise ConfigurationError(
            f"{kind}() got the async function {getattr(fn, '__qualname__', fn)!r} on a sync "
            "session, which cannot await it; register a sync function, or use the async factory"
        )
    state = _hooks_of(sync)
    if state is None:
        state = sync._sessionforge_state.hooks = _State()  # type: ignore[attr-defined]
    transaction = sync.get_nested_transaction() or sync.get_transaction()
    if transaction is not None and transaction is state.ending:
        running = state.running
        if running and running[0].kind == kind:
            running.append(_Registered(kind, fn))
        else:
            state.pending.append(_Registered(kind, fn))
    elif transaction is None:
        state.pending.append(_Registered(kind, fn))
    else:
        state.by_transaction.setdefault(transaction, []).append(_Registered(kind, fn))


_INSTALLED: Final = "_sessionforge_hooks_installed"


def install(session_class: type[Session]) -> None:
    """Listen for the transaction events that drive hooks on ``session_class``."""
    event.listen(session_class, "after_transaction_create", _after_transaction_create)
    event.listen(session_class, "after_commit", _after_commit)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)
    setattr(session_class, _INSTALLED, True)


def _is_ours(session_class: type) -> bool:
    return bool(getattr(session_class, _INSTALLED, False))


def _after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    state: _State | None = session._sessionforge_state.hooks  # type: ignore[attr-defined]
    if state is None or not state.pending or transaction.parent is not None:
        return
    state.by_transaction[transaction] = state.pending
    state.pending = []


def _after_commit(session: Session) -> None:
    # Fires for the outermost COMMIT and for each SAVEPOINT release, while the
    # committing transaction is still the session's innermost one.
    state: _State | None = session._sessionforge_state.hooks  # type: ignore[attr-defined]
    if state is None or not state.by_transaction:
        return
    transaction = session.get_nested_transaction() or session.get_transaction()
    hooks = state.by_transaction.pop(transaction, None) if transaction is not None else None
    if not hooks or transaction is None:
        return
    if transaction.nested:
        enclosing = _enclosing(transaction)
        state.by_transaction.setdefault(enclosing, []).extend(hooks)
    else:
        committed = [hook for hook in hooks if hook.kind == "on_commit"]
        bind = session.bind
        capture = bind.info.get(CAPTURE_KEY) if isinstance(bind, Connection) else None
        if capture is not None:
            capture([hook.fn for hook in committed])
        else:
            _run(session, state, transaction, committed)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    state: _State | None = session._sessionforge_state.hooks  # type: ignore[attr-defined]
    if state is None or not state.by_transaction:
        return
    hooks = state.by_transaction.pop(transaction, None)
    if hooks:  # not taken by _after_commit: this transaction did not commit
        _run(
            session, state, transaction, [hook for hook in hooks if hook.kind == "after_rollback"]
        )


def _enclosing(transaction: SessionTransaction) -> SessionTransaction:
    parent = transaction.parent
    assert parent is not None
    while not parent.nested and parent.parent is not None:
        parent = parent.parent  # skip flush-time subtransactions
    return parent


def discard_pending(session: Session) -> None:
    """Forget hooks waiting for a transaction: the session was closed before one began."""
    state: _State | None = session._sessionforge_state.hooks  # type: ignore[attr-defined]
    if state is not None:
        state.pending.clear()


def _run(
    session: Session, state: _State, transaction: SessionTransaction, hooks: list[_Registered]
) -> None:
    if not hooks:
        return
    saved = state.ending, state.running
    state.ending, state.running = transaction, hooks
    try:
        _run_each(session, state, hooks)
    finally:
        state.ending, state.running = saved


def _run_each(session: Session, state: _State, hooks: list[_Registered]) -> None:
    index = 0
    while index < len(hooks):  # a running hook may append to the batch
        hook = hooks[index]
        index += 1
        try:
            result = hook.fn()
            if inspect.isawaitable(result):
                if in_greenlet() and async_session(session) is not None:
                    await_(result)
                else:
                    if inspect.iscoroutine(result):
                        result.close()
                    raise TypeError(
                        f"{hook.kind} hook returned an awaitable outside the async factory"
                    )
        except Exception as error:
            logger.error(
                "%s hook %r raised; the transaction's outcome stands and the remaining hooks run",
                hook.kind,
                hook.fn,
                exc_info=error,
            )
            state.errors.append(HookError(hook.fn, hook.kind, error))
