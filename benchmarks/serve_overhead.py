"""The server's own cost per request (issue 11): `ember serve` with a model whose compute is negligible,
loaded by `ember perf`, and the server process's CPU time per request served.

On the H200 `ember serve` topped out at 1,400-1,750 requests/s at concurrency 64 whatever the model:
the per-request Python work of one server process is the limit there, not the GPU. That work is the
same on any machine, so it is measured here on the CPU, where it is the only thing the server does:

* a model built with onnx.helper: ``tiny`` (float32[b, 16] + 1, 64 bytes in and out), or ``image``
  (ResNet-50's wire sizes: float16[b, 3, 224, 224] in, 294 KiB; float16[b, 1000] out: the first 1000
  values of each image);
* ``ember serve`` in a subprocess on a repository holding it (max batch 64, ``--instances``, no queue
  delay), with ``--staged`` on the GPU's path emulated on the CPU (pinned-slot staging, two batches in
  flight per instance, output leases: runtime/context.py ``emulate_graphs``), else the CPU path;
* each protocol (gRPC, HTTP with binary tensors) and concurrency measured with ember perf's load
  generator; around each level the server's CPU time (user + system, from /proc) and its count of
  successful requests (its statistics) are read, so **CPU µs per request** = Δ CPU / Δ requests. That
  figure transfers to another machine; requests/s here does not (2 cores are shared by the server
  and its clients). The CPU per server thread is kept in the JSON too (event loop, gRPC's threads,
  the instances' launch and finish threads).

``--profile DIR`` samples the server with py-spy during each level (``pip install py-spy``) and writes
collapsed stacks (``DIR/<protocol>-c<N>.txt``) plus the top frames by own time to the JSON; CPU
figures of a profiled run include py-spy's sampling cost, so take them from a run without it.

    PYTHONPATH=src python benchmarks/serve_overhead.py --out /tmp/serve_overhead.json
    PYTHONPATH=src python benchmarks/serve_overhead.py --model image --staged --out /tmp/so_image.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def log(msg: str) -> None:
    print(f"[serve_overhead] {msg}", file=sys.stderr, flush=True)


# ---- the model ----------------------------------------------------------------------------------------------

def make_model(kind: str, path: Path) -> dict[str, Any]:
    """An ONNX model whose compute is negligible next to the server's per-request work."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind == "tiny":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
        one = numpy_helper.from_array(np.array(1, np.float32), "one")
        graph = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "tiny", [x], [y], [one])
        spec = {"inputs": {"x": ["FP32", [16]]}, "outputs": {"y": ["FP32", [16]]}}
    elif kind == "image":
        x = helper.make_tensor_value_info("images", TensorProto.FLOAT16, ["batch", 3, 224, 224])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", 1000])
        consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("flat", [-1, 3 * 224 * 224]), ("starts", [0]), ("ends", [1000]), ("axes", [1]))]
        nodes = [helper.make_node("Reshape", ["images", "flat"], ["f"]),  # views: the compute is a 2 KB copy
                 helper.make_node("Slice", ["f", "starts", "ends", "axes"], ["logits"])]
        graph = helper.make_graph(nodes, "image", [x], [y], consts)
        spec = {"inputs": {"images": ["FP16", [3, 224, 224]]}, "outputs": {"logits": ["FP16", [1000]]}}
    else:
        raise SystemExit(f"--model must be tiny or image, got {kind!r}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return spec


def make_repository(work: Path, kind: str, max_batch: int, instances: int) -> Path:
    import ember

    repo = work / "repo"
    vdir = repo / kind / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{kind}.onnx"
    make_model(kind, onnx_path)
    ember.build(str(onnx_path)).save(str(vdir / "model.engine"))
    (repo / kind / "config.yaml").write_text(
        f"max_batch_size: {max_batch}\ndynamic_batching: {{max_queue_delay_us: 0}}\ninstance_count: {instances}\n")
    return repo


# ---- the server ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(repo: Path, work: Path, staged: bool, prelude: str = "", frontends: int = 0
                 ) -> tuple[subprocess.Popen, int, int]:
    http, grpc = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    boot = (f"{prelude}\n"
            "from ember.runtime.context import ExecutionContext; "
            f"ExecutionContext.emulate_graphs = {staged}; "
            "from ember.cli.main import cli; cli()")
    logf = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", boot, "serve", str(repo), "--http-port", str(http),
                             "--grpc-port", str(grpc), "--log-level", "info", "--frontends", str(frontends)],
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ember serve exited with {proc.returncode}; see {work / 'serve.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, http, grpc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"ember serve was not ready after 120 s; see {work / 'serve.log'}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the front ends of --frontends)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def children_cpu(pid: int) -> dict[int, float]:
    out = {}
    for child in child_pids(pid):
        try:
            out[child] = cpu_seconds(child)
        except OSError:
            continue
    return out


def thread_cpu(pid: int) -> Counter:
    """CPU seconds per thread name (threads of one name summed)."""
    out: Counter = Counter()
    tck = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[_thread_kind(name)] += (int(fields[11]) + int(fields[12])) / tck
    return out


def _thread_kind(name: str) -> str:
    # Python 3.11 does not name its threads for the OS: the event loop and the instances' threads are all
    # "python3" here (py-spy --threads tells them apart); gRPC's C threads have names of their own
    if name.startswith(("python", "pt_main")):
        return "Python threads (event loop, instance threads)"
    return name.rstrip("0123456789_-. ") or name


def served_requests(http: int, model: str) -> tuple[int, dict]:
    doc = get_json(f"http://127.0.0.1:{http}/v2/models/{model}/stats")["model_stats"][0]
    return doc["inference_stats"]["success"]["count"], doc


# ---- one level ----------------------------------------------------------------------------------------------------

def measure_level(model: str, protocol: str, concurrency: int, proc: subprocess.Popen, http: int, grpc: int,
                  args: argparse.Namespace, profile: Path | None) -> dict[str, Any]:
    from ember.serve.perf import PerfTarget, measure

    port = grpc if protocol == "grpc" else http
    procs = min(args.client_processes, concurrency)
    target = PerfTarget(f"127.0.0.1:{port}", model, protocol=protocol, batch_size=1, processes=procs)
    spy = None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        stacks = profile / f"{protocol}-c{concurrency}.txt"
        spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-r", "200", "-d",
                                str(int(args.warmup + args.duration + 1)), "--format", "raw", "--threads",
                                *{"gil": ["--gil"], "idle": ["--idle"], "native": ["--gil", "--native"]}.get(args.profile_mode, []),
                                "-o", str(stacks)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    n0, s0 = served_requests(http, model)
    c0, t0, f0, w0 = cpu_seconds(proc.pid), thread_cpu(proc.pid), children_cpu(proc.pid), time.monotonic()
    r = measure(target, concurrency, args.duration, args.warmup)
    c1, t1, f1, w1 = cpu_seconds(proc.pid), thread_cpu(proc.pid), children_cpu(proc.pid), time.monotonic()
    n1, s1 = served_requests(http, model)
    fe = sum(v - f0.get(k, 0.0) for k, v in f1.items())  # a front end restarted mid-level counts from 0
    if spy is not None:
        spy.wait(30)
    served = max(n1 - n0, 1)
    ns = {k: s1["inference_stats"][k]["ns"] - s0["inference_stats"][k]["ns"]
          for k in ("queue", "compute_input", "compute_infer", "compute_output")}
    runs = s1["execution_count"] - s0["execution_count"]
    row = {"model": model, "protocol": protocol, "concurrency": concurrency, **r.row(), "errors": r.errors,
           "server_requests": n1 - n0, "frontends": args.frontends,
           "server_cpu_s": round(c1 - c0 + fe, 3), "server_cpu_cores": (c1 - c0 + fe) / (w1 - w0),
           "server_cpu_us_per_request": (c1 - c0 + fe) / served * 1e6,
           # --frontends: the engine process (the one that runs the models) and the front ends, apart
           "engine_cpu_us_per_request": (c1 - c0) / served * 1e6, "engine_cpu_cores": (c1 - c0) / (w1 - w0),
           "frontend_cpu_us_per_request": fe / served * 1e6, "frontend_cpu_cores": fe / (w1 - w0),
           "server_thread_cpu_us_per_request": {k: round((t1[k] - t0.get(k, 0.0)) / served * 1e6, 1)
                                                for k in sorted(t1) if t1[k] - t0.get(k, 0.0) > 0},
           "formed_batch": (n1 - n0) / runs if runs else 0.0,
           "server_us_per_request": {k: v / served / 1e3 for k, v in ns.items()}}
    if profile is not None:
        row["profile"] = str(profile / f"{protocol}-c{concurrency}.txt")
        row["profile_top"] = top_frames(profile / f"{protocol}-c{concurrency}.txt", 25)
    return row


def top_frames(path: Path, n: int) -> list[tuple[str, float]]:
    """The frames with the most own (leaf) samples in a py-spy raw profile, as shares of all samples."""
    own: Counter = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        own[stack.split(";")[-1]] += int(count)
    return [(frame, round(c / total, 4)) for frame, c in own.most_common(n)] if total else []


# ---- report ---------------------------------------------------------------------------------------------------

def host_info() -> dict[str, Any]:
    import importlib.util

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": len(os.sched_getaffinity(0)), "cpu": _cpu_model()}
    for mod in ("grpc", "uvicorn", "starlette", "google.protobuf", "httptools", "numpy", "torch"):
        if importlib.util.find_spec(mod.split(".")[0]) is not None:
            try:
                m = __import__(mod, fromlist=["__version__"])
                info[mod] = getattr(m, "__version__", "?")
            except Exception:  # a version string is a nicety
                info[mod] = "?"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(rows: list[dict]) -> None:
    print("| model | path | protocol | frontends | concurrency | served/s | p50 ms | server CPU µs/request "
          "| engine process µs/request | front ends µs/request | server CPU cores | formed batch | client cpu "
          "| failures |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['protocol']} | {r['frontends']} | {r['concurrency']} | "
              f"{r['throughput_infer_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['server_cpu_us_per_request']:,.0f} | "
              f"{r['engine_cpu_us_per_request']:,.0f} | {r['frontend_cpu_us_per_request']:,.0f} | "
              f"{r['server_cpu_cores']:.2f} | {r['formed_batch']:.1f} | {r['client_cpu_cores']:.2f} | "
              f"{r['failures']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--work", default=None, help="repository and server log (default: a temporary folder)")
    ap.add_argument("--model", default="tiny", choices=("tiny", "image"))
    ap.add_argument("--staged", action="store_true", help="the GPU path (staging slots, leases), emulated on the CPU")
    ap.add_argument("--instances", type=int, default=2, help="instance_count of the model")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--protocols", default="grpc,http")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each level")
    ap.add_argument("--client-processes", type=int, default=1,
                    help="ember perf client processes (this machine's cores are shared with the server)")
    ap.add_argument("--frontends", type=int, default=0,
                    help="ember serve --frontends N: N front-end processes and one engine process (0: one process); "
                         "the JSON and table give the engine process's CPU per request and the front ends' apart")
    ap.add_argument("--profile", default=None, help="sample the server with py-spy into this folder")
    ap.add_argument("--profile-mode", default="gil", choices=("gil", "cpu", "idle", "native"),
                    help="gil: the thread holding the GIL (where Python time goes); cpu: threads on a CPU; "
                         "idle: every thread, waiting ones too; native: gil with C frames (Cython, gRPC)")
    ap.add_argument("--server-prelude", default="", help="Python run in the server process before it starts "
                    "(experiments: e.g. 'import sys; sys.setswitchinterval(1e-4)')")
    args = ap.parse_args(argv)

    import tempfile

    t_start = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    repo = make_repository(work, args.model, args.max_batch, args.instances)
    proc, http, grpc = start_server(repo, work, args.staged, args.server_prelude, args.frontends)
    path = "staged (emulated GPU path)" if args.staged else "CPU"
    log(f"ember serve ready (pid {proc.pid}, front ends {child_pids(proc.pid) or 'none'}, HTTP :{http}, "
        f"gRPC :{grpc}, {path}); log {work / 'serve.log'}")
    rows = []
    try:
        for proto in [p.strip() for p in args.protocols.split(",") if p.strip()]:
            for c in [int(x) for x in args.concurrency.split(",")]:
                row = measure_level(args.model, proto, c, proc, http, grpc, args,
                                    Path(args.profile) if args.profile else None)
                row["path"] = "staged" if args.staged else "cpu"
                rows.append(row)
                log(f"{proto} c={c}: {row['throughput_infer_per_s']:,.0f}/s, p50 {row['p50_ms']:.2f} ms, server "
                    f"{row['server_cpu_us_per_request']:,.0f} CPU µs/request ({row['server_cpu_cores']:.2f} cores; "
                    f"engine process {row['engine_cpu_us_per_request']:,.0f}, front ends "
                    f"{row['frontend_cpu_us_per_request']:,.0f}), "
                    f"batch {row['formed_batch']:.1f}, failures {row['failures']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {"config": vars(args), "host": host_info(), "rows": rows, "elapsed_s": time.monotonic() - t_start,
              "server_log_warnings": [line.rstrip() for line in (work / "serve.log").read_text(errors="replace")
                                      .splitlines() if "WARNING" in line or "ERROR" in line][:50]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        log(f"wrote {args.out}")
    print()
    print_table(rows)
    return 1 if any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
