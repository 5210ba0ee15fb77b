"""Cold start: Engine.load + first inference of a saved ResNet-50 engine, in a fresh process.

    PYTHONPATH=src python benchmarks/cold_start.py [--precision fp16]

Builds and saves the engine once (fp32 ONNX export of transformers' ResNet-50, batch 1), then starts a
new Python process that imports ember and torch (not timed: the interpreter's own start), and times
Engine.load(path) and the first run up to the synchronized output. Prints both and their sum.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings

CHILD = r"""
import sys, time, torch, numpy as np
import ember
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()   # CUDA context: not the engine's cost
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
t0 = time.perf_counter()
eng = ember.Engine.load(sys.argv[1])
t1 = time.perf_counter()
prof = None
if len(sys.argv) > 2 and sys.argv[2] == "profile":
    import cProfile
    prof = cProfile.Profile(); prof.enable()
out = eng.run({"pixel_values": x})
torch.cuda.synchronize()
t2 = time.perf_counter()
if prof is not None:
    import pstats
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
t3 = time.perf_counter(); eng.run({"pixel_values": x}); torch.cuda.synchronize(); t4 = time.perf_counter()
print(f"load {t1 - t0:.3f} s, first inference {t2 - t1:.3f} s, total {t2 - t0:.3f} s (second inference {t4 - t3:.4f} s)")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--profile", action="store_true", help="cProfile the first inference of the second start")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from transformers import ResNetConfig, ResNetModel

    import ember

    torch.manual_seed(0)
    m = ResNetModel(ResNetConfig()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, engine_path = os.path.join(tmp, "r50.onnx"), os.path.join(tmp, "r50.engine")
        torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), onnx_path, input_names=["pixel_values"],
                          output_names=["out", "pooled"], opset_version=17, dynamo=False)
        eng = ember.build(onnx_path, device="cuda", precision=args.precision, shapes={"pixel_values": (1, 3, 224, 224)})
        eng.save(engine_path)
        print(f"engine {os.path.getsize(engine_path) / 1e6:.1f} MB, {args.precision}")
        for i in range(2):  # the second start also finds warm OS file caches
            argv = [sys.executable, "-c", CHILD, engine_path] + (["profile"] if args.profile and i == 1 else [])
            r = subprocess.run(argv, capture_output=True, text=True, env=os.environ)
            print(f"fresh process {i + 1}: " + (r.stdout.strip() or r.stderr.strip()[-800:]))


if __name__ == "__main__":
    main()
