"""The channel between front-end processes and the engine process (`ember serve --frontends N`).

One stream socket (a socketpair made by the engine process) per front end carries pickled lists of
small messages, each list one length-prefixed frame: every message queued during one pass of the
event loop goes out in one write, so under load the engine process reads many requests per system
call and per unpickle. Tensors do not travel on the socket: a front end copies a request's input
tensors into its request arena (shared memory, a memfd both processes map) and sends offsets; the
engine process reads them as numpy views (no copy before the batcher's gather), writes the outputs
into the front end's response arena and sends offsets back. When an arena has no room the bytes go
inline on the socket instead: slower, never an error.

Both arenas are ring allocators owned by one side each: the front end allocates (and frees, on the
reply) request space; the engine process allocates response space, and the front end frees it with
a message once the response has been encoded (when the last numpy view of it is garbage).
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import os
import pickle
import socket
import struct
from collections import deque
from typing import Any, Callable

import numpy as np

from ..errors import EmberError
from . import errors as serve_errors
from .errors import ServeError

log = logging.getLogger("ember.serve")
FRAME = struct.Struct("<I")
ALIGN = 64
MAX_FRAME = (1 << 32) - 1


def new_arena(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A shared-memory arena: an anonymous memfd (nothing in /dev/shm to leak when a process dies)
    of ``size`` bytes and this process's map of it. Pages are allocated as they are first written."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class RingArena:
    """Offsets into a buffer of ``size`` bytes, handed out in order and freed in any order; space is
    reused once every older block is freed (a block held long only delays reuse: ``alloc`` answers
    None when there is no room, and the caller sends the bytes inline)."""

    def __init__(self, size: int):
        self.size = size
        self._blocks: deque[list] = deque()  # [start, live], in allocation order
        self._live: dict[int, list] = {}
        self._head = 0  # end of the newest block
        self._wrapped = False  # live space is [tail, size) + [0, head)

    def alloc(self, n: int) -> int | None:
        n = max(ALIGN, (n + ALIGN - 1) & ~(ALIGN - 1))
        if not self._blocks:
            self._head, self._wrapped = 0, False
        tail = self._blocks[0][0] if self._blocks else 0
        head = self._head
        if not self._wrapped:
            if head + n <= self.size:
                start = head
            elif self._blocks and n <= tail:
                start, self._wrapped = 0, True
            else:
                return None
        elif head + n <= tail:
            start = head
        else:
            return None
        block = [start, True]
        self._blocks.append(block)
        self._live[start] = block
        self._head = start + n
        return start

    def free(self, start: int) -> None:
        block = self._live.pop(start, None)
        if block is None:
            return
        block[1] = False
        blocks = self._blocks
        while blocks and not blocks[0][1]:
            blocks.popleft()
        if self._wrapped and blocks and blocks[0][0] < self._head:
            self._wrapped = False

    @property
    def used_blocks(self) -> int:
        return len(self._live)


def frame(messages: list) -> bytes:
    payload = pickle.dumps(messages, protocol=5)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"an IPC frame of {len(payload)} bytes exceeds 4 GiB")
    return FRAME.pack(len(payload)) + payload


class Channel(asyncio.Protocol):
    """A framed, batching message channel on an asyncio transport. ``on_messages(list)`` gets each
    received frame's messages; ``on_lost()`` runs once when the peer is gone."""

    def __init__(self, on_messages: Callable[[list], None], on_lost: Callable[[], None]):
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._buf = bytearray()
        self._out: list = []
        self._scheduled = False
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self._buf and len(data) >= 4:  # the common case: whole frames, read from ``data`` as is
            (n,) = FRAME.unpack_from(data, 0)
            if len(data) == 4 + n:
                with memoryview(data) as mv, mv[4:] as payload:
                    messages = pickle.loads(payload)
                self._on_messages(messages)
                return
        buf = self._buf
        buf += data
        pos, n_buf = 0, len(buf)
        batches = []
        with memoryview(buf) as mv:
            while n_buf - pos >= 4:
                (n,) = FRAME.unpack_from(mv, pos)
                if n_buf - pos - 4 < n:
                    break
                with mv[pos + 4:pos + 4 + n] as payload:
                    batches.append(pickle.loads(payload))
                pos += 4 + n
        if pos:
            del buf[:pos]
        for messages in batches:
            self._on_messages(messages)

    def send(self, message: Any) -> None:
        """Queue a message; everything queued in this pass of the loop goes in one write."""
        self._out.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            try:
                data = frame(out)
            except Exception:  # one bad message must not sink the others queued with it
                log.exception("an IPC message could not be pickled; dropped")
                data = b"".join(_frame_or_empty(m) for m in out)
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _frame_or_empty(message: Any) -> bytes:
    try:
        return frame([message])
    except Exception:
        return b""


