"""A TCP proxy in front of a real server that breaks connections on demand.

``FaultProxy(upstream_port)`` listens on a free loopback port and forwards bytes both
ways, on an asyncio loop in a thread of its own, so async and sync clients (and a
test's event loop) can use it alike. Faults, each applied from the test's thread:

- ``drop_all()``: abort every open connection (both sides): a reset, as a crashed
  server or a broken network shows it;
- ``refuse()`` / ``accept()``: stop listening (new connections are refused, as by a
  stopped server: ``ECONNREFUSED``), and listen again on the same port;
- ``hold()`` / ``release()``: new connections are accepted and then left silent — the
  TCP handshake completes, nothing is forwarded, nothing answers (a hung server);
- ``cut_after(marker)``: once, forward the client's message that contains ``marker``
  (``b"COMMIT"``) to the server, then abort the client's side at once, before any
  answer: the server runs it, the client never hears back.

``connections`` counts the connections accepted so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["FaultProxy", "fault_proxy"]

_T = TypeVar("_T")
_CHUNK = 65536
#: Seconds the server side of a cut connection stays open, so the server reads and runs
#: the forwarded message before it sees the connection end.
_CUT_DRAIN = 1.0


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._holding = False
        self._cut_marker: bytes | None = None
        self._cut_done = threading.Event()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self.accept()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # faults --------------------------------------------------------------------------

    def accept(self) -> None:
        """Listen (again) on ``port``."""
        self._call(self._listen())

    def refuse(self) -> None:
        """Stop listening: new connections are refused; open ones keep working."""
        self._call(self._stop_listening())

    def hold(self) -> None:
        """Accept new connections but never forward or answer anything on them."""
        self._holding = True

    def release(self) -> None:
        """Forward new connections again (held ones stay silent until dropped)."""
        self._holding = False

    def drop_all(self) -> None:
        """Abort every open connection, on both sides."""
        self._call(self._drop_all())

    def cut_after(self, marker: bytes) -> threading.Event:
        """Once: forward the client message containing ``marker``, then cut the client.

        Returns an event set once the cut happened.
        """
        self._cut_done.clear()
        self._cut_marker = marker
        return self._cut_done

    def close(self) -> None:
        """Drop everything and stop the proxy's thread."""
        if not self._thread.is_alive():
            return
        self._call(self._stop_listening())
        self._call(self._drop_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # the loop's side -----------------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._serve, "127.0.0.1", self.port, reuse_address=True
            )

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _drop_all(self) -> None:
        for client, upstream in list(self._pairs):
            _abort(client)
            if upstream is not None:
                _abort(upstream)
        self._pairs.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._holding:
            pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
            self._pairs.add(pair)
            return  # nothing is read, nothing answers; drop_all() or close() ends it
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._client_to_server(reader, writer, up_writer),
                _pump(up_reader, writer),
            )
        finally:
            self._pairs.discard(pair)
            _abort(writer)
            _abort(up_writer)

    async def _client_to_server(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        while data := await _read(reader):
            upstream.write(data)
            await upstream.drain()
            marker = self._cut_marker
            if marker is not None and marker in data:
                self._cut_marker = None
                _abort(client)
                self._cut_done.set()
                await asyncio.sleep(_CUT_DRAIN)
                _abort(upstream)
                return
        with contextlib.suppress(OSError):
            upstream.write_eof()


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(_CHUNK)
    except OSError:
        return b""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await _read(reader):
        if writer.is_closing():
            return
        writer.write(data)
        try:
            await writer.drain()
        except OSError:
            return
    with contextlib.suppress(OSError):
        writer.write_eof()


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


@contextlib.contextmanager
def fault_proxy(upstream_port: int) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` to ``127.0.0.1:upstream_port`` for the block."""
    with FaultProxy(upstream_port) as proxy:
        yield proxy
