"""sessionforge: an async-first session factory for SQLAlchemy 2.1, with a sync twin.

Importing sessionforge imports SQLAlchemy and nothing of FastAPI, Starlette or pytest.
"""

from __future__ import annotations

from . import errors as errors
from ._internal import sqla as _sqla  # noqa: F401 (registers event routing for factories)
from ._internal.core import FactoryStatus as FactoryStatus
from ._internal.engines import EngineStatus as EngineStatus
from ._internal.replicas import ReplicaStatus as ReplicaStatus
from .config import DEFAULT_URL as DEFAULT_URL
from .config import FactoryConfig as FactoryConfig
from .config import FactoryOptions as FactoryOptions
from .errors import AmbiguousCommitError as AmbiguousCommitError
from .errors import ConcurrentSessionUseError as ConcurrentSessionUseError
from .errors import ConfigurationError as ConfigurationError
from .errors import DatabaseUnavailableError as DatabaseUnavailableError
from .errors import LazyLoadError as LazyLoadError
from .errors import NestedTransactionError as NestedTransactionError
from .errors import NoCurrentSessionError as NoCurrentSessionError
from .errors import ReadOnlySessionError as ReadOnlySessionError
from .errors import RetryExhaustedError as RetryExhaustedError
from .errors import SessionClosedError as SessionClosedError
from .errors import SessionForgeError as SessionForgeError
from .errors import TransactionTimeoutError as TransactionTimeoutError
from .factory import AsyncBeginContext as AsyncBeginContext
from .factory import SessionFactory as SessionFactory
from .hooks import HookError as HookError
from .hooks import after_rollback as after_rollback
from .hooks import hook_errors as hook_errors
from .hooks import on_commit as on_commit
from .sync import SyncBeginContext as SyncBeginContext
from .sync import SyncSessionFactory as SyncSessionFactory

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_URL",
    "AmbiguousCommitError",
    "AsyncBeginContext",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "EngineStatus",
    "FactoryConfig",
    "FactoryOptions",
    "FactoryStatus",
    "HookError",
    "LazyLoadError",
    "NestedTransactionError",
    "NoCurrentSessionError",
    "ReadOnlySessionError",
    "ReplicaStatus",
    "RetryExhaustedError",
    "SessionClosedError",
    "SessionFactory",
    "SessionForgeError",
    "SyncBeginContext",
    "SyncSessionFactory",
    "TransactionTimeoutError",
    "after_rollback",
    "errors",
    "hook_errors",
    "on_commit",
]