def read_frame(sock: socket.socket) -> list:
    """One frame's messages from a blocking socket (EOFError when the peer closed it)."""
    head = _read_exact(sock, 4)
    (n,) = FRAME.unpack(head)
    return pickle.loads(_read_exact(sock, n))


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the peer closed the channel")
        got += k
    return bytes(buf)


# ---- errors across the channel --------------------------------------------------------------------------------

_DYNAMIC: dict[tuple, type] = {}


def error_message(rid: int, e: BaseException) -> tuple:
    """An exception as a message, so the front end raises one that maps to the same status and text."""
    if isinstance(e, asyncio.CancelledError):
        return ("x", rid, "cancelled", "CancelledError", "", 0, "", "")
    kind = "serve" if isinstance(e, ServeError) else "ember" if isinstance(e, EmberError) else "other"
    status = getattr(e, "http_status", 0) if kind == "serve" else 0
    return ("x", rid, kind, type(e).__name__, str(e), status, getattr(e, "grpc_code", ""), getattr(e, "reason", ""))


def error_from(msg: tuple) -> BaseException:
    _, _, kind, name, text, status, code, reason = msg
    if kind == "cancelled":
        return asyncio.CancelledError()
    if kind == "serve":
        cls = getattr(serve_errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, ServeError) and cls.http_status == status
                and cls.grpc_code == code and cls.reason == reason):
            cls = _dynamic(name, ServeError, {"http_status": status, "grpc_code": code, "reason": reason})
        return cls(text)
    if kind == "ember":
        return _dynamic(name, EmberError, {})(text)
    return _dynamic(name, Exception, {})(text)


def _dynamic(name: str, base: type, attrs: dict) -> type:
    key = (name, base, tuple(sorted(attrs.items())))
    cls = _DYNAMIC.get(key)
    if cls is None:
        cls = _DYNAMIC[key] = type(name, (base,), dict(attrs))
    return cls


# ---- tensors ----------------------------------------------------------------------------------------------------

def dtype_token(dt: np.dtype) -> Any:
    """A dtype as a short string when that round-trips (the common case), else the dtype itself."""
    return dt.str if dt.kind in "biufc" else dt


def packed_size(arrays: list[np.ndarray]) -> int:
    return sum((a.nbytes + ALIGN - 1) & ~(ALIGN - 1) for a in arrays if a.dtype != object)


def write_tensors(buf: mmap.mmap, base: int, arrays: list[np.ndarray]) -> list[int]:
    """Copy numeric arrays into ``buf`` from offset ``base``, each aligned; their offsets (-1 for BYTES)."""
    offsets = []
    pos = base
    for a in arrays:
        if a.dtype == object:
            offsets.append(-1)
            continue
        if a.nbytes:
            np.copyto(np.ndarray(a.shape, a.dtype, buffer=buf, offset=pos), a, casting="no")
        offsets.append(pos)
        pos += (a.nbytes + ALIGN - 1) & ~(ALIGN - 1)
    return offsets


def view_tensor(buf: Any, dt: Any, shape: tuple, offset: int) -> np.ndarray:
    dtype = np.dtype(dt)
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(buf, dtype, count, offset).reshape(shape)
