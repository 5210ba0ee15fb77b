"""ember against its peers on one GPU, in one process: torch eager, torch.compile (default and
reduce-overhead) and ember, on ResNet-50, BERT-base, ViT-B/16, MobileNetV2 and GPT-2 prefill.

Models are built from configs with random weights (seed 0). The torch peers run the fp16 module
(eval, channels_last for conv nets); ember builds the fp32 ONNX export (TorchScript exporter,
opset 17, fixed shapes per case) with precision='fp16', opt_level=3 and runs through its
ExecutionContext (CUDA graph per input signature, run_device: no host copies). Every candidate
is first checked against the fp32 torch reference (TF32 off) on the same inputs: relative L2
<= 1e-2, or it is reported WRONG and never counted as a win. Then: warm-up, median and p99 of
>= 50 runs timed with CUDA events on the candidate's stream, rotating 3 input sets. Batch-1
cases report latency, large batches throughput (batch / median time). Kernel launches per
inference are counted with torch.profiler (CUDA kernel events, runs without CUDA graphs) on
ResNet-50 b1 and BERT b1.

    PYTHONPATH=src python benchmarks/peers.py --models resnet50,bert --out $OUT/peers.json
    PYTHONPATH=src python benchmarks/peers.py --device cpu --quick --models resnet50 --no-compile

A failing candidate (export, build, torch.compile...) is reported and the rest go on. Results
are written to --out after every case, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

TOL = 1e-2
ROTATE = 3
KERNEL_COUNT_CASES = {("resnet50", 1), ("bert", 1)}
ALL_MODELS = ("resnet50", "bert", "vit", "mobilenetv2", "gpt2")
PEERS = ("eager", "compile-default", "compile-ro")
CANDIDATES = PEERS + ("ember",)


# -- models -------------------------------------------------------------------------------------------
@dataclass
class ModelDef:
    name: str
    build: Callable[[], torch.nn.Module]  # fp32 module returning one tensor
    inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]  # batch -> named fp32/int64 CPU tensors
    cases: list[tuple[int, str]]  # (batch, "latency" | "throughput")
    conv: bool = False  # channels_last for the torch peers
    desc: str = ""


class Logits(torch.nn.Module):
    """A Hugging Face model as a one-input, one-output module (what the ONNX export and peers call)."""

    def __init__(self, m: torch.nn.Module, arg: str, field_name: str, ones_mask: bool = False):
        super().__init__()
        self.m, self.arg, self.field_name, self.ones_mask = m, arg, field_name, ones_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {self.arg: x}
        if self.ones_mask:  # no padding; also keeps transformers off its packed-sequence check (aten::diff)
            kwargs["attention_mask"] = torch.ones_like(x)
        out = self.m(**kwargs)
        return getattr(out, self.field_name) if not isinstance(out, torch.Tensor) else out


def _images(batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=g)}


def _tokens(seq: int, vocab: int) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    return lambda batch, g: {"input_ids": torch.randint(1, vocab, (batch, seq), generator=g)}


def _resnet50() -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                       embedding_size=64, num_labels=1000)
    return Logits(ResNetForImageClassification(cfg), "pixel_values", "logits")


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return Logits(BertModel(BertConfig(), add_pooling_layer=False), "input_ids", "last_hidden_state")


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    return Logits(ViTModel(ViTConfig(), add_pooling_layer=False), "pixel_values", "last_hidden_state")


def _mobilenetv2_raw() -> torch.nn.Module:
    try:
        import torchvision

        return torchvision.models.mobilenet_v2(weights=None)
    except ImportError:
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

        return Logits(MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000, tf_padding=False)),
                      "pixel_values", "logits")


def _mobilenetv2() -> torch.nn.Module:
    """MobileNetV2 with unit-scale random weights: the default init gives logits near 1e-26, which
    underflow in fp16 and make every candidate 'wrong' against the fp32 reference."""
    return _unit_scale(_mobilenetv2_raw())


def _unit_scale(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:  # variance preserving through depth
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return Logits(GPT2LMHeadModel(GPT2Config(use_cache=False)), "input_ids", "logits", ones_mask=True)


MODELS = {
    "resnet50": ModelDef("resnet50", _resnet50, _images, [(1, "latency"), (256, "throughput")], conv=True,
                         desc="ResNet-50 (transformers ResNetConfig), 224x224, logits"),
    "bert": ModelDef("bert", _bert, _tokens(128, 30522), [(1, "latency"), (64, "throughput")],
                     desc="BERT-base, seq 128, last hidden state"),
    "vit": ModelDef("vit", _vit, _images, [(1, "latency"), (64, "throughput")],
                    desc="ViT-B/16, 224x224, last hidden state"),
    "mobilenetv2": ModelDef("mobilenetv2", _mobilenetv2, _images, [(1, "latency")], conv=True,
                            desc="MobileNetV2 (torchvision, else transformers), 224x224, logits"),
    "gpt2": ModelDef("gpt2", _gpt2, _tokens(512, 50257), [(1, "latency")],
                     desc="GPT-2 (124M) prefill, 512 tokens, logits"),
}


# -- measurement --------------------------------------------------------------------------------------
@dataclass
class Result:
    status: str = "skipped"  # ok | WRONG | FAILED | skipped
    rel_l2: Optional[float] = None
    median_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    min_ms: Optional[float] = None
    runs: int = 0
    per_s: Optional[float] = None  # samples per second at the median
    setup_s: Optional[float] = None  # compile time (torch.compile) or export + build time (ember)
    kernels_per_inference: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if o.shape != r.shape:
        return float("inf")
    d = torch.linalg.vector_norm(o - r).item()
    n = torch.linalg.vector_norm(r).item()
    v = d / n if n > 0 else d
    return v if math.isfinite(v) else float("inf")


def time_runs(fn: Callable[[int], Any], device: str, warmup: int, reps: int,
              stream: "torch.cuda.Stream | None" = None) -> list[float]:
    """Milliseconds of ``reps`` calls fn(i) (i picks the rotated input set) after ``warmup`` calls."""
    for i in range(warmup):
        fn(i % ROTATE)
    times = []
    if device == "cuda":
        stream = stream or torch.cuda.current_stream()
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            for i in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(stream)
                fn(i % ROTATE)
                e.record(stream)
                e.synchronize()
                times.append(s.elapsed_time(e))
    else:
        for i in range(reps):
            t = time.perf_counter()
            fn(i % ROTATE)
            times.append((time.perf_counter() - t) * 1e3)
    return times


def count_kernels(fn: Callable[[int], Any], n: int = 5) -> float:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            fn(i % ROTATE)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels) / n


def fill_stats(r: Result, times: list[float], batch: int) -> None:
    s = sorted(times)
    r.runs = len(s)
    r.median_ms = float(np.median(s))
    r.p99_ms = s[max(0, math.ceil(0.99 * len(s)) - 1)]
    r.mean_ms = float(np.mean(s))
    r.min_ms = s[0]
    r.per_s = batch / r.median_ms * 1e3


# -- the benchmark ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.t_start = time.time()
        self.cases: list[dict[str, Any]] = []
        self.tmp = tempfile.mkdtemp(prefix="ember_peers_")
        self.low = torch.float16 if self.device == "cuda" else torch.float32
        self.precision = args.precision or ("fp16" if self.device == "cuda" else "fp32")
        quick = args.quick
        self.warmup = 5 if quick else 20
        self.reps = (5 if quick else 20) if self.device == "cpu" else (50 if quick else 100)

    def over_budget(self) -> bool:
        return time.time() - self.t_start > self.args.time_budget

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t_start:7.1f}s] {msg}", flush=True)

    def run_model(self, md: ModelDef) -> None:
        torch.manual_seed(0)
        t0 = time.time()
        with torch.device("cpu"):
            m32 = md.build().eval()
        m32 = m32.to(self.device)
        m16 = copy.deepcopy(m32).to(self.low).eval()
        if md.conv and self.device == "cuda":
            m16 = m16.to(memory_format=torch.channels_last)
        self.log(f"{md.name}: {md.desc}; built in {time.time() - t0:.1f}s, "
                 f"{sum(p.numel() for p in m32.parameters()) / 1e6:.1f}M parameters")
        for batch, metric in md.cases:
            if self.device == "cpu":
                batch = min(batch, self.args.cpu_max_batch)
            case = {"model": md.name, "batch": batch, "metric": metric, "desc": md.desc,
                    "candidates": {}, "ratio": None}
            self.cases.append(case)
            try:
                self.run_case(md, m32, m16, batch, metric, case)
            except Exception as e:  # the reference or inputs failed: nothing to compare against
                case["error"] = f"{type(e).__name__}: {e}"
                self.log(f"{md.name} b{batch}: case failed: {case['error']}")
                traceback.print_exc()
            self.save()
            self.free()
        del m32, m16
        self.free()

    def free(self) -> None:
        gc.collect()  # contexts hold CUDA-graph memory pools
        try:
            torch._dynamo.reset()
        except Exception:
            pass
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def run_case(self, md: ModelDef, m32, m16, batch: int, metric: str, case: dict) -> None:
        g = torch.Generator().manual_seed(batch)
        sets = [md.inputs(batch, g) for _ in range(ROTATE)]  # CPU, fp32 / int64
        (in_name,) = sets[0].keys()
        x32 = [s[in_name].to(self.device) for s in sets]
        x16 = [x.to(self.low) if x.is_floating_point() else x for x in x32]
        if md.conv and self.device == "cuda":
            x16 = [x.contiguous(memory_format=torch.channels_last) for x in x16]
        with torch.inference_mode():
            ref = m32(x32[0]).float().clone()
        self.log(f"{md.name} b{batch}: reference {tuple(ref.shape)}, |ref| {ref.norm().item():.4g}")
        count = self.device == "cuda" and (md.name, batch) in KERNEL_COUNT_CASES
        res: dict[str, Result] = {}

        def attempt(name: str, setup: Callable[[], tuple[Callable[[int], Any], Any, Optional[float]]]) -> None:
            r = res[name] = Result()
            if self.over_budget():
                r.notes.append(f"skipped: past --time-budget {self.args.time_budget:.0f}s")
                return
            try:
                fn, stream, setup_s = setup()
                r.setup_s = setup_s
                r.notes += getattr(fn, "notes", [])
                with torch.inference_mode():
                    # read before the next call: graph-owned outputs (reduce-overhead, ember) get overwritten
                    r.rel_l2 = rel_l2(fn(0), ref)
                    if not r.rel_l2 <= TOL:
                        r.status = "WRONG"
                        self.log(f"{md.name} b{batch} {name}: WRONG, rel L2 {r.rel_l2:.3g} > {TOL}")
                        return
                    fill_stats(r, time_runs(fn, self.device, self.warmup, self.reps, stream), batch)
                    r.status = "ok"
                    if count and name != "compile-ro":
                        try:
                            r.kernels_per_inference = count_kernels(getattr(fn, "no_graph", fn))
                        except Exception as e:  # the timing stands; only the count is missing
                            r.notes.append(f"kernel count failed: {type(e).__name__}: {str(e)[:200]}")
                self.log(f"{md.name} b{batch} {name}: rel L2 {r.rel_l2:.2e}, median {r.median_ms:.3f} ms, "
                         f"p99 {r.p99_ms:.3f} ms, {r.per_s:.1f}/s"
                         + (f", setup {r.setup_s:.1f}s" if r.setup_s is not None else "")
                         + (f", {r.kernels_per_inference:.0f} kernels/inf" if r.kernels_per_inference else ""))
            except Exception as e:
                r.status = "FAILED"
                r.notes.append(f"{type(e).__name__}: {str(e)[:500]}")
                self.log(f"{md.name} b{batch} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
                if self.args.verbose:
                    traceback.print_exc()
            finally:
                if name.startswith("compile"):
                    self.free()

        attempt("eager", lambda: (lambda i: m16(x16[i]), None, None))
        for mode in ("default", "reduce-overhead"):
            key = "compile-default" if mode == "default" else "compile-ro"
            if self.args.no_compile:
                res[key] = Result(notes=["skipped: --no-compile"])
                continue
            if mode == "reduce-overhead" and metric == "throughput" and self.args.quick:
                res[key] = Result(notes=["skipped: --quick skips reduce-overhead at large batch"])
                continue
            attempt(key, lambda mode=mode: self.compiled(m16, x16, mode))
        attempt("ember", lambda: self.ember(md, m32, x32, batch))
        for name, r in res.items():
            case["candidates"][name] = r.__dict__
        case["ratio"] = speedup(res, metric)

    def compiled(self, m16, x16, mode: str):
        torch._dynamo.reset()
        t0 = time.time()
        cm = torch.compile(m16, mode=None if mode == "default" else mode, dynamic=False)
        with torch.inference_mode():
            for i in range(3):  # reduce-overhead records its graph on the 2nd-3rd call
                cm(x16[i % ROTATE])
        if self.device == "cuda":
            torch.cuda.synchronize()
        setup_s = time.time() - t0

        return (lambda i: cm(x16[i])), None, setup_s

    def ember(self, md: ModelDef, m32, x32: list, batch: int):
        import ember
        from ember.runtime.profiler import device_runner, execution_context

        t0 = time.time()
        path = os.path.join(self.tmp, f"{md.name}_b{batch}.onnx")
        export_onnx(m32, x32[0], path, "pixel_values" if x32[0].is_floating_point() else "input_ids")
        t_export = time.time() - t0
        engine = ember.build(path, device=self.device, precision=self.precision, opt_level=self.args.opt_level)
        t_build = time.time() - t0 - t_export
        self.log(f"{md.name} b{batch} ember: export {t_export:.1f}s, build {t_build:.1f}s, "
                 f"{engine.manifest.get('nodes_in')} -> {engine.manifest.get('nodes_out')} nodes")
        spec_in, spec_out = engine.inputs[0], engine.outputs[0].name
        feeds = [{spec_in.name: x.to(_torch_dtype(spec_in.dtype))} for x in x32]
        if self.device == "cuda":
            torch.cuda.synchronize()  # the context runs on its own stream: feeds must be ready
        ctx = execution_context(engine, cuda_graph=not self.args.no_cuda_graph)
        run = device_runner(ctx)

        def fn(i: int):
            return run(feeds[i])[spec_out]

        if self.device == "cuda":  # count kernels on eager runs: a graph replay shows as one launch
            eager_ctx = execution_context(engine, cuda_graph=False)
            eager_run = device_runner(eager_ctx)
            fn.no_graph = lambda i: eager_run(feeds[i])[spec_out]  # type: ignore[attr-defined]
        with torch.inference_mode():
            fn(0)
        notes = getattr(ctx, "graph_notes", [])
        if notes:
            self.log(f"{md.name} b{batch} ember: not captured in a CUDA graph: {'; '.join(notes)[:300]}")
        fn.notes = [f"{engine.manifest.get('nodes_in')} -> {engine.manifest.get('nodes_out')} nodes, "  # type: ignore
                    f"{len(engine.manifest.get('fp32_layers') or [])} kept fp32, "
                    f"CUDA graphs captured: {getattr(ctx, 'graphs', 0)}"] + [f"not captured: {n}" for n in notes]
        return fn, getattr(ctx, "stream", None), t_export + t_build

    def save(self) -> None:
        doc = {"host": host_info(self.device), "args": vars(self.args), "tolerance_rel_l2": TOL,
               "elapsed_s": time.time() - self.t_start, "cases": self.cases}
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        with open(self.args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)


def _torch_dtype(name: str) -> torch.dtype:
    from ember.ir.dtypes import DType
    from ember.ops.torch_types import to_torch

    return to_torch(DType.parse(name))


def export_onnx(m32: torch.nn.Module, x: torch.Tensor, path: str, in_name: str) -> None:
    """fp32 module -> ONNX with the TorchScript exporter, opset 17, fixed shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=[in_name], output_names=["out"], opset_version=17, do_constant_folding=True)
        try:
            torch.onnx.export(m32, (x,), path, dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(m32, (x,), path, **kwargs)
    m32.eval()  # the TorchScript exporter leaves the module in training mode (dropout on) afterwards


def speedup(res: dict[str, Result], metric: str) -> Optional[dict[str, Any]]:
    """ember's speedup over the best correct peer: > 1 means ember is faster."""
    e = res.get("ember")
    peers = [(n, r) for n, r in res.items() if n != "ember" and r.status == "ok"]
    if not e or e.status != "ok" or not peers:
        return None
    best_name, best = min(peers, key=lambda nr: nr[1].median_ms)
    return {"best_peer": best_name, "speedup": best.median_ms / e.median_ms}


def host_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    for mod in ("transformers", "triton", "onnx", "onnxruntime", "torchvision"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import ember

        info["ember"] = ember.__version__
    except Exception:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30}
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def print_table(cases: list[dict[str, Any]]) -> None:
    def cell(c: dict[str, Any], metric: str) -> str:
        if c["status"] == "ok":
            return f"{c['median_ms']:.3f} ms" if metric == "latency" else f"{c['per_s']:,.0f}/s"
        if c["status"] == "WRONG":
            return f"WRONG({c['rel_l2']:.1e})"
        return "FAILED" if c["status"] == "FAILED" else "-"

    print("\n=== peers: median of runs (latency: ms, lower is better; throughput: samples/s, higher is better)")
    head = ["model", "batch", "metric", *CANDIDATES, "ember/best-peer"]
    w = [12, 5, 10, 14, 16, 14, 14, 20]
    print(" | ".join(h.ljust(n) for h, n in zip(head, w)))
    for case in cases:
        cands = case["candidates"]
        ratio = case.get("ratio")
        rtxt = f"{ratio['speedup']:.2f}x vs {ratio['best_peer']}" if ratio else ("error" if case.get("error") else "-")
        row = [case["model"], str(case["batch"]), case["metric"],
               *(cell(cands[n], case["metric"]) if n in cands else "-" for n in CANDIDATES), rtxt]
        print(" | ".join(v.ljust(n) for v, n in zip(row, w)))
    extra = []
    for case in cases:
        for n, c in case["candidates"].items():
            if c.get("kernels_per_inference"):
                extra.append(f"{case['model']} b{case['batch']} {n}: {c['kernels_per_inference']:.0f} kernels/inference")
            if c.get("setup_s") is not None:
                what = "export+build" if n == "ember" else "compile"
                extra.append(f"{case['model']} b{case['batch']} {n}: {what} {c['setup_s']:.1f}s")
            if c["status"] != "skipped" and c["notes"]:
                extra.append(f"{case['model']} b{case['batch']} {n}: {c['status']} {'; '.join(c['notes'])[:200]}")
    if extra:
        print("\n".join(["", "=== kernels, setup times, failures"] + extra))
    print("ratio: ember speedup over the best correct peer (latency: peer ms / ember ms; "
          "throughput: ember/s / peer/s); > 1 means ember is faster")


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="fewer runs; skip reduce-overhead at large batch")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (e.g. on CPU without a compiler)")
    ap.add_argument("--no-cuda-graph", action="store_true", help="ember runs without CUDA graphs")
    ap.add_argument("--precision", choices=["fp32", "tf32", "fp16", "bf16"], default=None,
                    help="ember's precision [default: fp16 on cuda, fp32 on cpu]")
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--cpu-max-batch", type=int, default=2, help="on --device cpu, large batches shrink to this")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds; candidates past it are skipped (results so far are kept)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "peers.json"))
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU; use --device cpu")
    if args.device == "cuda":  # the reference is true fp32; the fp16 peers are unaffected
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    bench = Bench(args)
    info = host_info(args.device)
    bench.log("host: " + json.dumps(info))
    for name in models:
        if bench.over_budget():
            bench.log(f"{name}: skipped, past --time-budget")
            continue
        try:
            bench.run_model(MODELS[name])
        except Exception as e:
            bench.log(f"{name}: FAILED to build the model: {type(e).__name__}: {e}")
            traceback.print_exc()
            bench.cases.append({"model": name, "batch": None, "metric": None, "candidates": {}, "ratio": None,
                                "error": f"{type(e).__name__}: {e}"})
    bench.save()
    bench.log(f"wrote {args.out}")
    print_table(bench.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
