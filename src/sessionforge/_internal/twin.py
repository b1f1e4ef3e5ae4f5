"""What the twins share: everything ``SessionFactory`` and ``SyncSessionFactory`` do
without I/O.

httpx's ``BaseClient`` pattern: the shared base holds configuration and pure logic
over the one ``FactoryCore`` both twins of a pair hold; each twin adds only what
awaits (``factory.py``) or blocks (``sync.py``), under the same method names.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar

from sessionforge.errors import ConfigurationError

from .transactions import RetryPolicy, RetryPredicate, TransactionOptions

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sessionforge.config import FactoryConfig

    from .core import FactoryCore
    from .stats import FactoryStatus
    from .targets import Twin

__all__ = ["TwinBase", "core_of"]


class TwinBase:
    """The shared base of the twins (not public: use either twin)."""

    __slots__ = ()
    _core: FactoryCore[Any]
    #: Which twin a subclass is: picks the session kind, engine and ``status()`` figures.
    _twin: ClassVar[Twin]

    def configure(self, **options: Any) -> None:
        """Change session options for later sessions of this factory and its twin.

        As ``sessionmaker.configure()``: ``bind=`` (a URL, or an engine or connection
        of this twin's kind) binds a factory made without one, before it first builds
        an engine; ``binds={...}`` replaces the factory's binds.
        """
        self._core.configure(options, self._twin)

    def status(self) -> FactoryStatus:
        """Pool figures and counters; ``checked_out`` is this twin's engine's."""
        return self._core.status(role=self._twin)

    # read replicas (DESIGN.md §9) ---------------------------------------------------

    def consistency_token(self) -> str | None:
        """The position of this context's last commit on the primary, as a string.

        ``None`` when this context (task, or thread for the sync twin) has committed
        no write here, or the factory has no ``replicas``. Hand it to another process
        (a header, a job's payload) and apply it there with ``consistent_with``.
        """
        replicas = self._core.replicas
        return None if replicas is None else replicas.token()

    def consistent_with(self, token: str | None) -> AbstractContextManager[None]:
        """``with db.consistent_with(token):`` reads in the block see that commit.

        Reads routed to replicas in the block wait for (or skip) replicas that have not
        replayed the commit ``token`` names. ``None`` does nothing; a token that does not
        parse, or names another cluster, is ignored and logged. Commits made inside the
        block stay in effect after it. Without ``replicas`` it does nothing.
        """
        if token is not None and not isinstance(token, str):
            raise ConfigurationError(
                "consistent_with() takes a token from consistency_token() (a str) or None, "
                f"got {type(token).__name__}"
            )
        replicas = self._core.replicas
        return nullcontext() if replicas is None else replicas.consistent_with(token)

    @property
    def config(self) -> FactoryConfig:
        """The current configuration (``configure()`` on either twin replaces it)."""
        return self._core.config

    @property
    def _sessionforge_event_target(self) -> type[Session]:
        # Lets event.listen(db, ...) reach this factory's sessions (see _internal/sqla.py).
        return self._core.sync_class

    # validation shared by begin(), run_transaction() and transactional() -------------

    def _begin_options(
        self,
        isolation_level: str | None,
        readonly: bool,
        timeout: float | None,
        settings: Mapping[str, Any] | None,
        overrides: Mapping[str, Any],
    ) -> TransactionOptions | None:
        """Validate a ``begin()``'s options and session arguments, before any I/O."""
        options = self._core.transaction_options(isolation_level, readonly, timeout, settings)
        if overrides:
            self._core.session_kwargs(overrides, self._twin)  # bad arguments fail here
        return options

    def _retry_options(
        self,
        retries: int,
        backoff: float,
        retry_if: RetryPredicate | None,
        isolation_level: str | None,
        readonly: bool,
        timeout: float | None,
        settings: Mapping[str, Any] | None,
    ) -> tuple[RetryPolicy, TransactionOptions | None]:
        """Validate ``run_transaction()``'s / ``transactional()``'s options."""
        policy = RetryPolicy.build(retries, backoff, retry_if)
        return policy, self._core.transaction_options(isolation_level, readonly, timeout, settings)


def core_of(factory: TwinBase) -> FactoryCore[Any]:
    """The core of a ``SessionFactory`` or ``SyncSessionFactory``, for sessionforge's own
    modules (``asgi``, ``testing``, ``binds``); users never need it."""
    return factory._core
