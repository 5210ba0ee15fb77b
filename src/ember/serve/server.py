"""The server process: HTTP (uvicorn), gRPC (grpc.aio) and an optional metrics port on one
event loop, the model repository, and graceful shutdown.

Startup binds every port first (a busy port is a clear error, not a stack trace), then loads
the models; /v2/health/ready turns true once every startup model is loaded and warmed up.
On SIGTERM or SIGINT the server turns unready, stops accepting, lets every accepted request
finish (up to --drain-timeout), unloads the models and returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from typing import Any

import uvicorn

from .core import InferenceService, ServerSettings
from .errors import ServeStartupError
from .grpc_server import build_grpc_server
from .http_app import build_http_app, build_metrics_app
from .http_guard import ConnectionGuard, ConnectionLimits, open_connection_limit

log = logging.getLogger("ember.serve")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the InferenceServer owns SIGTERM/SIGINT."""

    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


def _bind(host: str, port: int, what: str, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to host:port. ``reuse_port``: SO_REUSEPORT, so several front-end processes
    listen on one port (the kernel spreads connections over them); ``listen=False`` only reserves the
    port (and resolves port 0) for them: a socket that does not listen gets no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the proto says TCP,
    # and without it every response with a body stalls ~40 ms (Nagle against delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeStartupError(f"cannot bind the {what} port {host}:{port}: {e.strerror}; pick another with "
                                f"--{what}-port") from None
    if not listen:
        return sock
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class InferenceServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.service: InferenceService | None = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._stop = asyncio.Event()
        self._uvicorns: list[tuple[_Uvicorn, asyncio.Task]] = []
        self._guards: list[ConnectionGuard] = []
        self._grpc: Any = None
        self._poll_task: asyncio.Task | None = None
        self._stopped = False
        self._reserved: list[socket.socket] = []  # --frontends: the ports the front-end processes listen on
        self._supervisor: Any = None  # --frontends: frontends.FrontendSupervisor

    def _uvicorn(self, app: Any, sock: socket.socket) -> None:
        s = self.settings
        guard = ConnectionGuard(ConnectionLimits(s.header_timeout_s, s.body_timeout_s, s.max_connections_per_client,
                                                 open_connection_limit(s.max_connections)))
        # No limit_concurrency: uvicorn would answer 503 to every request, health probes included, once
        # enough (even half-open) connections exist. The guard bounds connections, the app bounds requests.
        config = uvicorn.Config(app, http=guard.protocol_class(), log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=int(s.drain_timeout_s) or None,
                                server_header=False)
        self._guards.append(guard)
        server = _Uvicorn(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        self._uvicorns.append((server, task))

    async def start(self) -> None:
        s = self.settings
        s.check_exposure()
        self.service = service = InferenceService(s)
        if s.frontends > 0:
            # the ports belong to the front-end processes; this one reserves them (and resolves port 0)
            if s.http_port is not None:
                self._reserved.append(_bind(s.host, s.http_port, "http", reuse_port=True, listen=False))
                self.http_port = self._reserved[-1].getsockname()[1]
            if s.grpc_port is not None:
                self._reserved.append(_bind(s.host, s.grpc_port, "grpc", reuse_port=True, listen=False))
                self.grpc_port = self._reserved[-1].getsockname()[1]
            await self._open_ports(service, http=False, grpc=False)
        else:
            await self._open_ports(service)
        log.info("ember serve: http %s, grpc %s, metrics %s, repository %s", self.http_port, self.grpc_port,
                 self.metrics_port or self.http_port, s.repository)
        # every mode loads all models at startup unless --load-model names some (Triton's explicit mode
        # loads none by default; ember users asked for one rule)
        failed = await service.repository.load_all(s.load_models)
        if failed and s.strict:
            await self.shutdown()
            lines = "\n".join(f"  - {n}: {msg}" for n, msg in failed.items())
            raise ServeStartupError(f"{len(failed)} model(s) failed to load:\n{lines}\n"
                                    "Fix them, or start with --no-strict to serve the others.")
        if s.frontends > 0:
            from .frontends import FrontendSupervisor

            self._supervisor = FrontendSupervisor(service, self.http_port, self.grpc_port)
            try:
                await self._supervisor.start()
            except BaseException:
                await self.shutdown()
                raise
        service.started = True
        if s.model_control_mode == "poll":
            self._poll_task = asyncio.get_running_loop().create_task(service.poll_forever())
        log.info("ember serve is ready")

    async def _open_ports(self, service: Any, http: bool = True, grpc: bool = True, metrics: bool = True,
                          reuse_port: bool = False) -> None:
        """Bind and start the HTTP, metrics and gRPC front ends of ``service`` (those the settings ask for)."""
        s = self.settings
        socks = []
        if http and s.http_port is not None:
            socks.append(("http", _bind(s.host, s.http_port, "http", reuse_port)))
        if metrics and s.metrics_port is not None:
            socks.append(("metrics", _bind(s.host, s.metrics_port, "metrics")))
        if grpc and s.grpc_port is not None:
            self._grpc = build_grpc_server(service, reuse_port=reuse_port)
            addr = f"[{s.host}]:{s.grpc_port}" if ":" in s.host else f"{s.host}:{s.grpc_port}"
            try:
                port = self._grpc.add_insecure_port(addr)
            except RuntimeError as e:
                port = 0
                log.debug("gRPC bind failed: %s", e)
            if port == 0:
                for _, sock in socks:
                    sock.close()
                raise ServeStartupError(f"cannot bind the grpc port {addr}; pick another with --grpc-port")
            self.grpc_port = port
            await self._grpc.start()
        for what, sock in socks:
            port = sock.getsockname()[1]
            if what == "http":
                self.http_port = port
                self._uvicorn(build_http_app(service, metrics_here=s.metrics_port is None), sock)
            else:
                self.metrics_port = port
                self._uvicorn(build_metrics_app(service), sock)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Turn unready, stop accepting, finish accepted requests, unload the models."""
        service = self.service
        if service is None or self._stopped:
            return
        self._stopped = True
        service.shutting_down = True
        if self._poll_task is not None:
            self._poll_task.cancel()
        grace = self.settings.drain_timeout_s
        if self._supervisor is not None:  # the front-end processes finish their requests first
            await self._supervisor.stop(grace)
        await self._close_ports(grace)
        try:
            await asyncio.wait_for(service.repository.close(), grace)
        except asyncio.TimeoutError:
            log.error("models did not drain within %.0f s; exiting anyway", grace)
        self._uvicorns.clear()
        for guard in self._guards:
            guard.close()
        self._guards.clear()
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        log.info("ember serve stopped")

    async def _close_ports(self, grace: float) -> None:
        """Stop accepting; let the requests being answered finish (up to ``grace`` seconds)."""
        stops = []
        if self._grpc is not None:
            stops.append(self._grpc.stop(grace))
        for guard in self._guards:  # idle and stalled connections go now; requests being answered finish
            guard.drain()
        for server, task in self._uvicorns:
            server.should_exit = True
            stops.append(task)
        results = await asyncio.gather(*stops, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("front end stopped with %s: %s", type(r).__name__, r)

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or request_stop), then drain and return."""
        loop = asyncio.get_running_loop()
        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        stop = loop.create_task(self._stop.wait())
        try:
            # a signal during startup (models still loading) stops the loading instead of waiting it out
            start = loop.create_task(self.start())
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
            if start.done():
                start.result()  # startup errors propagate
                await stop
            else:
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                log.info("stopped during startup")
        finally:
            stop.cancel()
            await self.shutdown()
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: exiting now without draining", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received: draining in-flight requests", signal.Signals(sig).name)
        self._stop.set()


