"""The engine process's side of `ember serve --frontends N`: it spawns N front-end processes
(frontend.py), serves their inference requests and calls through ipc.py, restarts a front end that
dies, and drains them on shutdown before its models.

Each front end gets two socketpairs (one for requests and replies, batched per loop pass; one for
the blocking calls its apps make synchronously: health, metadata, statistics, /metrics) and two
shared-memory arenas (request tensors, which it allocates; response tensors, which this process
allocates). Front ends start with subprocess (fork + exec: nothing of this process's CUDA or gRPC
state is inherited), after the models are loaded.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from .core import InferenceService
from .errors import ServeStartupError, UnsupportedError
from .ipc import (Channel, RingArena, dtype_token, error_message, frame, new_arena, packed_size, view_tensor,
                  write_tensors)
from .protocol import InferRequest, InferResponse, RequestedOutput

log = logging.getLogger("ember.serve")

# what a front end may call on the engine's InferenceService (plus "exposition": the metrics text)
CALLS = frozenset({"live", "ready", "server_metadata", "model_metadata", "model_ready", "model_config", "statistics",
                   "repository_index", "load_model", "unload_model", "exposition"})
STARTUP_TIMEOUT_S = 120.0


def auto_frontends() -> int:
    """``--frontends auto``: min(4, cores // 2), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(4, cores // 2))


class FrontendLink:
    """One front end, seen from the engine process: its channels, arenas and in-flight requests."""

    def __init__(self, sup: "FrontendSupervisor", index: int, proc: subprocess.Popen, req_mm: mmap.mmap,
                 resp_mm: mmap.mmap):
        self.sup = sup
        self.service = sup.service
        self.index = index
        self.proc = proc
        self.req_mm = req_mm
        self.resp_mm = resp_mm
        self.resp_arena = RingArena(len(resp_mm))
        self.tasks: dict[int, asyncio.Task] = {}
        self.chan: Channel | None = None
        self.sync: Channel | None = None
        self.up = asyncio.get_running_loop().create_future()
        self.started = time.monotonic()
        self.lost = False

    # ---- messages from the front end --------------------------------------------------------------------------

    def on_messages(self, messages: list) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            kind = m[0]
            if kind == "i":
                self.tasks[m[1]] = loop.create_task(self._infer(m))
            elif kind == "f":
                self.resp_arena.free(m[1])
            elif kind == "k":
                task = self.tasks.get(m[1])
                if task is not None:
                    task.cancel()
            elif kind == "e":
                self.service.count_error(m[1], m[2])
            elif kind == "c":
                loop.create_task(self._call(self.chan, m))
            elif kind == "n":  # requests sent inline (the request arena was full)
                self.sup.inline.inc(m[1])
            elif kind == "up":
                if not self.up.done():
                    self.up.set_result(None)
            elif kind == "fail":
                if not self.up.done():
                    self.up.set_exception(ServeStartupError(f"front end {self.index}: {m[1]}"))
            else:
                log.error("front end %d sent an unknown message %r", self.index, kind)

    def on_sync_messages(self, messages: list) -> None:
        loop = asyncio.get_running_loop()
        for m in messages:
            if m[0] == "c":
                loop.create_task(self._call(self.sync, m))

    def on_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        if not self.up.done():
            self.up.set_exception(ServeStartupError(f"front end {self.index} exited during startup; see its log "
                                                    "lines above"))
        self.sup.lost(self)

    # ---- inference ------------------------------------------------------------------------------------------------

    async def _infer(self, m: tuple) -> None:
        rid = m[1]
        try:
            resp = await self.service.infer(self._request(m), m[2])
            reply = self._response(rid, resp)
        except BaseException as e:  # noqa: BLE001 - every outcome goes back to the front end
            if not isinstance(e, (asyncio.CancelledError, Exception)):
                raise
            if not isinstance(e, (asyncio.CancelledError, asyncio.TimeoutError)) and not hasattr(e, "http_status"):
                log.debug("inference from front end %d raised %s: %s", self.index, type(e).__name__, e)
            reply = error_message(rid, e)
        finally:
            self.tasks.pop(rid, None)
        if self.chan is not None:
            self.chan.send(reply)

    def _request(self, m: tuple) -> InferRequest:
        _, _, _, model, version, id_, priority, timeout, params, outs, _, ins = m
        inputs, datatypes = {}, {}
        mm = self.req_mm
        for name, datatype, dt, shape, where in ins:
            if type(where) is int:
                arr = view_tensor(mm, dt, shape, where)
                arr.flags.writeable = False  # like a view of a request body in one process
            else:
                arr = where
            inputs[name] = arr
            datatypes[name] = datatype
        outputs = [RequestedOutput(n, b, k) for n, b, k in outs] if outs is not None else None
        return InferRequest(model, version, inputs, datatypes, outputs, id_, priority, timeout, params or {})

    def _response(self, rid: int, resp: InferResponse) -> tuple:
        numeric = [o.data for o in resp.outputs if o.data.dtype != object]
        size = packed_size(numeric)
        block = self.resp_arena.alloc(size) if size else None
        outs = []
        if block is not None:
            offsets = iter(write_tensors(self.resp_mm, block, numeric))
        for o in resp.outputs:
            a = o.data
            if a.dtype == object or block is None:
                where: Any = a  # pickled with the message
            else:
                where = next(offsets) - block
            outs.append((o.name, o.datatype, dtype_token(a.dtype), a.shape, where, o.binary, o.parameters or None))
        if size and block is None:
            self.sup.inline.inc()
        return ("o", rid, resp.model, resp.version, resp.id, resp.parameters or None,
                None if block is None else (block, size), outs)

    # ---- calls --------------------------------------------------------------------------------------------------

    async def _call(self, chan: Channel | None, m: tuple) -> None:
        _, rid, method, args = m
        try:
            if method not in CALLS:
                raise UnsupportedError(f"front end call '{method:.40}' is not one the engine process answers")
            if method == "exposition":
                value: Any = self.service.metrics.exposition()
            else:
                value = getattr(self.service, method)(*args)
                if asyncio.iscoroutine(value):
                    value = await value
                if method == "model_config":  # a protobuf message: it travels serialized
                    value = value.SerializeToString()
            reply: tuple = ("r", rid, value)
        except Exception as e:
            reply = error_message(rid, e)
        if chan is not None:
            chan.send(reply)


class FrontendSupervisor:
    """Spawns, watches, restarts and drains the front-end processes of one engine process."""

    def __init__(self, service: InferenceService, http_port: int | None, grpc_port: int | None):
        self.service = service
        self.settings = service.settings
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.links: dict[int, FrontendLink] = {}
        self.stopping = False
        self._restarts: dict[int, int] = {}
        self._tasks: set[asyncio.Task] = set()
        r = service.metrics.registry
        self.running = Gauge("ember_frontends", "Front-end processes running (--frontends)", registry=r)
        self.restarts = Counter("ember_frontend_restarts", "Front-end processes restarted after they exited",
                                registry=r)
        self.inline = Counter("ember_frontend_inline_tensors",
                              "Requests or responses whose tensors went inline on the socket (arena full)",
                              registry=r)

    async def start(self) -> None:
        for i in range(self.settings.frontends):
            await self._spawn(i)
        try:
            await asyncio.wait_for(asyncio.gather(*(link.up for link in self.links.values())), STARTUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ServeStartupError(f"the front-end processes did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
        log.info("%d front-end processes serving (pids %s)", len(self.links),
                 ", ".join(str(link.proc.pid) for link in self.links.values()))

    async def _spawn(self, index: int) -> FrontendLink:
        s = self.settings
        loop = asyncio.get_running_loop()
        chan_here, chan_there = socket.socketpair()
        sync_here, sync_there = socket.socketpair()
        req_fd, req_mm = new_arena(f"ember-frontend{index}-requests", s.frontend_arena_bytes)
        resp_fd, resp_mm = new_arena(f"ember-frontend{index}-responses", s.frontend_arena_bytes)
        config = {"settings": s, "index": index, "http_port": self.http_port, "grpc_port": self.grpc_port,
                  "arena_bytes": s.frontend_arena_bytes, "log_level": logging.getLogger("ember.serve").getEffectiveLevel()}
        chan_here.sendall(frame([config]))
        fds = (chan_there.fileno(), sync_there.fileno(), req_fd, resp_fd)
        src = str(Path(__file__).resolve().parents[2])  # the folder holding the ember package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        try:
            proc = subprocess.Popen([sys.executable, "-c", "from ember.serve.frontend import main; main()",
                                     *map(str, fds)], pass_fds=fds, env=env)
        finally:
            for fd in (req_fd, resp_fd):
                os.close(fd)
            chan_there.close()
            sync_there.close()
        link = FrontendLink(self, index, proc, req_mm, resp_mm)
        self.links[index] = link
        chan_here.setblocking(False)
        sync_here.setblocking(False)
        _, link.chan = await loop.connect_accepted_socket(lambda: Channel(link.on_messages, link.on_lost), chan_here)
        _, link.sync = await loop.connect_accepted_socket(lambda: Channel(link.on_sync_messages, lambda: None),
                                                          sync_here)
        self.running.set(len(self.links))
        return link

    def lost(self, link: FrontendLink) -> None:
        """A front end's channel closed: it exited (or was killed). Reap it; restart it unless stopping."""
        if self.links.get(link.index) is link:
            del self.links[link.index]
        self.running.set(len(self.links))
        if link.sync is not None:
            link.sync.close()
        if self.stopping:
            return
        task = asyncio.get_running_loop().create_task(self._restart(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, link: FrontendLink) -> None:
        code = await _reap(link.proc, 5.0)
        if self.stopping:
            return
        quick = time.monotonic() - link.started < 10.0
        n = self._restarts[link.index] = self._restarts.get(link.index, 0) + 1 if quick else 1
        delay = min(10.0, 0.25 * 2 ** (n - 1)) if quick else 0.0
        log.error("front end %d (pid %d) exited with %s; restarting it%s", link.index, link.proc.pid, code,
                  f" in {delay:.1f} s" if delay else "")
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        try:
            new = await self._spawn(link.index)
            await asyncio.wait_for(new.up, STARTUP_TIMEOUT_S)
            self.restarts.inc()
        except Exception as e:  # try again on the next loss; the others keep serving
            log.error("front end %d did not restart: %s", link.index, e)

    async def stop(self, grace: float) -> None:
        """SIGTERM every front end (each stops accepting and finishes its requests), wait, then kill."""
        self.stopping = True
        for task in list(self._tasks):
            task.cancel()
        links = list(self.links.values())
        for link in links:
            if link.proc.poll() is None:
                link.proc.send_signal(signal.SIGTERM)
        for link in links:
            code = await _reap(link.proc, grace + 5.0)
            log.debug("front end %d exited with %s", link.index, code)
        for link in links:
            for chan in (link.chan, link.sync):
                if chan is not None:
                    chan.close()
        self.links.clear()
        self.running.set(0)


async def _reap(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for a child to exit (without blocking the loop); kill it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            return await asyncio.to_thread(proc.wait)
        await asyncio.sleep(0.02)
    return proc.returncode
