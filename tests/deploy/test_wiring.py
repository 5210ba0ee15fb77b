"""The deployment files use what ember really has: every metric name in the Grafana dashboard, the
alert rules and the autoscaler's adapter rules is one a running `ember serve` exports, and every
`ember serve` / `ember doctor` flag in the images and manifests is one the CLI accepts."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from . import kube
from .helpers import onnx_model

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PREFIXES = ("nv_", "ember_", "process_")
# published by prometheus-adapter from ember's series, not by ember itself
ADAPTER_NAMES = {"ember_queue_time_seconds"}

pytest.importorskip("prometheus_client", reason="the [serve] extra")
httpx = pytest.importorskip("httpx")


def _fake_nvml() -> types.SimpleNamespace:
    """Enough of pynvml for the server's GPU collector, so the nv_gpu_* families appear on this CPU machine."""
    class Util:
        gpu = 37

    class Mem:
        total, used = 150_000_000_000, 9_000_000_000

    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetUUID=lambda h: "GPU-test",
        nvmlDeviceGetUtilizationRates=lambda h: Util(), nvmlDeviceGetMemoryInfo=lambda h: Mem(),
        nvmlDeviceGetPowerUsage=lambda h: 300_000)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Series names on /metrics of a server that has loaded a model, batched and answered requests."""
    import ember
    from ember.serve import ServerSettings, ServerThread

    tmp = tmp_path_factory.mktemp("wiring")
    repo = tmp / "models"
    (repo / "am" / "1").mkdir(parents=True)
    ember.build(onnx_model(tmp), device="cpu").save(str(repo / "am" / "1" / "model.engine"))
    (repo / "am" / "config.yaml").write_text("max_batch_size: 4\ndynamic_batching: {max_queue_delay_us: 100}\n")
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "pynvml", _fake_nvml())
    try:
        with ServerThread(ServerSettings(repo, http_port=0, grpc_port=None, metrics_port=0)) as srv:
            x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
            body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}]}
            with httpx.Client(base_url=f"http://127.0.0.1:{srv.http_port}", timeout=30) as c:
                r = c.post("/v2/models/am/infer", json=body)
                assert r.status_code == 200, r.text
                c.post("/v2/models/nope/infer", json=body)  # a refused request: ember_request_errors
            text = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30).text
    finally:
        mp.undo()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "nv_gpu_utilization" in names and "ember_queue_duration_seconds_count" in names
    return names


def _promql_names(expr: str) -> set[str]:
    return {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if n.startswith(PREFIXES)}


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "docker" / "grafana" / "dashboards" / "ember.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_dashboard_covers_what_the_issue_asks_with_exported_names(exported):
    exprs = _dashboard_exprs()
    used = set().union(*map(_promql_names, exprs))
    assert used <= exported, f"the dashboard uses metrics ember does not export: {sorted(used - exported)}"
    text = " ".join(exprs)
    for needed in ("nv_inference_count",                       # throughput
                   "ember_request_duration_seconds_bucket",    # latency percentiles
                   "ember_queue_duration_seconds",             # queue time
                   "ember_batch_size",                         # batch sizes
                   "nv_gpu_utilization", "nv_gpu_memory_used_bytes"):  # GPU utilization and memory
        assert needed in text
    assert "histogram_quantile(0.99" in text and "histogram_quantile(0.5" in text


def test_alert_and_adapter_rules_use_exported_names(exported):
    alerts = yaml.safe_load((DEPLOY / "docker" / "prometheus" / "ember-alerts.yml").read_text())
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    cm = kube.load_docs(DEPLOY / "k8s" / "prometheus-adapter" / "adapter-config.yaml")[0]
    for rule in yaml.safe_load(cm["data"]["config.yaml"])["rules"]:
        exprs += [rule["seriesQuery"], rule["metricsQuery"]]
        assert re.fullmatch(rule["name"]["matches"], _promql_names(rule["seriesQuery"]).pop())
    for e in exprs:
        missing = _promql_names(e) - exported - ADAPTER_NAMES
        assert not missing, f"{e!r} uses metrics ember does not export: {sorted(missing)}"


# -- CLI flags --------------------------------------------------------------------------------------

def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, argv after `ember`) for every ember command line in the deploy files."""
    out = []
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = (DEPLOY / "docker" / name).read_text()
        entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", text, re.M).group(1))
        cmd = json.loads(re.search(r"^CMD (\[.*?\])$", text, re.M | re.S).group(1).replace("\\\n", ""))
        out.append((name, entry[1:] + cmd))
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    out.append(("compose.yaml", ["serve"] + compose["services"]["ember"]["command"]))
    for name in ("base", "overlays/h200", "overlays/cpu"):
        for doc in kube.render(DEPLOY / "k8s" / name):
            spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else {}
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                argv = c.get("command", ["ember", "serve"]) + c.get("args", [])
                if argv[0] == "ember":
                    out.append((f"{name} {c['name']}", argv[1:]))
    sr = kube.load_docs(DEPLOY / "k8s" / "kserve" / "servingruntime.yaml")[0]
    out.append(("servingruntime.yaml", ["serve"] + sr["spec"]["containers"][0]["args"]))
    return out


def test_every_flag_is_one_the_cli_accepts(tmp_path):
    import click

    from ember.cli.main import cli

    lines = _command_lines()
    assert {argv[0] for _, argv in lines} == {"serve", "doctor"} and len(lines) >= 8
    for where, argv in lines:
        command = cli.get_command(click.Context(cli), argv[0])
        known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
        flags = {a.split("=")[0] for a in argv[1:] if a.startswith("--")}
        assert flags <= known, f"{where}: `ember {argv[0]}` has no {sorted(flags - known)}"
        # and the whole command line parses (paths need not exist: the check is on the flags)
        command.make_context(argv[0], [a if not a.startswith("/") else str(tmp_path) for a in argv[1:]],
                             resilient_parsing=True)
