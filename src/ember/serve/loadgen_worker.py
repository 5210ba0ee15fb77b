"""One process of `ember perf`'s load generator (see loadgen.py, which starts several).

It is run as a script, by path, so that it imports neither ember nor torch: it needs only the
standard library (and grpcio for gRPC) and starts in a fraction of a second. Each process runs
an asyncio loop with its share of the connections, each sending the same prebuilt request
back to back: a raw HTTP/1.1 request (keep-alive), or a serialized ModelInferRequest sent as
bytes over a gRPC channel, so no time goes to building or parsing messages per request.

Protocol with the parent, over stdin/stdout, pickled (parent and child are the same program):
  parent -> job dict;  child -> b"R" once its connections are open;
  parent -> (t_measure, t_end) on the shared monotonic clock;  child -> result dict.
"""
from __future__ import annotations

import array
import asyncio
import pickle
import resource
import socket
import sys
import time
from collections import Counter
from typing import Any


def _cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


class _Window:
    """The measured interval [t_measure, t_end) and what happened in it."""

    def __init__(self, t_measure: float, t_end: float):
        self.t_measure, self.t_end = t_measure, t_end
        self.latencies = array.array("d")
        self.errors: Counter = Counter()
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def record(self, t0: float, t1: float, err: str) -> None:
        if t0 >= self.t_measure:
            if err:
                self.errors[err] += 1
            else:
                self.latencies.append(t1 - t0)


# ---- HTTP/1.1 ------------------------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return (status, the server will close the connection)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(None, 2)[1])
    length, chunked, close = None, False, lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = value == b"close"
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()  # the body runs to the end of the connection
        close = True
    return status, close


async def _http_connect(host: str, port: int, timeout: float):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


async def _http_slot(job: dict, conn: Any, window: _Window) -> None:
    request, timeout = job["payload"], job["timeout_s"]
    reader, writer = conn if conn is not None else (None, None)
    while True:
        t0 = time.monotonic()
        if t0 >= window.t_end:
            break
        err = ""
        try:
            if writer is None:
                reader, writer = await _http_connect(job["host"], job["port"], timeout)
                t0 = time.monotonic()
            writer.write(request)
            status, close = await asyncio.wait_for(_read_response(reader), timeout)
            if status != 200:
                err = f"HTTP {status}"
            if close:
                writer.close()
                writer = None
        except (OSError, EOFError, ValueError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as e:
            err = type(e).__name__
            if writer is not None:
                writer.close()
            writer = None
        window.record(t0, time.monotonic(), err)
    if writer is not None:
        writer.close()


# ---- gRPC ---------------------------------------------------------------------------------------------------


async def _grpc_slot(job: dict, channel: Any, window: _Window) -> None:
    import grpc

    call = channel.unary_unary(job["grpc_method"], request_serializer=None, response_deserializer=None)
    body, metadata, timeout = job["payload"], job["metadata"], job["timeout_s"]
    while True:
        t0 = time.monotonic()
        if t0 >= window.t_end:
            break
        err = ""
        try:
            await call(body, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            err = f"gRPC {e.code().name}"
        window.record(t0, time.monotonic(), err)


# ---- one process ---------------------------------------------------------------------------------------------


async def _run(job: dict, stdin: Any, stdout: Any) -> dict:
    loop = asyncio.get_running_loop()
    n, timeout = job["connections"], job["timeout_s"]
    conns: list[Any] = []
    if job["protocol"] == "grpc":
        import grpc

        target = f"{job['host']}:{job['port']}"
        # one channel (one HTTP/2 connection) per concurrent caller, as one HTTP connection per caller
        options = [("grpc.max_receive_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
        conns = [grpc.aio.insecure_channel(target, options=options) for _ in range(n)]
        for ch in conns:
            try:
                await asyncio.wait_for(ch.channel_ready(), timeout)
            except asyncio.TimeoutError:
                pass  # the calls will fail and be counted
    else:
        for _ in range(n):
            try:
                conns.append(await _http_connect(job["host"], job["port"], timeout))
            except (OSError, asyncio.TimeoutError):
                conns.append(None)  # the slot reconnects and counts the failure
    stdout.write(b"R")
    stdout.flush()
    t_measure, t_end = await loop.run_in_executor(None, pickle.load, stdin)
    window = _Window(t_measure, t_end)

    def mark(attr: str) -> None:
        setattr(window, attr, _cpu_s())

    # asyncio's clock is time.monotonic, the clock the parent's deadlines are on
    loop.call_at(max(t_measure, loop.time()), mark, "cpu_start")
    slot = _grpc_slot if job["protocol"] == "grpc" else _http_slot
    await asyncio.gather(*(slot(job, c, window) for c in conns))
    window.cpu_end = _cpu_s()
    t_done = time.monotonic()
    if job["protocol"] == "grpc":
        for ch in conns:
            await ch.close()
    cpu_start = window.cpu_start if window.cpu_start is not None else window.cpu_end
    return {"latencies": window.latencies.tobytes(), "errors": dict(window.errors),
            "cpu_s": window.cpu_end - cpu_start, "busy_s": max(min(t_done, t_end) - t_measure, 1e-9)}


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    job = pickle.load(stdin)
    result = asyncio.run(_run(job, stdin, stdout))
    pickle.dump(result, stdout)
    stdout.flush()


if __name__ == "__main__":
    main()
