"""The one run path on the user's calls: ``Engine.run`` (numpy in, numpy out), ``ExecutionContext.run``
(numpy) and ``ExecutionContext.run_device`` (device tensors, the context's own output buffers), on the
models of peers.py and a 24-layer MLP, fp16, one GPU, one process.

The bar (issue 9): ``Engine.run`` <= 1.2x ``ExecutionContext.run`` on every model, and ``run_device``
no slower than before (docs/performance.md keeps the earlier figures, measured the same way by
peers.py).

Method: each model is exported to ONNX at fixed shapes (fp32, TorchScript exporter, opset 17) and
built with precision fp16, opt level 3. Each call type is checked against the fp32 torch module
(relative L2 <= 1e-2), warmed up, then timed over >= 50 calls rotating 3 input sets: wall-clock per
call for the numpy paths (what a user waits for: the copies in, the graph, the copies out), CUDA
events on the context's stream for run_device (as peers.py). Medians; p99 in the JSON.

    PYTHONPATH=src python benchmarks/run_path.py --out $OUT/run_path.json [--models resnet50,bert,mlp24]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import peers  # noqa: E402  (model definitions and the ONNX export, shared)


class MLP(torch.nn.Module):
    """The issue's 24-layer MLP: Linear(1024, 1024) + ReLU, 24 times."""

    def __init__(self, width: int = 1024, depth: int = 24):
        super().__init__()
        self.body = torch.nn.Sequential(*[m for _ in range(depth)
                                          for m in (torch.nn.Linear(width, width), torch.nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _mlp_inputs(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 1024, generator=g)}


CASES = {  # name -> (model def, [batch, ...])
    "resnet50": (peers.MODELS["resnet50"], [1, 256]),
    "bert": (peers.MODELS["bert"], [1, 64]),
    "vit": (peers.MODELS["vit"], [1]),
    "mobilenetv2": (peers.MODELS["mobilenetv2"], [1]),
    "gpt2": (peers.MODELS["gpt2"], [1]),
    "mlp24": (peers.ModelDef("mlp24", lambda: peers._unit_scale(MLP()), _mlp_inputs, [(8, "latency")],
                             desc="24 x (Linear 1024 + ReLU)"), [8]),
}


def _stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))], "runs": len(s)}


def _wall(fn: Callable[[int], Any], reps: int, warmup: int = 10) -> dict[str, float]:
    for i in range(warmup):
        fn(i % 3)
    times = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i % 3)
        times.append((time.perf_counter() - t) * 1e3)
    return _stats(times)


def _events(fn: Callable[[int], Any], stream: Any, reps: int, warmup: int = 10) -> dict[str, float]:
    with torch.cuda.stream(stream):
        for i in range(warmup):
            fn(i % 3)
        torch.cuda.synchronize()
        times = []
        for i in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(stream)
            fn(i % 3)
            e.record(stream)
            e.synchronize()
            times.append(s.elapsed_time(e))
    return _stats(times)


def rel_l2(a: Any, b: torch.Tensor) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a.float().cpu()).double()
    b = b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(name: str, md: Any, batch: int, reps: int, tmp: str, device: str = "cuda") -> dict[str, Any]:
    import ember

    g = torch.Generator().manual_seed(0)
    m32 = md.build().eval()
    xs = [md.inputs(batch, g) for _ in range(3)]
    (in_name, _), = xs[0].items()
    with torch.no_grad():
        ref = m32(xs[0][in_name])  # CPU, fp32
    path = os.path.join(tmp, f"{name}_b{batch}.onnx")
    t0 = time.time()
    peers.export_onnx(m32, xs[0][in_name], path, in_name)
    precision = "fp16" if device == "cuda" else "fp32"
    engine = ember.build(path, device=device, precision=precision, opt_level=3)
    build_s = time.time() - t0
    t1 = time.time()  # the same build again: warm timing cache and compiled kernels
    ember.build(path, device=device, precision=precision, opt_level=3)
    rebuild_s = time.time() - t1
    spec = engine.inputs[0]
    out_name = engine.outputs[0].name
    feeds_np = [{spec.name: x[in_name].to(peers._torch_dtype(spec.dtype)).numpy()} for x in xs]
    ctx = engine.create_execution_context()
    dev = [{spec.name: x[in_name].to(peers._torch_dtype(spec.dtype)).to(device)} for x in xs]
    if device == "cuda":
        torch.cuda.synchronize()
    res: dict[str, Any] = {"model": name, "batch": batch, "build_s": build_s, "rebuild_s": rebuild_s,
                           "fp32_layers": len(engine.manifest.get("fp32_layers") or []),
                           "tactics": engine.manifest.get("tactics")}
    errs = {
        "engine.run": rel_l2(engine.run(feeds_np[0])[out_name], ref),
        "context.run": rel_l2(ctx.run(feeds_np[0])[out_name], ref),
        "run_device": rel_l2(ctx.run_device(dev[0])[out_name], ref),
    }
    res["rel_l2"] = errs
    res["graph"] = ctx.capture_report()
    res["engine.run"] = _wall(lambda i: engine.run(feeds_np[i]), reps)
    res["context.run"] = _wall(lambda i: ctx.run(feeds_np[i]), reps)
    run_dev = (lambda i: ctx.run_device(dev[i], reuse_outputs=True))
    res["run_device"] = _events(run_dev, ctx.stream, reps) if device == "cuda" else _wall(run_dev, reps)
    res["engine_over_context"] = res["engine.run"]["median_ms"] / res["context.run"]["median_ms"]
    res["per_s_run_device"] = batch * 1e3 / res["run_device"]["median_ms"]
    return res


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default="run_path.json")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds; later cases are skipped")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (the GPU path emulated)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_path.py measures the GPU path: no CUDA GPU here (--device cpu for a smoke test)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        from ember.runtime.context import ExecutionContext

        ExecutionContext.emulate_graphs = True
    t_start = time.time()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            md, batches = CASES[name]
            for b in batches:
                if time.time() - t_start > args.time_budget:
                    results.append({"model": name, "batch": b, "skipped": "time budget"})
                    continue
                try:
                    r = run_case(name, md, b, args.reps, tmp, args.device)
                except Exception as e:
                    r = {"model": name, "batch": b, "error": f"{type(e).__name__}: {e}",
                         "trace": traceback.format_exc()[-2000:]}
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "trace"}, default=str)[:600], flush=True)
                with open(args.out, "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "results": results}, f, indent=1, default=str)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    print(f"\n{'model':12s} {'b':>4s} {'Engine.run':>11s} {'ctx.run':>9s} {'ratio':>6s} {'run_device':>11s} "
          f"{'graph':>8s} {'relL2':>8s} {'build':>7s} {'warm':>6s}")
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"{r['model']:12s} {r['batch']:>4d}  {r.get('error') or r.get('skipped')}"[:160])
            continue
        one = "one" if r["graph"].get("one_graph") else f"{r['graph'].get('graphs')}+{r['graph'].get('host_steps')}h"
        print(f"{r['model']:12s} {r['batch']:>4d} {r['engine.run']['median_ms']:>9.3f}ms {r['context.run']['median_ms']:>7.3f}ms "
              f"{r['engine_over_context']:>6.2f} {r['run_device']['median_ms']:>9.3f}ms {one:>8s} "
              f"{max(r['rel_l2'].values()):>8.1e} {r['build_s']:>6.1f}s {r['rebuild_s']:>5.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
