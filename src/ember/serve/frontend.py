"""A front-end process of `ember serve --frontends N`: the same HTTP app and gRPC server as one
process, on the same ports (SO_REUSEPORT), calling a ProxyService that hands requests to the engine
process (frontends.py) through ipc.py instead of running models itself.

ProxyService has InferenceService's interface, so http_app, http_infer and grpc_server do not know
which one they call: ``infer`` sends the request with its tensors in this process's request arena
and awaits the reply; the outputs are numpy views of the response arena, freed (a message to the
engine) when the response has been encoded and the last view is gone. Everything else is a call
answered by the engine process: asynchronous ones (load, unload) on the request channel, the ones
the apps make synchronously (health, metadata, statistics, /metrics) on a second, blocking channel.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import signal
import socket
import sys
import threading
import weakref
from typing import Any

import numpy as np

from . import model_config_pb2 as mc
from .core import InferenceService, ServerSettings
from .errors import ModelNotFoundError, ShuttingDownError
from .ipc import (Channel, RingArena, dtype_token, error_from, frame, packed_size, read_frame, view_tensor,
                  write_tensors)
from .protocol import InferRequest, InferResponse, OutputTensor
from .server import InferenceServer

log = logging.getLogger("ember.serve")


class _RemoteMetrics:
    """``service.metrics`` of a front end: /metrics shows the engine process's registry."""

    def __init__(self, proxy: "ProxyService"):
        self._proxy = proxy

    def exposition(self) -> bytes:
        return self._proxy.call("exposition")


class _NoLocalRepository:
    """``service.repository`` of a front end: the OpenAI routes read it directly, and the models live in
    the engine process; they are served only without --frontends."""

    def get(self, name: str, version: str | None = None) -> Any:
        raise ModelNotFoundError(f"model '{name}': the OpenAI endpoints (/v1) are served only without --frontends; "
                                 "restart ember serve without it to use them")

    def served(self) -> list:
        return []


