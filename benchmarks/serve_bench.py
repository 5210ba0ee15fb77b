"""Serve at engine speed (issue 11): ResNet-50 fp16 and BERT-base fp16 behind `ember serve`, measured
with `ember perf` over gRPC and over HTTP with binary tensors, at concurrency 1 and 64, against
`ember bench` of the same engine files at the batch sizes the server's batcher formed.

Bars (issue 11):
- throughput at concurrency 64: served inferences/s >= 80% of the engine's throughput at the batch
  size the batcher formed (the mean formed batch B = inferences / engine runs of that level; the
  engine's throughput at B is B over the time `ember bench` measured for B's shape bucket, the
  graph a batch of B runs in);
- latency at concurrency 1 over gRPC: served p50 <= `ember bench` batch-1 median latency + 0.3 ms.

Method, in one process plus the server and the load generator's processes, one GPU:
1. models: torchvision's resnet50 (else transformers' ResNet-50) with random weights, images 224x224
   sent as fp16 (``--image-dtype``), logits out; BERT-base (transformers BertConfig(), random weights,
   pooler output) taking input_ids and attention_mask, seq 128. Exported to ONNX (TorchScript
   exporter, opset 17, dynamic batch), built with ``precision=fp16``, one profile batch 1..64 (opt 32),
   saved into a model repository (max_batch_size 64, ``--instances`` per model, ``--delay-us``).
   Exports and engines are kept in ``--work`` and reused by a second run (builds are the slow part).
2. engine: ``ember bench``'s measurement (ember.cli.bench.benchmark: data transfers included, two
   iterations in flight, through the engine's ExecutionContext) at every shape bucket up to 64; and
   the server's own path without the network: ExecutionContext.stage/submit/wait, two in flight.
3. served: ``ember serve`` started on the repository (a subprocess, as users run it); each model,
   protocol and concurrency measured with ember perf's load generator (``--processes`` client
   processes); the server's statistics before and after each level give the batches it formed.
   A level whose client saturated is flagged: its throughput is a floor, not the server's.

    PYTHONPATH=src python benchmarks/serve_bench.py --out $OUT/serve_bench.json [--work DIR]
    PYTHONPATH=src python benchmarks/serve_bench.py --tiny --device cpu --out /tmp/sb.json   # a dry run

Budget: under 8 minutes on an H200 with builder level 1 and a fresh timing cache (two builds are most
of it); ``--work`` on a second run skips the exports and builds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

T0 = time.monotonic()
MAX_BATCH = 64


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


# ---- models -----------------------------------------------------------------------------------------

def _export(module: Any, args: tuple, path: Path, inputs: list[str], output: str) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=[output], opset_version=17,
                          dynamic_axes={**{n: {0: "batch"} for n in inputs}, output: {0: "batch"}}, dynamo=False)


def export_resnet50(path: Path, tiny: bool, image_dtype: str) -> dict[str, Any]:
    import torch

    size = 64 if tiny else 224
    try:
        if tiny:
            raise ImportError
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        source = f"torchvision {torchvision.__version__} resnet50"
    except ImportError:
        from transformers import ResNetConfig, ResNetForImageClassification

        cfg = (ResNetConfig(layer_type="bottleneck", depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                            embedding_size=16, num_labels=10) if tiny else
               ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                            embedding_size=64, num_labels=1000))
        net = ResNetForImageClassification(cfg)
        source = "transformers ResNet" + (" (tiny)" if tiny else "-50")
    dtype = torch.float16 if image_dtype == "fp16" else torch.float32

    class Images(torch.nn.Module):  # images in the wire dtype, fp32 math in the exported graph
        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, images: Any) -> Any:
            out = self.m(images.float())
            return out if isinstance(out, torch.Tensor) else out.logits

    torch.manual_seed(0)
    module = Images(net.eval()).eval()
    if not path.exists():
        _export(module, (torch.randn(2, 3, size, size).to(dtype),), path, ["images"], "logits")
    return {"source": source, "inputs": {"images": ([3, size, size], image_dtype)}, "output": "logits"}


def export_bert(path: Path, tiny: bool) -> dict[str, Any]:
    import torch
    from transformers import BertConfig, BertModel

    seq = 32 if tiny else 128
    cfg = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256) if tiny \
        else BertConfig()

    class Pooled(torch.nn.Module):
        """input_ids and attention_mask in, the pooler output out. The mask goes in as an additive 4-D
        mask: transformers' own mask builder exports as a flat Gather over batch x seq, which keeps a
        model's rows from being proven independent, and with it shape buckets (runtime/buckets.py)."""

        def __init__(self, m: Any):
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            add = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            return self.m(input_ids=input_ids, attention_mask=add).pooler_output

    torch.manual_seed(0)
    module = Pooled(BertModel(cfg, add_pooling_layer=True).eval()).eval()
    if not path.exists():
        ids = torch.randint(1, cfg.vocab_size, (2, seq))
        _export(module, (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"], "pooled")
    return {"source": "transformers BertModel(BertConfig()" + (", tiny" if tiny else "") + "), pooler output",
            "inputs": {"input_ids": ([seq], "int64"), "attention_mask": ([seq], "int64")}, "output": "pooled"}


def feeds_for(spec: dict[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dims, dtype) in spec["inputs"].items():
        shape = (batch, *dims)
        if name == "input_ids":
            out[name] = rng.integers(1, 1000, shape).astype(np.int64)
        elif name == "attention_mask":
            out[name] = np.ones(shape, np.int64)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float16 if dtype == "fp16" else np.float32)
    return out


def build(onnx_path: Path, engine_path: Path, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import ember

    if engine_path.exists():
        log(f"reusing {engine_path}")
        return {"built_s": None, "reused": True}
    t = time.monotonic()
    mx = args.max_batch
    profile = {n: ((1, *d), (max(mx // 2, 1), *d), (mx, *d)) for n, (d, _) in spec["inputs"].items()}
    engine = ember.build(str(onnx_path), device=args.device, precision=args.precision, opt_level=args.opt_level,
                         builder_level=args.builder_level, profiles=[profile])
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine.save(str(engine_path))
    log(f"built {engine_path.name} for {onnx_path.name} in {time.monotonic() - t:.1f} s")
    return {"built_s": time.monotonic() - t, "reused": False}


# ---- the engine alone -----------------------------------------------------------------------------------

def staged_rate(engine: Any, feeds: dict[str, np.ndarray], seconds: float) -> float | None:
    """Samples/s through ExecutionContext.stage/submit/wait with two runs in flight: the server
    instance's path without the network (None where the context is not planned, i.e. on a CPU)."""
    ctx = engine.create_execution_context()
    if not ctx.planned:
        return None
    shapes = {k: (v.shape, v.dtype) for k, v in feeds.items()}
    batch = next(iter(feeds.values())).shape[0]

    def one() -> Any:
        run = ctx.stage(shapes, feeds)
        for k, v in feeds.items():
            run.inputs[k][...] = v
        run.submit()
        return run

    pending = [one()]
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:  # warm-up
        pending.append(one())
        pending.pop(0).wait()
    n, start = 0, time.perf_counter()
    while True:
        pending.append(one())
        pending.pop(0).wait()
        n += 1
        if time.perf_counter() - start >= seconds:
            break
    pending.pop(0).wait()
    return n * batch / (time.perf_counter() - start)


def bench_engine(engine_path: Path, spec: dict[str, Any], sizes: list[int], args: argparse.Namespace) -> dict:
    import ember
    from ember.cli.bench import benchmark

    engine = ember.Engine.load(str(engine_path), device=args.device)
    out: dict[int, dict[str, Any]] = {}
    for b in sizes:
        feeds = feeds_for(spec, b, seed=b)
        r = benchmark(engine, feeds, warmup_ms=200, duration_s=args.bench_s, min_iterations=10)
        out[b] = {"samples_per_s": r["throughput"]["inferences_per_s"] * b, "latency_ms": r["latency_ms"],
                  "compute_ms": r.get("compute_ms"), "one_graph": (r.get("graph") or {}).get("one_graph"),
                  "staged_samples_per_s": staged_rate(engine, feeds, min(args.bench_s, 0.5))}
        log(f"  bench {engine_path.parent.parent.name} b{b}: {out[b]['samples_per_s']:.0f}/s, "
            f"latency p50 {r['latency_ms']['median']:.3f} ms"
            + (f", staged {out[b]['staged_samples_per_s']:.0f}/s" if out[b]["staged_samples_per_s"] else ""))
    del engine
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return out


# ---- the server -------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(repo: Path, work: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, int, int]:
    http, grpc = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
    logf = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from ember.cli.main import cli; cli()", "serve", str(repo),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--cache-dir", str(work / "cache"),
                             "--log-level", "info", "--frontends", str(args.frontends)],
                            stdout=logf, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ember serve exited with {proc.returncode}; see {work / 'serve.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, http, grpc
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"ember serve was not ready after {args.start_timeout} s; see {work / 'serve.log'}")


def batches_formed(before: dict, after: dict) -> dict[str, Any]:
    def hist(doc: dict) -> dict[int, int]:
        return {b["batch_size"]: b["compute_infer"]["count"] for b in doc["batch_stats"]}

    h0, h1 = hist(before), hist(after)
    delta = {b: n - h0.get(b, 0) for b, n in h1.items() if n - h0.get(b, 0) > 0}
    items = after["inference_count"] - before["inference_count"]
    runs = after["execution_count"] - before["execution_count"]
    ns = {k: after["inference_stats"][k]["ns"] - before["inference_stats"][k]["ns"]
          for k in ("queue", "compute_input", "compute_infer", "compute_output", "success")}
    per_req = {k: v / max(items, 1) / 1e3 for k, v in ns.items()}  # µs per inference (compute: per batch item)
    return {"items": items, "runs": runs, "mean": items / runs if runs else 0.0, "histogram": delta,
            "server_us_per_inference": per_req}


def engine_rate_at(bench: dict[int, dict], batch: float) -> tuple[float, int]:
    """The engine's samples/s at a (mean) batch: B over the bench time of B's bucket."""
    from ember.runtime.buckets import bucket_size

    b = max(1, int(round(batch)))
    bucket = min((s for s in bench if s >= bucket_size(b)), default=max(bench))
    seconds_per_run = bucket / bench[bucket]["samples_per_s"]
    return b / seconds_per_run, bucket


def engine_rate_for(bench: dict[int, dict], hist: dict[int, int]) -> float | None:
    """The engine's samples/s on exactly the batches the server ran (each at its bucket's time)."""
    from ember.runtime.buckets import bucket_size

    total_s = items = 0.0
    for b, n in hist.items():
        bucket = min((s for s in bench if s >= bucket_size(b)), default=max(bench))
        total_s += n * bucket / bench[bucket]["samples_per_s"]
        items += n * b
    return items / total_s if total_s else None


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of the server process (the engine process with --frontends) and of its children."""
    kids = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids += _cpu_s(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return _cpu_s(pid), kids


def measure_served(model: str, protocol: str, concurrency: int, http: int, grpc: int,
                   args: argparse.Namespace, server_pid: int = 0) -> dict[str, Any]:
    from ember.serve.perf import PerfTarget, measure

    port = grpc if protocol == "grpc" else http
    procs = 1 if concurrency == 1 else min(args.client_processes, concurrency)
    target = PerfTarget(f"127.0.0.1:{port}", model, protocol=protocol, batch_size=1, processes=procs)
    stats_url = f"http://127.0.0.1:{http}/v2/models/{model}/stats"
    before = get_json(stats_url)["model_stats"][0]
    cpu0, t0 = _server_cpu(server_pid), time.monotonic()
    r = measure(target, concurrency, args.duration, args.warmup)
    cpu1, t1 = _server_cpu(server_pid), time.monotonic()
    after = get_json(stats_url)["model_stats"][0]
    n = max(1, after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"])
    # CPU over the warm-up and the measured level, per request served in it (both from the server's counts)
    cpu = {"engine_process_cpu_cores": round((cpu1[0] - cpu0[0]) / (t1 - t0), 2),
           "frontends_cpu_cores": round((cpu1[1] - cpu0[1]) / (t1 - t0), 2),
           "engine_process_cpu_us_per_request": round((cpu1[0] - cpu0[0]) / n * 1e6, 1),
           "frontends_cpu_us_per_request": round((cpu1[1] - cpu0[1]) / n * 1e6, 1)}
    return {"model": model, "protocol": protocol, **r.row(), "errors": r.errors, "frontends": args.frontends,
            "client_busiest_core": round(r.client_busiest, 3), "formed": batches_formed(before, after), **cpu}


# ---- report -----------------------------------------------------------------------------------------------

def judge(rows: list[dict], bench: dict[str, dict[int, dict]]) -> None:
    for r in rows:
        b = bench[r["model"]]
        rate, bucket = engine_rate_at(b, r["formed"]["mean"])
        r["engine_at_formed"] = {"batch": max(1, int(round(r["formed"]["mean"]))), "bucket": bucket,
                                 "samples_per_s": rate,
                                 "on_the_batches_run": engine_rate_for(b, r["formed"]["histogram"])}
        r["served_over_engine"] = r["throughput_infer_per_s"] / rate if rate else None
        if r["concurrency"] >= 64:
            r["bar"] = "throughput >= 80%"
            r["pass"] = bool(r["served_over_engine"] is not None and r["served_over_engine"] >= 0.8)
        elif r["concurrency"] == 1:
            limit = b[1]["latency_ms"]["median"] + 0.3
            r["bench_b1_p50_ms"] = b[1]["latency_ms"]["median"]
            r["bar"] = f"p50 <= {limit:.3f} ms" + ("" if r["protocol"] == "grpc" else " (the bar is for gRPC)")
            r["pass"] = bool(r["p50_ms"] <= limit)


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':<9} {'proto':<5} {'c':>3} {'served/s':>9} {'p50 ms':>8} {'formed B':>8} {'bucket':>6} "
            f"{'engine/s@B':>10} {'served/eng':>10} {'b1 p50':>7} {'client cpu':>10}  bar")
    print(head)
    print("-" * len(head))
    for r in rows:
        e = r["engine_at_formed"]
        sat = " SATURATED" if r["client_saturated"] else ""
        b1 = f"{r['bench_b1_p50_ms']:.3f}" if "bench_b1_p50_ms" in r else ""
        ratio = f"{r['served_over_engine']:.0%}" if r["served_over_engine"] is not None else "-"
        verdict = ("PASS" if r["pass"] else "FAIL") if "pass" in r else ""
        print(f"{r['model']:<9} {r['protocol']:<5} {r['concurrency']:>3} {r['throughput_infer_per_s']:>9.0f} "
              f"{r['p50_ms']:>8.3f} {r['formed']['mean']:>8.1f} {e['bucket']:>6} {e['samples_per_s']:>10.0f} "
              f"{ratio:>10} {b1:>7} {r['client_cpu_cores']:>5.2f}/{r['client_busiest_core']:.2f}{sat}  "
              f"{r.get('bar', '')} {verdict}")
        if r["failures"]:
            print(f"{'':>9} {r['failures']} failures: {r['errors']}")


def host(device: str) -> dict[str, Any]:
    import importlib.util

    import torch

    from ember.runtime.engine import host_info

    info = host_info()
    info["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["http_parser"] = "httptools" if importlib.util.find_spec("httptools") else "h11 (pure Python)"
    info["device"] = device
    for mod in ("grpc", "uvicorn", "starlette", "transformers", "torchvision", "onnx"):
        spec = importlib.util.find_spec(mod)
        if spec is not None:
            try:
                info[mod] = __import__(mod).__version__
            except Exception:  # a version string is a nicety
                info[mod] = "?"
    info["torch"] = torch.__version__
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="write the results here (JSON)")
    ap.add_argument("--work", default=None, help="exports, engines, repository and server log (kept for reuse)")
    ap.add_argument("--models", default="resnet50,bert")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--builder-level", type=int, default=1, help="tuning effort of the builds (2 is ember's default)")
    ap.add_argument("--image-dtype", choices=("fp16", "fp32"), default="fp16", help="ResNet-50 input on the wire")
    ap.add_argument("--max-batch", type=int, default=MAX_BATCH)
    ap.add_argument("--instances", type=int, default=2, help="instance_count of each model")
    ap.add_argument("--delay-us", type=int, default=0, help="max_queue_delay_us of each model")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--protocols", default="grpc,http")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per level")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each level")
    ap.add_argument("--bench-s", type=float, default=1.0, help="ember bench seconds per batch size")
    ap.add_argument("--client-processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--frontends", default="0", help="ember serve --frontends (N or auto; 0: one process)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a dry run of the script, e.g. on a CPU)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.max_batch = min(args.max_batch, 8)

    import tempfile

    from ember.runtime.buckets import bucket_size

    work = Path(args.work or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    repo = work / "repo"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    exporters: dict[str, Callable[[Path], dict]] = {
        "resnet50": lambda p: export_resnet50(p, args.tiny, args.image_dtype),
        "bert": lambda p: export_bert(p, args.tiny),
    }
    result: dict[str, Any] = {"config": vars(args), "host": host(args.device), "models": {}, "bench": {}, "served": []}
    log(f"work folder {work}; host {result['host'].get('gpu') or result['host']['platform']}")

    sizes = sorted({bucket_size(n) for n in range(1, args.max_batch + 1)})
    for m in models:
        onnx_path = work / f"{m}{'-tiny' if args.tiny else ''}.onnx"
        t = time.monotonic()
        spec = exporters[m](onnx_path)
        log(f"{m}: {spec['source']} -> {onnx_path.name} ({time.monotonic() - t:.1f} s)")
        engine_path = repo / m / "1" / "model.engine"
        info = build(onnx_path, engine_path, spec, args)
        (repo / m / "config.yaml").write_text(
            f"max_batch_size: {args.max_batch}\ndynamic_batching: {{max_queue_delay_us: {args.delay_us}}}\n"
            f"instance_count: {args.instances}\n")
        result["models"][m] = {**spec, **info, "engine": str(engine_path)}
        result["bench"][m] = bench_engine(engine_path, spec, sizes, args)
        log(f"{m}: engine measured at batches {sizes}")

    proc, http, grpc = start_server(repo, work, args)
    log(f"ember serve ready (HTTP :{http}, gRPC :{grpc}); log {work / 'serve.log'}")
    try:
        for m in models:
            for proto in [p.strip() for p in args.protocols.split(",")]:
                for c in [int(x) for x in args.concurrency.split(",")]:
                    row = measure_served(m, proto, c, http, grpc, args, proc.pid)
                    result["served"].append(row)
                    log(f"{m} {proto} c={c}: {row['throughput_infer_per_s']:.0f}/s, p50 {row['p50_ms']:.3f} ms, "
                        f"formed batch {row['formed']['mean']:.1f}, client cpu {row['client_cpu_cores']:.2f}, "
                        f"server cpu {row['engine_process_cpu_cores']:.2f} + {row['frontends_cpu_cores']:.2f} "
                        f"(front ends) cores"
                        f"{' (SATURATED)' if row['client_saturated'] else ''}, failures {row['failures']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    judge(result["served"], result["bench"])
    keep = ("ready", "captured batch buckets", "no shape buckets", "WARNING", "ERROR", "Traceback")
    result["server_log"] = [line.rstrip() for line in (work / "serve.log").read_text(errors="replace").splitlines()
                            if any(k in line for k in keep)][:200]
    result["elapsed_s"] = time.monotonic() - T0
    print()
    print_table(result["served"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"\nwrote {args.out} ({result['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
