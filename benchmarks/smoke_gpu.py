"""Quick GPU check of the CUDA path on ResNet-50 and BERT-base (fp16, batch 1).

Builds each model with ember, checks it against an fp32 torch reference, and times ember's
ExecutionContext (CUDA graph) against torch eager fp16 and torch eager fp16 under a manual CUDA
graph (a stand-in for torch.compile's reduce-overhead without its compile time). Medians of CUDA
events. `python benchmarks/smoke_gpu.py [--models resnet50,bert]`. The full comparison is peers.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

import ember


def cuda_time(fn, iters: int = 100, warmup: int = 20) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return statistics.median(ts), ts[int(0.99 * (len(ts) - 1))]


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def kernels_per_run(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make(which: str):
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    if which == "resnet50":
        m = ResNetModel(ResNetConfig()).eval()
        feeds = {"pixel_values": torch.randn(1, 3, 224, 224)}
        out_name = "pooler_output"
    else:
        m = BertModel(BertConfig(), add_pooling_layer=False).eval()
        feeds = {"input_ids": torch.randint(0, 30000, (1, 128)),
                 "attention_mask": torch.ones(1, 128, dtype=torch.int64)}
        out_name = "last_hidden_state"
    return m, feeds, out_name


def run(which: str, tmp: str) -> dict:
    m, feeds, out_name = make(which)
    path = os.path.join(tmp, f"{which}.onnx")

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return getattr(self.inner(*args), out_name)

    with torch.no_grad():  # before export: the exporter leaves HF models in another mode
        ref = Wrap(m)(*feeds.values()).double()
    torch.onnx.export(Wrap(m), tuple(feeds.values()), path, input_names=list(feeds), output_names=["out"],
                      opset_version=17, dynamo=False)
    m.eval()
    t0 = time.perf_counter()
    eng = ember.build(path, device="cuda", precision="fp16", opt_level=3,
                      shapes={k: tuple(v.shape) for k, v in feeds.items()}, builder_level=1)
    build_s = time.perf_counter() - t0
    dev_feeds = {k: v.cuda() for k, v in feeds.items()}
    ctx = eng.create_execution_context()
    out = ctx.run_device(dev_feeds)["out"].double().cpu()
    rel = float((out - ref).norm() / ref.norm())
    ember_ms = cuda_time(lambda: ctx.run_device(dev_feeds, reuse_outputs=True))
    m16 = Wrap(m).cuda().half()
    args16 = [v.cuda().half() if v.is_floating_point() else v.cuda() for v in feeds.values()]
    with torch.no_grad():
        eager_ms = cuda_time(lambda: m16(*args16))
        g = graphed(lambda: m16(*args16))
        graph_ms = cuda_time(g)
        k_eager = kernels_per_run(lambda: m16(*args16))
    k_ember = kernels_per_run(lambda: eng._interp.run(dev_feeds))
    return dict(model=which, build_s=build_s, rel=rel, ember=ember_ms, eager=eager_ms, eager_graph=graph_ms,
                nodes=f"{eng.manifest['nodes_in']}->{eng.manifest['nodes_out']}", tactics=eng.manifest["tactics"],
                graphs=ctx.graphs, notes=ctx.graph_notes[:2], fallbacks=eng._interp.fallbacks[:3],
                kernels_ember=k_ember, kernels_eager=k_eager, ops=eng.graph.op_counts())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,bert")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} cuda {torch.version.cuda}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models.split(","):
            try:
                r = run(which, tmp)
            except Exception as e:  # keep going: one broken model must not hide the others
                import traceback

                traceback.print_exc()
                r = dict(model=which, error=f"{type(e).__name__}: {e}")
            print(r, flush=True)
            rows.append(r)
    print("\nmodel     rel_err   ember ms (p99)   eager ms   eager+graph ms   ember/graph   kernels ember/eager")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:9s} ERROR {r['error'][:100]}")
            continue
        print(f"{r['model']:9s} {r['rel']:.2e}  {r['ember'][0]:.3f} ({r['ember'][1]:.3f})   {r['eager'][0]:.3f}    "
              f"{r['eager_graph'][0]:.3f}           {r['ember'][0] / r['eager_graph'][0]:.2f}x        "
              f"{r['kernels_ember']}/{r['kernels_eager']}")


if __name__ == "__main__":
    main()
