"""Lifecycle: readiness, reload and new versions under load, unload drains, failed loads,
ONNX build-and-cache, poll mode, and SIGTERM draining a real `ember serve` process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import AFFINE_CONFIG, free_port

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / "src")
DOC = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}


def _hammer(base: str, model: str, stop: threading.Event, out: list, errors: list) -> None:
    with httpx.Client(base_url=base, timeout=30) as c:
        while not stop.is_set():
            r = c.post(f"/v2/models/{model}/infer", json=DOC)
            if r.status_code == 200:
                out.append(r.json()["model_version"])
            else:
                errors.append((r.status_code, r.text))


def test_new_version_and_reload_under_load_drop_nothing(repo_builder, make_server):
    repo_builder.add("m", "affine", AFFINE_CONFIG)
    srv = make_server(repo_builder.root, model_control_mode="explicit")
    base = f"http://127.0.0.1:{srv.http_port}"
    stop, versions, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_hammer, args=(base, "m", stop, versions, errors)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        repo_builder.add_version("m", "affine", 2)
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.post("/v2/repository/models/m/load").status_code == 200
            time.sleep(0.3)
            assert c.post("/v2/repository/models/m/load").status_code == 200  # a plain reload, same version
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert versions[0] == "1" and versions[-1] == "2" and len(versions) > 20


def test_unload_finishes_queued_requests(repo_builder, make_server):
    repo_builder.add("slow", "affine", "max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 2000}\n")
    srv = make_server(repo_builder.root, model_control_mode="explicit")
    base = f"http://127.0.0.1:{srv.http_port}"
    results: list[int] = []

    def one():
        with httpx.Client(base_url=base, timeout=30) as c:
            results.append(c.post("/v2/models/slow/infer", json=DOC).status_code)

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    model = srv.service.repository.get("slow", None)
    deadline = time.monotonic() + 10
    while model.batcher.queued < 5 and time.monotonic() < deadline:  # all wait out the 300 ms batching delay
        time.sleep(0.005)
    with httpx.Client(base_url=base, timeout=30) as c:
        assert c.post("/v2/repository/models/slow/unload").status_code == 200
        for t in threads:
            t.join(30)
        assert results == [200] * 5
        r = c.post("/v2/models/slow/infer", json=DOC)
        assert r.status_code == 404 and "not loaded" in r.json()["error"]
        assert c.get("/v2/models/slow/ready").status_code == 400


def test_failed_reload_keeps_old_version_serving(repo_builder, make_server):
    model_dir = repo_builder.add("m", "affine", AFFINE_CONFIG)
    srv = make_server(repo_builder.root, model_control_mode="explicit")
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        (model_dir / "config.yaml").write_text("max_batch_size: 8\ninputs: [{name: x, dtype: int32, shape: [4]}]\n")
        r = c.post("/v2/repository/models/m/load")
        assert r.status_code == 400
        assert "input 'x' is INT32 in the config but FP32 in the engine" in r.json()["error"]
        assert "keep serving" in r.json()["error"]
        assert c.post("/v2/models/m/infer", json=DOC).status_code == 200
        (model_dir / "2").mkdir()
        (model_dir / "2" / "model.engine").write_bytes(b"PK\x03\x04 not an engine")
        (model_dir / "config.yaml").write_text(AFFINE_CONFIG)
        r = c.post("/v2/repository/models/m/load")
        assert r.status_code == 400 and "model.engine" in r.json()["error"]
        assert c.post("/v2/models/m/infer", json=DOC).json()["model_version"] == "1"


def test_strict_startup_names_the_broken_model(repo_builder, make_server):
    from ember.serve import ServeStartupError

    repo_builder.add("good", "affine", AFFINE_CONFIG)
    bad = repo_builder.add("bad", "affine", "max_batch_size: 8\nwarmup: [{name: w, inputs: {x: {dtype: float32, "
                                            "shape: [5]}}}]\n")
    with pytest.raises(ServeStartupError, match=r"(?s)1 model\(s\) failed to load.*bad.*warm-up 'w' failed"):
        make_server(repo_builder.root)
    srv = make_server(repo_builder.root, strict=False)
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        assert c.get("/v2/health/ready").status_code == 200
        index = {m["name"]: m for m in c.post("/v2/repository/index").json()}
        assert index["good"]["state"] == "READY"
        assert index["bad"]["state"] == "UNAVAILABLE" and "warm-up" in index["bad"]["reason"]
        assert c.post("/v2/models/good/infer", json=DOC).status_code == 200
    assert bad.exists()


def test_onnx_model_is_built_once_and_cached(repo_builder, make_server, tmp_path):
    repo_builder.add("fromonnx", "affine", AFFINE_CONFIG, onnx=True)
    cache = tmp_path / "cache"
    srv = make_server(repo_builder.root, cache_dir=cache)
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        r = c.post("/v2/models/fromonnx/infer", json=DOC)
        assert r.json()["outputs"][0]["data"] == [1, 3, 5, 7]
        assert c.get("/v2/models/fromonnx/config").json()["default_model_filename"] == "model.onnx"
    cached = list(cache.glob("fromonnx_1-*.engine"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    srv.stop()
    srv2 = make_server(repo_builder.root, cache_dir=cache)
    with httpx.Client(base_url=f"http://127.0.0.1:{srv2.http_port}", timeout=30) as c:
        assert c.post("/v2/models/fromonnx/infer", json=DOC).status_code == 200
    assert cached[0].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_onnx_build_options_from_config(repo_builder, make_server, tmp_path):
    from ember.serve import ServeStartupError

    repo_builder.add("opts", "affine", AFFINE_CONFIG + "build: {opt_level: 0}\n", onnx=True)
    srv = make_server(repo_builder.root, cache_dir=tmp_path / "c")
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        assert c.post("/v2/models/opts/infer", json=DOC).json()["outputs"][0]["data"] == [1, 3, 5, 7]
    srv.stop()
    (repo_builder.root / "opts" / "config.yaml").write_text(AFFINE_CONFIG + "build: {speed: max}\n")
    with pytest.raises(ServeStartupError, match=r"unknown option\(s\) \['speed'\]"):
        make_server(repo_builder.root, cache_dir=tmp_path / "c")


def test_poll_mode_picks_up_new_versions_and_models(repo_builder, make_server):
    repo_builder.add("m", "affine", AFFINE_CONFIG)
    srv = make_server(repo_builder.root, model_control_mode="poll", poll_interval_s=0.2)
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
        assert c.post("/v2/models/m/infer", json=DOC).json()["model_version"] == "1"
        repo_builder.add_version("m", "affine", 2)
        repo_builder.add("n", "affine", AFFINE_CONFIG)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (c.post("/v2/models/m/infer", json=DOC).json().get("model_version") == "2"
                    and c.get("/v2/models/n/ready").status_code == 200):
                break
            time.sleep(0.1)
        else:
            pytest.fail("poll mode did not load version 2 and model n within 20 s")


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.communicate()[1][-2000:]}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def _queued(base: str, model: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'ember_queued_requests{{model="{model}"'):
            return float(line.split()[-1])
    return 0.0


def serve_process(repo: Path, http_port: int, grpc_port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "ember.cli.main", "serve", str(repo), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), "--log-level", "warning", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_drains_in_flight_requests_then_exits(repo_builder, tmp_path):
    repo_builder.add("slow", "affine", "max_batch_size: 8\ndynamic_batching: {max_queue_delay_ms: 1500}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve_process(repo_builder.root, port, free_port(), "--cache-dir", str(tmp_path / "c"))
    try:
        _wait_ready(base, proc)
        results: list = []

        def one(i: int):
            x = [float(i)] * 4
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.post("/v2/models/slow/infer", json={"inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]})
                results.append((i, r.status_code, r.json()))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while _queued(base, "slow") < 6 and time.monotonic() < deadline:  # all wait out the batching delay
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
        assert sorted(r[1] for r in results) == [200] * 6
        for i, _, doc in results:
            assert doc["outputs"][0]["data"] == [2.0 * i + 1] * 4
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_reports_a_busy_port(repo_builder, tmp_path):
    repo_builder.add("m", "affine", AFFINE_CONFIG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        proc = serve_process(repo_builder.root, busy, free_port())
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"cannot bind the http port 127.0.0.1:{busy}" in err and "--http-port" in err
    assert "Traceback" not in err