class ProxyService(InferenceService):
    """InferenceService's interface, answered by the engine process."""

    def __init__(self, settings: ServerSettings, req_mm: mmap.mmap, resp_mm: mmap.mmap, sync: socket.socket):
        # not InferenceService.__init__: no repository or models here
        self.settings = settings
        self.metrics = _RemoteMetrics(self)  # type: ignore[assignment]
        self.repository = _NoLocalRepository()  # type: ignore[assignment]
        self.started = True
        self.shutting_down = False
        self._token = settings.auth_token.encode() if settings.auth_token else None
        self._req_mm = req_mm
        self._resp_mm = resp_mm
        self._req_arena = RingArena(len(req_mm))
        self._pending: dict[int, tuple[asyncio.Future, int | None]] = {}
        self._ids = itertools.count(1)
        self._sync = sync
        self._sync_lock = threading.Lock()
        self._server_metadata: dict | None = None
        self.chan: Channel | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.inline = 0

    def attach(self, chan: Channel) -> None:
        self.chan = chan
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    # ---- calls ------------------------------------------------------------------------------------------------

    def call(self, method: str, *args: Any) -> Any:
        """A call answered by the engine process, waited for here (the apps call these synchronously)."""
        with self._sync_lock:
            try:
                self._sync.sendall(frame([("c", next(self._ids), method, args)]))
                msg = read_frame(self._sync)[0]
            except (OSError, EOFError) as e:
                raise ShuttingDownError(f"the engine process is not answering ({e}); the server is stopping") from None
        if msg[0] == "x":
            raise error_from(msg)
        return msg[2]

    async def call_async(self, method: str, *args: Any) -> Any:
        msg = await self._send_and_wait(("c", None, method, args), None)
        if msg[0] == "x":
            raise error_from(msg)
        return msg[2]

    def live(self) -> bool:
        try:
            return bool(self.call("live"))
        except ShuttingDownError:
            return False

    def ready(self) -> bool:
        try:
            return bool(self.call("ready"))
        except ShuttingDownError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        if self._server_metadata is None:
            self._server_metadata = self.call("server_metadata")
        return self._server_metadata

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        return self.call("model_metadata", name, version)

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            return bool(self.call("model_ready", name, version))
        except ShuttingDownError:
            return False

    def model_config(self, name: str, version: str | None) -> mc.ModelConfig:
        return mc.ModelConfig.FromString(self.call("model_config", name, version))

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        return self.call("statistics", name, version)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.call("repository_index", ready_only)

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self.call_async("load_model", name, parameters)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self.call_async("unload_model", name, parameters)

    def count_error(self, protocol: str, reason: str) -> None:
        if self.chan is not None:
            self.chan.send(("e", protocol, reason))

    async def poll_forever(self) -> None:  # the engine process polls
        return None

    # ---- inference ----------------------------------------------------------------------------------------------

    async def infer(self, req: InferRequest, protocol: str) -> InferResponse:
        arrays = list(req.inputs.values())
        size = packed_size(arrays)
        block = self._req_arena.alloc(size) if size else None
        offsets = write_tensors(self._req_mm, block, arrays) if block is not None else [-1] * len(arrays)
        ins = []
        for (name, a), off in zip(req.inputs.items(), offsets):
            where: Any = off if off >= 0 else (a if a.dtype == object else np.ascontiguousarray(a))
            ins.append((name, req.datatypes.get(name, ""), dtype_token(a.dtype), a.shape, where))
        if size and block is None:
            self.inline += 1
            if self.chan is not None:
                self.chan.send(("n", 1))
        outs = None if req.outputs is None else [(o.name, o.binary, o.class_count) for o in req.outputs]
        msg = await self._send_and_wait(("i", None, protocol, req.model, req.version, req.id, req.priority,
                                         req.timeout_us, req.parameters or None, outs, block, ins), block)
        if msg[0] == "x":
            raise error_from(msg)
        return self._response(msg)

    async def _send_and_wait(self, msg: tuple, block: int | None) -> tuple:
        chan = self.chan
        if chan is None or chan.closed:
            if block is not None:
                self._req_arena.free(block)
            raise ShuttingDownError("the engine process is gone; the server is stopping")
        rid = next(self._ids)
        fut = self.loop.create_future()  # type: ignore[union-attr]
        self._pending[rid] = (fut, block)
        chan.send((msg[0], rid, *msg[2:]))
        try:
            return await fut
        except asyncio.CancelledError:
            if not chan.closed and rid in self._pending:
                chan.send(("k", rid))  # the engine cancels it; its reply frees the arena space
            raise

    def _response(self, msg: tuple) -> InferResponse:
        _, _, model, version, id_, params, block, outs = msg
        base = None
        if block is not None:
            off, size = block
            base = np.frombuffer(self._resp_mm, np.uint8, size, off)
            weakref.finalize(base, self._release, off)
        outputs = []
        for name, datatype, dt, shape, where, binary, oparams in outs:
            if type(where) is int:
                dtype = np.dtype(dt)
                n = dtype.itemsize
                for d in shape:
                    n *= d
                arr = base[where:where + n].view(dtype).reshape(shape) if n else np.empty(shape, dtype)
            else:
                arr = where
            outputs.append(OutputTensor(name, datatype, arr, binary, oparams or {}))
        return InferResponse(model, version, id_, outputs, params or {})

    def _release(self, off: int) -> None:
        """The last view of a response's outputs is gone: give its arena space back (any thread)."""
        if self.loop is None or self.loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._free_remote(off)
        else:
            self.loop.call_soon_threadsafe(self._free_remote, off)

    def _free_remote(self, off: int) -> None:
        if self.chan is not None and not self.chan.closed:
            self.chan.send(("f", off))

    def on_messages(self, messages: list) -> None:
        for m in messages:
            entry = self._pending.pop(m[1], None)
            if entry is None:
                continue
            fut, block = entry
            if block is not None:
                self._req_arena.free(block)
            if not fut.done():
                fut.set_result(m)
            elif m[0] == "o" and m[6] is not None:  # nobody is waiting (cancelled): free the response now
                self._free_remote(m[6][0])

    def on_lost(self) -> None:
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(ShuttingDownError("the engine process is gone; the server is stopping"))
        self._pending.clear()


