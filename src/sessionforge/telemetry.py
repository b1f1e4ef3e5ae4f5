"""OpenTelemetry metrics and spans for a factory (the ``otel`` extra).

``instrument(db)`` reports the factory's connection pools with the database-client
metric names of OpenTelemetry's semantic conventions (``db.client.connection.count``,
``.max``, ``.pending_requests``, ``.timeouts``, ``.wait_time``, ``.use_time``, by
``db.client.connection.pool.name``), its counters (``sessionforge.commits``,
``.rollbacks``, ``.retries``, ``.replica_reads``, ``.primary_fallbacks``), and wraps
each transaction attempt of ``begin()``, ``run_transaction``, ``transactional`` and
an outermost ``atomic()`` in a ``sessionforge.transaction`` span, under which the
statement spans of OpenTelemetry's SQLAlchemy instrumentation nest. A factory that is
not instrumented records nothing. Guide: ``docs/telemetry.md``.

Example::

    from sessionforge.telemetry import instrument

    db = SessionFactory("postgresql://app@db/app")
    instrument(db)  # the global providers; or meter_provider=..., tracer_provider=...
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics as _metrics  # noqa: F401 (checks the extra)
except ImportError as error:  # pragma: no cover - the extra is installed in tests
    raise ImportError(
        "sessionforge.telemetry needs the OpenTelemetry API: pip install 'sessionforge[otel]'"
    ) from error

from ._internal.telemetry import Telemetry
from ._internal.twin import TwinBase, core_of
from .errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from .factory import SessionFactory
    from .sync import SyncSessionFactory

__all__ = ["instrument"]

_LOCK = threading.Lock()


def instrument(
    db: SessionFactory[Any] | SyncSessionFactory[Any],
    meter_provider: MeterProvider | None = None,
    tracer_provider: TracerProvider | None = None,
) -> None:
    """Report ``db``'s pools, counters and transactions to OpenTelemetry.

    Covers both twins (``db`` and ``db.sync`` are instrumented together) and the
    replicas. ``None`` providers mean the global ones (``metrics.set_meter_provider``,
    ``trace.set_tracer_provider``). Instrumenting a factory a second time, through
    either twin, changes nothing: the first call's providers stay.
    """
    if not isinstance(db, TwinBase):
        raise ConfigurationError(
            f"instrument() takes a SessionFactory or a SyncSessionFactory, got {type(db).__name__}"
        )
    core = core_of(db)
    with _LOCK:
        if core.stats.telemetry is None:
            Telemetry(core, meter_provider, tracer_provider).install()
