"""`ember bench model.engine|model.onnx`: throughput, latency and a per-layer profile, like trtexec.

GPU timing: each iteration records CUDA events on the execution context's stream around the
host-to-device copies, the compute and the device-to-host copies; at most two iterations are in
flight, as trtexec overlaps them. Latency is the event span of one iteration (copies included
unless --no-data-transfers); throughput is iterations over the wall time of the timed loop;
enqueue time is the host time of the compute launch. On the CPU every call is synchronous, so
latency, compute and enqueue time are one number.
"""
from __future__ import annotations

import json
import time
from typing import Any, Optional

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from ..errors import EmberError, InputError
from .common import load_engine_or_model, make_console, make_feeds, parse_shapes

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


@click.command("bench")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--warmup", "warmup_ms", type=click.FloatRange(0), default=200.0, show_default=True,
              help="Warm-up before timing, in milliseconds.")
@click.option("--duration", "duration_s", type=click.FloatRange(0), default=3.0, show_default=True,
              help="Time at least this many seconds.")
@click.option("--iterations", "min_iterations", type=click.IntRange(1), default=10, show_default=True,
              help="Time at least this many inferences.")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="Set the first dynamic dim of every input to N; also reports samples/s.")
@click.option("--shapes", multiple=True, metavar="NAME:DxDxD", help="Shape of an input with dynamic dims.")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=FILE.npy|NAME=random|FILE.npz",
              help="An input (repeatable). Inputs not given are random (never zeros).")
@click.option("--cuda-graph/--no-cuda-graph", default=True, show_default=True,
              help="Replay one CUDA graph per input shape (GPU only).")
@click.option("--no-data-transfers", is_flag=True, help="Time compute only: inputs and outputs stay on the device.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of an ONNX model built in memory [default: fp32].")
@click.option("--opt-level", type=click.IntRange(0, 3), default=None, help="Optimization level of an ONNX build.")
@click.option("--dump-profile", is_flag=True, help="Also print per-layer times of an eager profiled run.")
@click.option("--profile-runs", type=click.IntRange(1), default=10, show_default=True,
              help="Profiled runs per layer (median).")
@click.option("--export-json", type=click.Path(dir_okay=False), help="Write every number to this JSON file.")
@click.option("--seed", default=0, show_default=True, help="Seed of random inputs.")
@click.option("--allow-fallback", is_flag=True,
              help="Run layers whose built kernels cannot run here with the reference kernels (listed).")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Load the engine only if it is signed with the key in KEYFILE (ember build --sign-key).")