class ServerThread:
    """Run an InferenceServer on a background thread (notebooks, tests, embedding).

        with ServerThread(ServerSettings(repo, http_port=0, grpc_port=0)) as srv:
            url = f"127.0.0.1:{srv.http_port}"
    """

    def __init__(self, settings: ServerSettings, startup_timeout_s: float = 120.0):
        self.settings = settings
        self.startup_timeout_s = startup_timeout_s
        self.server: InferenceServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def http_port(self) -> int | None:
        return self.server.http_port if self.server else None

    @property
    def grpc_port(self) -> int | None:
        return self.server.grpc_port if self.server else None

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port if self.server else None

    @property
    def service(self) -> InferenceService:
        assert self.server is not None and self.server.service is not None
        return self.server.service

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the server's loop from another thread and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> "ServerThread":
        self._thread = threading.Thread(target=self._main, name="ember-serve", daemon=True)
        self._thread.start()
        if not self._started.wait(self.startup_timeout_s):
            raise ServeStartupError(f"the server did not start within {self.startup_timeout_s:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self.server = InferenceServer(self.settings)
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
                await self.server.shutdown()
                self._started.set()
                return
            self._started.set()
            try:
                await self.server.wait()
            finally:
                await self.server.shutdown()

        asyncio.run(main())

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self.server is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.request_stop)
            self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