class FrontendServer(InferenceServer):
    """The HTTP and gRPC servers of one front-end process (same code as one process, on shared ports)."""

    def __init__(self, config: dict, chan_sock: socket.socket, proxy: ProxyService):
        s: ServerSettings = config["settings"]
        # listen on the ports the engine process reserved; /metrics on the HTTP port, or on the engine's port
        super().__init__(ServerSettings(**{**s.__dict__, "http_port": config["http_port"],
                                           "grpc_port": config["grpc_port"], "frontends": 0}))
        self.index = config["index"]
        self._metrics_elsewhere = s.metrics_port is not None
        self._chan_sock = chan_sock
        self.proxy = proxy
        self.engine_gone = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, chan = await loop.connect_accepted_socket(lambda: Channel(self.proxy.on_messages, self._on_lost),
                                                     self._chan_sock)
        self.proxy.attach(chan)
        self.service = self.proxy
        metrics_port = self.settings.metrics_port
        self.settings.metrics_port = None  # the engine process serves a separate metrics port
        try:
            await self._open_ports(self.proxy, metrics=False, reuse_port=True)
        except Exception as e:
            chan.send(("fail", str(e)))
            await asyncio.sleep(0.1)
            raise
        finally:
            self.settings.metrics_port = metrics_port
        chan.send(("up", os.getpid()))

    def _on_lost(self) -> None:
        self.proxy.on_lost()
        if not self._stopped:
            log.error("front end %d: the engine process is gone; stopping", self.index)
            self.engine_gone = True
            self.request_stop()

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGINT:  # Ctrl-C reaches the whole process group: the engine process drains us
            return
        super()._on_signal(sig)

    async def shutdown(self) -> None:
        if self._stopped or self.service is None:
            return
        self._stopped = True
        self.proxy.shutting_down = True
        await self._close_ports(0.5 if self.engine_gone else self.settings.drain_timeout_s)
        self._uvicorns.clear()
        for guard in self._guards:
            guard.close()
        self._guards.clear()


def main() -> None:
    """Entry of a front-end process: argv holds the fds the engine process passed (channel, sync channel,
    request arena, response arena); the channel's first frame is the configuration."""
    chan_fd, sync_fd, req_fd, resp_fd = (int(a) for a in sys.argv[1:5])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the engine process drains us
    chan_sock = socket.socket(fileno=chan_fd)
    sync = socket.socket(fileno=sync_fd)
    sync.settimeout(120.0)
    config = read_frame(chan_sock)[0]
    logging.basicConfig(level=config["log_level"],
                        format=f"%(asctime)s %(levelname)s %(name)s[frontend {config['index']}]: %(message)s")
    size = config["arena_bytes"]
    req_mm, resp_mm = mmap.mmap(req_fd, size), mmap.mmap(resp_fd, size)
    os.close(req_fd)
    os.close(resp_fd)
    chan_sock.setblocking(False)
    proxy = ProxyService(config["settings"], req_mm, resp_mm, sync)
    server = FrontendServer(config, chan_sock, proxy)
    try:
        asyncio.run(server.run())
    except Exception as e:
        log.error("front end %d failed: %s", config["index"], e)
        sys.exit(1)
    sys.exit(1 if server.engine_gone else 0)


# the type the apps see; view_tensor is re-exported for tests that read arenas
__all__ = ["ProxyService", "FrontendServer", "main", "view_tensor"]