def bench_cmd(model: str, warmup_ms: float, duration_s: float, min_iterations: int, batch: Optional[int],
              shapes: tuple[str, ...], inputs: tuple[str, ...], cuda_graph: bool, no_data_transfers: bool,
              device: str, precision: Optional[str], opt_level: Optional[int], dump_profile: bool,
              profile_runs: int, export_json: Optional[str], seed: int, allow_fallback: bool,
              verify_key: Optional[str]) -> None:
    """Measure throughput and latency of an engine (or an ONNX model, built in memory)."""
    console = make_console()
    t0 = time.perf_counter()
    shape_map = parse_shapes(shapes)
    engine = _load(model, device, precision, opt_level, shape_map, verify_key, allow_fallback)
    load_s = time.perf_counter() - t0
    samples_per_inference = None
    if batch is not None:
        shape_map, samples_per_inference = batch_shapes(engine, batch, shape_map)
    feeds = make_feeds(engine, inputs, shape_map, seed)
    result = benchmark(engine, feeds, warmup_ms=warmup_ms, duration_s=duration_s, min_iterations=min_iterations,
                       cuda_graph=cuda_graph, data_transfers=not no_data_transfers)
    result.update(model=model, load_or_build_s=load_s, batch=samples_per_inference, seed=seed,
                  engine={k: engine.manifest.get(k) for k in ("precision", "opt_level", "backend", "nodes_in",
                                                              "nodes_out", "ember_version")},
                  inputs={k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                          for k, v in feeds.items()})
    result["config"] = {"warmup_ms": warmup_ms, "duration_s": duration_s, "min_iterations": min_iterations,
                        "cuda_graph": cuda_graph, "data_transfers": not no_data_transfers, "shapes":
                        {k: list(v) for k, v in shape_map.items()}, "device": engine.device}
    tput = result["throughput"]
    if samples_per_inference:
        tput["samples_per_s"] = tput["inferences_per_s"] * samples_per_inference
    if dump_profile:
        from ..runtime.profiler import profile_layers

        result["profile"] = profile_layers(engine, feeds, runs=profile_runs).to_json()
    from ..runtime.engine import host_info

    result["host"] = host_info()
    print_report(console, result)
    if export_json:
        with open(export_json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        console.print(f"wrote {export_json}")


def _load(model: str, device: str, precision: Optional[str], opt_level: Optional[int],
          shapes: "dict[str, tuple[int, ...]] | None" = None, verify_key: Optional[str] = None,
          allow_fallback: bool = False):
    from .common import _is_engine
    from ..runtime.format import MANIFEST

    if _is_engine(model, MANIFEST):
        if precision is not None or opt_level is not None:
            raise EmberError(f"{model} is a built engine: its precision and optimization level were fixed when "
                             "it was built. Drop --precision/--opt-level, or bench the ONNX model instead")
        return load_engine_or_model(model, device=device, verify_key=verify_key, allow_fallback=allow_fallback)
    if verify_key:
        raise EmberError(f"--verify-key checks engine files, and {model} is not one: an ONNX model is built here, "
                         "not loaded. Drop --verify-key, or bench an engine built with --sign-key")
    import ember

    # an ONNX model benched at given shapes is built for them, as trtexec --shapes does
    kwargs: dict[str, Any] = {"device": device, "precision": precision or "fp32", "shapes": dict(shapes or {})}
    if opt_level is not None:
        kwargs["opt_level"] = opt_level
    return ember.build(model, **kwargs)


def batch_shapes(engine, batch: int, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], int]:
    """--batch N: the first dynamic dim of every input becomes N (other dynamic dims 1 unless --shapes
    names them). A model with static shapes only accepts its own batch (the first input's first dim)."""
    out = dict(shapes)
    dynamic = False
    for spec in engine.inputs:
        dims = list(spec.shape)
        first = next((i for i, d in enumerate(dims) if isinstance(d, str)), None)
        if first is None:
            continue
        dynamic = True
        if spec.name in out:
            continue  # --shapes wins
        out[spec.name] = tuple(batch if i == first else (d if isinstance(d, int) else 1) for i, d in enumerate(dims))
    if not dynamic:
        static = next((s.shape[0] for s in engine.inputs if s.shape), None)
        if static != batch:
            raise InputError(f"--batch {batch}: every input of this model has static dims "
                             f"({', '.join(str(s) for s in engine.inputs)}); its batch is {static}. "
                             "Export the model with a dynamic batch dim, or drop --batch")
    return out, batch


# -- measurement --------------------------------------------------------------------------------------
def benchmark(engine, feeds: dict[str, np.ndarray], *, warmup_ms: float = 200.0, duration_s: float = 3.0,
              min_iterations: int = 10, cuda_graph: bool = True, data_transfers: bool = True) -> dict[str, Any]:
    """Time ``engine`` on ``feeds`` through its execution context. Returns a JSON-able dict."""
    from ..runtime.profiler import execution_context

    ctx = execution_context(engine, cuda_graph=cuda_graph)
    if engine.device == "cuda":
        res = _bench_cuda(engine, ctx, feeds, warmup_ms, duration_s, min_iterations, data_transfers)
    else:
        res = _bench_cpu(engine, ctx, feeds, warmup_ms, duration_s, min_iterations, data_transfers)
    res["context"] = type(ctx).__name__
    res["cuda_graph"] = bool(getattr(ctx, "cuda_graph", cuda_graph)) and engine.device == "cuda"
    res["device"] = engine.device
    report = getattr(ctx, "capture_report", None)
    if report is not None:
        try:
            res["graph"] = report()
        except Exception as e:  # a report is an extra; the timings stand
            res["graph"] = {"error": f"{type(e).__name__}: {e}"}
    return res


