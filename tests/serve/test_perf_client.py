"""`ember perf`'s load generator: worker processes with asyncio connections, the client's own CPU
use, and only the KServe v2 protocol on the wire (so it measures Triton the same way)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from ember.serve.loadgen import WORKER, LoadJob, grpc_request, http_request, run_level

pytestmark = pytest.mark.timeout(120)

INPUTS = {"a": ("FP32", np.ones((2, 3), np.float32)), "b": ("FP32", np.full((2, 3), 2, np.float32))}


def test_worker_starts_without_importing_ember():
    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='not_main'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ember', 'torch')))")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(WORKER)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_processes_share_the_connections_and_report_cpu(server, protocol):
    if protocol == "http":
        job = LoadJob("http", "127.0.0.1", server.http_port,
                      http_request("127.0.0.1", server.http_port, "/v2/models/addsub/infer", INPUTS, True, None))
    else:
        job = LoadJob("grpc", "127.0.0.1", server.grpc_port, grpc_request("addsub", "", INPUTS))
    run = run_level(job, concurrency=5, duration_s=1.0, warmup_s=0.2, processes=2)
    assert run.processes == 2 and not run.errors, run.errors
    assert len(run.latencies_s) > 5 and 0 < float(np.median(run.latencies_s)) < 1.0
    assert 0 < run.client_cpu_s < 2 * 1.5  # two processes, at most their share of the window
    assert 0 < run.busiest_worker <= 1.2


def test_failures_are_counted_by_reason(server):
    body = http_request("127.0.0.1", server.http_port, "/v2/models/ghost/infer", INPUTS, True, None)
    run = run_level(LoadJob("http", "127.0.0.1", server.http_port, body), concurrency=2, duration_s=0.5,
                    warmup_s=0.1, processes=1)
    assert len(run.latencies_s) == 0 and set(run.errors) == {"HTTP 404"} and run.errors["HTTP 404"] > 2
    bad = grpc_request("ghost", "", INPUTS)
    run = run_level(LoadJob("grpc", "127.0.0.1", server.grpc_port, bad), concurrency=1, duration_s=0.3,
                    warmup_s=0.0, processes=1)
    assert set(run.errors) == {"gRPC NOT_FOUND"}
