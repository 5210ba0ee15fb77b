"""Connection limits for the HTTP front end, which uvicorn does not enforce by itself.

uvicorn has no timeout for reading request headers or bodies, and its only connection limit
(`limit_concurrency`) answers 503 to *every* request, `/v2/health/live` included, once enough
connections are open, even connections that never sent a full request line. About 4,200
slowloris connections were enough to make an orchestrator restart the pod (issue 11).

`ConnectionGuard` wraps uvicorn's HTTP protocol class and tracks each connection in one of
three phases, read from the protocol's request cycle:

* waiting: no request in progress (a new connection, partial headers, or idle keep-alive). It
  must complete a request's headers within `header_timeout_s` of entering this phase.
* body: headers read, body still arriving. A body that makes no progress for `body_timeout_s`
  is answered 408 and the connection closed.
* busy: the whole request is in; the server owes the response. Never cut.

On top of that, one client address may hold at most `max_per_client` connections, and when
`max_open` connections are open a new one evicts the oldest waiting connection (or is refused
if every connection is busy), so a probe can always get in. On shutdown (`drain`) every
waiting connection is closed at once and uploads that stall are cut after a short grace, while
busy requests finish.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ember.serve")

SWEEP_INTERVAL_S = 0.25
DRAIN_BODY_GRACE_S = 1.0  # during shutdown, an upload idle this long is dropped
FD_RESERVE = 256  # file descriptors left for gRPC, engine files, logs


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = ('{"error": "%s"}' % message).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


_TOO_MANY_FROM_CLIENT = _raw_response(503, "Service Unavailable", "too many connections from this address; "
                                      "reuse keep-alive connections or raise --max-connections-per-client")
_FULL = _raw_response(503, "Service Unavailable", "the server has too many open connections; retry with backoff")
_BODY_TIMEOUT = _raw_response(408, "Request Timeout", "the request body stalled; send it without pauses")
_HEADER_TIMEOUT = _raw_response(408, "Request Timeout", "the request headers did not arrive in time")
_DRAINING = _raw_response(503, "Service Unavailable", "the server is shutting down; retry on another replica")


def open_connection_limit(max_requests: int) -> int:
    """Open HTTP connections allowed: twice the concurrent-request limit, kept below the process's
    file-descriptor limit (running out of descriptors stops accepting altogether)."""
    wanted = max(2 * max_requests, 256)
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - not POSIX
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


@dataclass
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_per_client: int = 512
    max_open: int = 4096


class ConnectionGuard:
    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self._conns: dict[Any, None] = {}  # insertion order = age, for eviction
        self._per_client: Counter = Counter()
        self._draining_since: float | None = None
        self._sweeper: asyncio.Task | None = None
        self.refused = 0
        self.timed_out = 0

    # ---- the protocol class uvicorn instantiates per connection -----------------------------------------

    def protocol_class(self, base: type | None = None) -> type:
        if base is None:
            from uvicorn.protocols.http.auto import AutoHTTPProtocol

            base = AutoHTTPProtocol
        guard = self

        class GuardedHTTPProtocol(base):  # type: ignore[misc, valid-type]
            def connection_made(self, transport: Any) -> None:
                now = time.monotonic()
                self.ember_waiting_since = self.ember_last_data = now
                self.ember_client = None
                super().connection_made(transport)
                guard._admit(self, transport)

            def connection_lost(self, exc: Exception | None) -> None:
                guard._release(self)
                super().connection_lost(exc)

            def data_received(self, data: bytes) -> None:
                self.ember_last_data = time.monotonic()
                super().data_received(data)

            def on_response_complete(self) -> None:
                self.ember_waiting_since = time.monotonic()
                super().on_response_complete()

        GuardedHTTPProtocol.__name__ = f"Guarded{base.__name__}"
        return GuardedHTTPProtocol

    # ---- bookkeeping ------------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def _admit(self, proto: Any, transport: Any) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="ember-http-guard")
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) and peer else None
        if client is not None and self._per_client[client] >= self.limits.max_per_client:
            return self._refuse(transport, _TOO_MANY_FROM_CLIENT)
        if self._draining_since is not None:
            return self._refuse(transport, _DRAINING)
        if len(self._conns) >= self.limits.max_open and not self._evict_oldest_waiting():
            return self._refuse(transport, _FULL)
        proto.ember_client = client
        self._conns[proto] = None
        if client is not None:
            self._per_client[client] += 1

    def _refuse(self, transport: Any, answer: bytes) -> None:
        self.refused += 1
        try:
            transport.write(answer)
        finally:
            transport.close()

    def _release(self, proto: Any) -> None:
        if proto in self._conns:
            del self._conns[proto]
            client = proto.ember_client
            if client is not None:
                self._per_client[client] -= 1
                if self._per_client[client] <= 0:
                    del self._per_client[client]

    def _evict_oldest_waiting(self) -> bool:
        for proto in self._conns:
            if phase(proto) == "waiting":
                self._close(proto, None)
                return True
        return False

    def _close(self, proto: Any, answer: bytes | None) -> None:
        self._release(proto)
        transport = proto.transport
        if transport is None or transport.is_closing():
            return
        if answer is not None:
            transport.write(answer)
        transport.close()

    # ---- timeouts ------------------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self.sweep()
            except Exception:  # the guard must never stop guarding
                log.exception("HTTP connection sweep failed")

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        lim = self.limits
        draining = self._draining_since is not None
        for proto in list(self._conns):
            p = phase(proto)
            if p == "waiting":
                if draining:
                    self._close(proto, None)
                elif now - proto.ember_waiting_since > lim.header_timeout_s:
                    self.timed_out += 1
                    # bytes of a request line arrived: say why; a silent connection is just closed
                    got_bytes = proto.ember_last_data > proto.ember_waiting_since
                    self._close(proto, _HEADER_TIMEOUT if got_bytes else None)
            elif p == "body":
                idle = now - proto.ember_last_data
                if draining and (idle > DRAIN_BODY_GRACE_S or now - self._draining_since > 2 * DRAIN_BODY_GRACE_S):
                    self._close(proto, _DRAINING)
                elif idle > lim.body_timeout_s:
                    self.timed_out += 1
                    self._close(proto, _BODY_TIMEOUT)

    def drain(self) -> None:
        """Shutdown: refuse new connections, close waiting ones now, cut stalled uploads soon."""
        if self._draining_since is None:
            self._draining_since = time.monotonic()
            self.sweep()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


def phase(proto: Any) -> str:
    """waiting | body | busy, read from uvicorn's per-connection request cycle."""
    cycle = getattr(proto, "cycle", None)
    if cycle is None or cycle.response_complete:
        return "waiting"
    if cycle.more_body:
        return "body"
    return "busy"