def _bench_cpu(engine, ctx, feeds, warmup_ms, duration_s, min_iterations, data_transfers) -> dict[str, Any]:
    import torch

    from ..runtime.profiler import device_feeds, device_runner, summarize_ms

    tensors = device_feeds(engine, feeds) if not data_transfers else None
    run_device = device_runner(ctx)
    call = (lambda: ctx.run(feeds)) if data_transfers else (lambda: run_device(tensors))
    with torch.inference_mode():
        t = time.perf_counter()
        call()
        first_ms = (time.perf_counter() - t) * 1e3
        end = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < end:
            call()
        times: list[float] = []
        start = time.perf_counter()
        stop = start + duration_s
        while True:
            t = time.perf_counter()
            call()
            now = time.perf_counter()
            times.append((now - t) * 1e3)
            if now >= stop and len(times) >= min_iterations:
                break
        wall = time.perf_counter() - start
    lat = summarize_ms(times)
    return {"first_run_ms": first_ms, "iterations": len(times), "wall_s": wall,
            "throughput": {"inferences_per_s": len(times) / wall},
            "latency_ms": lat, "enqueue_ms": lat, "compute_ms": lat, "h2d_ms": None, "d2h_ms": None}


def _bench_cuda(engine, ctx, feeds, warmup_ms, duration_s, min_iterations, data_transfers) -> dict[str, Any]:
    import torch

    from ..runtime.profiler import device_feeds, device_runner, summarize_ms

    run_device = device_runner(ctx)
    stream = getattr(ctx, "stream", None) or torch.cuda.current_stream()
    with torch.inference_mode(), torch.cuda.stream(stream):
        dev_in = device_feeds(engine, feeds)
        bind = getattr(ctx, "input_buffers", None)
        if bind is not None:  # the context's own static input buffers: copies land where the graph reads
            bound = bind(dev_in)
            for k, t in bound.items():
                t.copy_(dev_in[k])
            dev_in = bound
        pinned = {k: torch.from_numpy(np.ascontiguousarray(feeds[k])).pin_memory()
                  for k, v in dev_in.items() if isinstance(v, torch.Tensor) and k in feeds}
        host_out: dict[str, torch.Tensor] = {}

        def one(marks: Optional[list]) -> float:
            if marks:
                marks[0].record(stream)
            if data_transfers:
                for k, h in pinned.items():
                    dev_in[k].copy_(h, non_blocking=True)
            if marks:
                marks[1].record(stream)
            t = time.perf_counter()
            outs = run_device(dev_in)
            enq = time.perf_counter() - t
            if marks:
                marks[2].record(stream)
            if data_transfers:
                for k, v in outs.items():
                    if isinstance(v, torch.Tensor):
                        if k not in host_out:
                            host_out[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                        host_out[k].copy_(v, non_blocking=True)
            if marks:
                marks[3].record(stream)
            return enq * 1e3

        torch.cuda.synchronize()
        t = time.perf_counter()
        one(None)
        torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t) * 1e3
        end = time.perf_counter() + warmup_ms / 1e3
        while time.perf_counter() < end:
            one(None)
        torch.cuda.synchronize()
        marks_all: list[list] = []
        enqueue: list[float] = []
        start = time.perf_counter()
        stop = start + duration_s
        while True:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            enqueue.append(one(marks))
            marks_all.append(marks)
            if len(marks_all) > 2:  # at most two iterations in flight
                marks_all[-3][3].synchronize()
            if time.perf_counter() >= stop and len(marks_all) >= min_iterations:
                break
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    lat = [m[0].elapsed_time(m[3]) for m in marks_all]
    res = {"first_run_ms": first_ms, "iterations": len(marks_all), "wall_s": wall,
           "throughput": {"inferences_per_s": len(marks_all) / wall},
           "latency_ms": summarize_ms(lat), "enqueue_ms": summarize_ms(enqueue),
           "compute_ms": summarize_ms([m[1].elapsed_time(m[2]) for m in marks_all]),
           "h2d_ms": None, "d2h_ms": None}
    if data_transfers:
        res["h2d_ms"] = summarize_ms([m[0].elapsed_time(m[1]) for m in marks_all])
        res["d2h_ms"] = summarize_ms([m[2].elapsed_time(m[3]) for m in marks_all])
    return res


