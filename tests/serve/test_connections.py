"""Connection hardening of the HTTP front end, with real sockets (issue 11, problems 3 and 5):
slowloris connections time out and cannot crowd out the health probe, one address cannot hold
every connection, stalled bodies are dropped, and SIGTERM closes idle and slow connections at
once while the requests being answered still complete."""
from __future__ import annotations

import resource
import signal
import socket
import threading
import time

import httpx
import pytest

from ember.serve.http_guard import ConnectionGuard, ConnectionLimits

from .conftest import free_port
from .test_lifecycle import _queued, _wait_ready, serve_process

pytestmark = pytest.mark.timeout(120)

PARTIAL = b"GET /v2/health/live HTTP/1.1\r\nHost: ember\r\nX-Slow: "  # headers never finish


@pytest.fixture(autouse=True)
def _enough_file_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _connect(port: int, source: str, payload: bytes = PARTIAL) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if payload:
        s.sendall(payload)
    return s


def _closed_by_server(s: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after `within` seconds."""
    s.settimeout(within)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return data


def _live_within(base: str, seconds: float) -> float:
    t0 = time.monotonic()
    r = httpx.get(f"{base}/v2/health/live", timeout=seconds)
    assert r.status_code == 200
    return time.monotonic() - t0


def test_slowloris_times_out_and_never_blocks_the_health_probe(repo_builder, make_server):
    repo_builder.add("m", "affine", "max_batch_size: 8\n")
    srv = make_server(repo_builder.root, grpc_port=None, header_timeout_s=1.0, body_timeout_s=1.0,
                      max_connections_per_client=40, max_connections=100)  # at most 256 open connections
    port, base = srv.http_port, f"http://127.0.0.1:{srv.http_port}"
    # one address: connections past its cap are answered 503 and closed at once
    own = [_connect(port, "127.0.0.2") for _ in range(60)]
    answers = [_closed_by_server(s, 2.0) for s in own[40:]]
    assert all(a is not None and a.startswith(b"HTTP/1.1 503") and b"too many connections" in a for a in answers)
    # many addresses, more connections than the server keeps open: the oldest waiting ones are evicted,
    # and the probe still answers at once
    crowd = [_connect(port, f"127.0.0.{3 + i // 30}") for i in range(360)]
    assert _live_within(base, 2.0) < 1.0
    t0 = time.monotonic()
    lingering = [s for s in own[:40] + crowd if _closed_by_server(s, 0.01) is None]
    assert len(lingering) <= 256
    # every partial connection is gone after the header timeout (1 s), with a 408 saying why
    for s in lingering:
        data = _closed_by_server(s, max(0.1, 3.0 - (time.monotonic() - t0)))
        assert data is not None, "a partial-header connection outlived the header timeout"
    assert data.startswith(b"HTTP/1.1 408")
    silent = _connect(port, "127.0.0.1", payload=b"")  # connects and says nothing
    assert _closed_by_server(silent, 3.0) == b""
    for s in own + crowd + [silent]:
        s.close()
    assert _live_within(base, 2.0) < 1.0


def test_stalled_body_is_dropped_and_normal_requests_still_work(repo_builder, make_server):
    repo_builder.add("m", "affine", "max_batch_size: 8\n")
    srv = make_server(repo_builder.root, grpc_port=None, header_timeout_s=1.0, body_timeout_s=1.0)
    port = srv.http_port
    s = _connect(port, "127.0.0.1", b"POST /v2/models/m/infer HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 200\r\n\r\n{\"inputs\": [")
    t0 = time.monotonic()
    data = _closed_by_server(s, 5.0)
    assert data is not None and data.startswith(b"HTTP/1.1 408") and b"body stalled" in data
    assert 0.9 < time.monotonic() - t0 < 3.0
    s.close()
    # a keep-alive client that pauses between requests (longer than the header timeout) is fine
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        doc = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        assert c.post("/v2/models/m/infer", json=doc).json()["outputs"][0]["data"] == [3, 5, 7, 9]
        time.sleep(1.5)
        assert c.post("/v2/models/m/infer", json=doc).status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'ember_request_errors_total{protocol="http",reason="CANCELED"} 1.0' in metrics
    assert "Traceback" not in metrics


class _FakeTransport:
    def __init__(self, peer: str):
        self.peer, self.closed, self.written = peer, False, b""

    def get_extra_info(self, key):
        return (self.peer, 1) if key == "peername" else None

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed


class _FakeCycle:
    def __init__(self, more_body: bool):
        self.response_complete, self.more_body = False, more_body


def test_guard_evicts_only_waiting_connections_and_refuses_when_all_are_busy():
    import asyncio

    async def main():
        guard = ConnectionGuard(ConnectionLimits(header_timeout_s=5, body_timeout_s=5, max_per_client=10, max_open=3))

        class Proto:
            pass

        def conn(peer: str, cycle=None):
            p = Proto()
            p.transport, p.cycle = _FakeTransport(peer), cycle
            p.ember_waiting_since = p.ember_last_data = time.monotonic()
            guard._admit(p, p.transport)
            return p

        busy = conn("10.0.0.1", _FakeCycle(more_body=False))
        waiting = conn("10.0.0.2")
        body = conn("10.0.0.3", _FakeCycle(more_body=True))
        newcomer = conn("10.0.0.4")  # full: the one waiting connection makes room
        assert waiting.transport.closed and not newcomer.transport.closed
        assert not busy.transport.closed and not body.transport.closed
        newcomer.cycle = _FakeCycle(more_body=False)
        refused = conn("10.0.0.5")  # nothing left to evict
        assert refused.transport.closed and refused.transport.written.startswith(b"HTTP/1.1 503")
        guard.drain()  # shutdown: busy ones stay, a body that stalls is dropped after a short grace
        assert not busy.transport.closed and not body.transport.closed
        guard.sweep(now=time.monotonic() + 5)
        assert body.transport.closed and b"shutting down" in body.transport.written and not busy.transport.closed
        guard.close()

    asyncio.run(main())


def test_sigterm_closes_idle_and_slow_connections_and_finishes_in_flight_requests(repo_builder, tmp_path):
    repo_builder.add("slow", "affine", "max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 1500}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve_process(repo_builder.root, port, free_port(), "--cache-dir", str(tmp_path / "c"),
                         "--drain-timeout", "30")
    try:
        _wait_ready(base, proc)
        results: list = []

        def one(i: int):
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.post("/v2/models/slow/infer", json={"inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [float(i)] * 4}]})
                results.append((i, r.status_code, r.json()))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        slow_bodies = [_connect(port, "127.0.0.1", b"POST /v2/models/slow/infer HTTP/1.1\r\nHost: e\r\n"
                                                   b"Content-Length: 1000\r\n\r\n{\"in") for _ in range(50)]
        idle = [_connect(port, "127.0.0.1", payload=b"") for _ in range(10)] + \
               [_connect(port, "127.0.0.1") for _ in range(10)]
        deadline = time.monotonic() + 20
        while _queued(base, "slow") < 4 and time.monotonic() < deadline:  # in flight: queued in the batcher
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for s in slow_bodies + idle:
            assert _closed_by_server(s, 5.0) is not None, "a slow or idle connection was kept open after SIGTERM"
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
        elapsed = time.monotonic() - t0
        assert elapsed < 8, f"shutdown took {elapsed:.1f} s with slow clients connected (drain timeout 30 s)"
        assert sorted(r[1] for r in results) == [200] * 4
        for i, _, doc in results:
            assert doc["outputs"][0]["data"] == [2.0 * i + 1] * 4
        err = proc.stderr.read()
        assert "Traceback" not in err, err[-3000:]
        for s in slow_bodies + idle:
            s.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_grpc_connections_must_finish_the_handshake_in_time(repo_builder, make_server):
    repo_builder.add("m", "affine", "max_batch_size: 8\n")
    srv = make_server(repo_builder.root, header_timeout_s=1.0)
    for payload in (b"", b"PRI * HTTP/2.0\r\n"):  # silent, and a preface that never finishes
        s = _connect(srv.grpc_port, "127.0.0.1", payload)
        t0 = time.monotonic()
        assert _closed_by_server(s, 5.0) is not None  # (the server's SETTINGS frame, then the close)
        assert 0.5 < time.monotonic() - t0 < 3.0
        s.close()
