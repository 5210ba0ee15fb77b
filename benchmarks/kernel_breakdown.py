"""Where does the GPU time go? Top CUDA kernels of one ember inference vs torch eager (fp16).

    PYTHONPATH=src python benchmarks/kernel_breakdown.py --model bert --batch 64

Builds the model from a transformers config (random weights), exports it, builds the ember engine
for the static shape, and prints the CUDA kernels by total time for ember and for torch eager.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch

import ember


def make(model: str, batch: int):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if model == "bert":
        m = BertModel(BertConfig(), add_pooling_layer=False).eval()
        x = torch.randint(0, 30000, (batch, 128))

        class W(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, a):
                return self.m(a, attention_mask=torch.ones_like(a)).last_hidden_state
        return W(m).eval(), x, "input_ids"
    if model == "resnet":
        from transformers import ResNetConfig, ResNetModel

        r = ResNetModel(ResNetConfig()).eval()

        class R(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, a):
                return self.m(a).pooler_output
        return R(r).eval(), torch.randn(batch, 3, 224, 224), "pixel_values"
    m = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    x = torch.randn(batch, 3, 224, 224)

    class V(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, a):
            return self.m(a).last_hidden_state
    return V(m).eval(), x, "pixel_values"


def top_kernels(fn, n: int = 14) -> list[tuple[str, int, float]]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg.setdefault(e.name[:90], [0, 0.0])
            a[0] += 1
            a[1] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
    rows = sorted(((k, c, t) for k, (c, t) in agg.items()), key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f"  total {total:.3f} ms in {sum(r[1] for r in rows)} kernels")
    for k, c, t in rows[:n]:
        print(f"  {t:8.3f} ms  x{c:<4d} {k}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert", choices=["bert", "vit", "resnet"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timings", action="store_true", help="print every timed node's tactic timings")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    m, x, name = make(args.model, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(m, (x[:1],), path, input_names=[name], output_names=["out"], opset_version=17,
                          dynamo=False, dynamic_axes={name: {0: "batch"}})
        m.eval()
        eng = ember.build(path, device="cuda", precision="fp16", opt_level=3, shapes={name: tuple(x.shape)})
    print(f"{args.model} b{args.batch}: ember graph {eng.graph.op_counts()}")
    print(f"tactics {eng.manifest['tactics']}")
    for f in eng.manifest.get("tactic_failures", []):
        print(f"  tactic failure: {f}")
    for node, ms in (eng.tuning.timings.items() if eng.tuning else []):
        if min(ms, key=ms.get) == "reference" or args.timings:
            print(f"  {node}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    ctx = eng.create_execution_context(cuda_graph=False)
    xd = x.cuda()
    print("ember (eager steps):")
    top_kernels(lambda: ctx.run_device({name: xd}, reuse_outputs=True))
    m16 = m.cuda().half()
    xe = xd.half() if xd.is_floating_point() else xd
    if args.model == "resnet":  # conv nets run channels-last in the peers too
        m16 = m16.to(memory_format=torch.channels_last)
        xe = xe.contiguous(memory_format=torch.channels_last)
    print("torch eager fp16:")
    with torch.no_grad():
        top_kernels(lambda: m16(xe))


if __name__ == "__main__":
    main()