# -- report -------------------------------------------------------------------------------------------
def print_report(console: Console, r: dict[str, Any]) -> None:
    cfg = r["config"]
    gpu = r["device"] == "cuda"
    head = (f"{r['model']} on {r['device']}"
            + (f" ({r['host']['gpu']['name']})" if gpu and r.get("host", {}).get("gpu") else "")
            + f" — precision {r['engine'].get('precision') or '?'}, "
            + ", ".join(f"{k} {'x'.join(map(str, v['shape'])) or 'scalar'}" for k, v in r["inputs"].items()))
    console.print(head)
    console.print(f"{r['iterations']} iterations in {r['wall_s']:.2f} s; first run {r['first_run_ms']:.1f} ms; "
                  f"context {r['context']}{', CUDA graph' if r['cuda_graph'] else ''}"
                  f"{'' if cfg['data_transfers'] else ', no data transfers'}")
    graph = r.get("graph") or {}
    if gpu and graph and "error" not in graph:
        if graph.get("one_graph"):
            console.print("Execution: one CUDA graph" + (f" (padded to batch bucket {graph['bucket']})"
                                                           if graph.get("bucket") else ""))
        else:
            why = "; ".join(f"{b['node']} ({b['op']}): {b['reason']}" for b in graph.get("breaks", [])[:4])
            console.print(f"Execution: {graph.get('graphs', 0)} CUDA graph(s), {graph.get('host_steps', 0)} host "
                          f"step(s) between them{'; broken by ' + why if why else ''}", markup=False)
        for note in graph.get("notes", [])[:4]:
            console.print(f"  note: {note}", markup=False)
    tput = r["throughput"]
    line = f"Throughput: {tput['inferences_per_s']:.1f} inferences/s"
    if tput.get("samples_per_s"):
        line += f", {tput['samples_per_s']:.1f} samples/s (batch {r['batch']})"
    console.print(line)
    table = Table(title="Timing (ms)", title_justify="left")
    cols = ("min", "mean", "median", "p90", "p95", "p99", "max")
    table.add_column("")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [("latency", "latency_ms")]
    if gpu:
        rows += [("enqueue (host)", "enqueue_ms"), ("H2D", "h2d_ms"), ("GPU compute", "compute_ms"),
                 ("D2H", "d2h_ms")]
    for label, key in rows:
        s = r.get(key)
        if s:
            table.add_row(label, *(f"{s[c]:.4f}" for c in cols))
    console.print(table)
    if not gpu:
        console.print("CPU: runs are synchronous, so latency = compute = enqueue time; no transfers to time.")
    prof = r.get("profile")
    if prof:
        print_profile(console, prof)


def print_profile(console: Console, prof: dict[str, Any]) -> None:
    t = Table(title=f"Per-layer profile ({prof['device']}, median of {prof['runs']} eager runs)",
              title_justify="left")
    for c, j in (("#", "right"), ("layer", "left"), ("op", "left"), ("tactic", "left"), ("time ms", "right"),
                 ("%", "right")):
        t.add_column(c, justify=j)
    for layer in prof["layers"]:
        t.add_row(str(layer["index"]), layer["name"], layer["op"], layer["tactic"], f"{layer['ms']:.4f}",
                  f"{layer['percent']:.1f}")
    t.add_row("", "total (sum of layers)", "", "", f"{prof['layers_total_ms']:.4f}", "100.0")
    console.print(t)
    ops = Table(title="By op", title_justify="left")
    for c, j in (("op", "left"), ("layers", "right"), ("time ms", "right"), ("%", "right")):
        ops.add_column(c, justify=j)
    for op, d in prof["by_op"].items():
        ops.add_row(op, str(d["count"]), f"{d['ms']:.4f}", f"{d['percent']:.1f}")
    console.print(ops)
    console.print(f"profiled run: {prof['run_ms']:.4f} ms end to end (with timing overhead); "
                  f"{prof['folded_nodes']} shape nodes folded on the host, not timed")
