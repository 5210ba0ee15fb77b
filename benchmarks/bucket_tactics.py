"""Tactics per shape bucket (issue 11), on the GPU: BERT-base seq 128 fp16, one engine with a dynamic
batch profile 1..64 (opt 64), against engines built for exactly batch 1 and exactly batch 64.

The issue: tuned at opt only, the dynamic engine ran batch 1 at 1.9 ms where an engine built for
batch 1 ran 0.57 ms. Since bucket tuning the dynamic engine also times its GEMMs and attention at
batch 1 and 8 (builder/bucket_tuning.py) and runs each batch with its bucket's choices. Columns:

- ``dyn+buckets``: profile 1..64, tactics per bucket (the default build);
- ``dyn opt-only``: the same profile built with ``bucket_tactics=False`` (what the issue measured);
- ``static``: an engine built for exactly that batch (batch 1 and 64 only).

Each is timed with ``ExecutionContext.run_device`` (device tensors, the context's own output
buffers), CUDA events on the context's stream, median of ``--reps`` after a warm-up, and checked
against the fp32 torch module (relative L2). Build seconds include tuning (the timing cache is the
default one: a second run of this script reuses it).

    PYTHONPATH=src python benchmarks/bucket_tactics.py --out $OUT/bucket_tactics.json
    PYTHONPATH=src python benchmarks/bucket_tactics.py --device cpu --tiny   # smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

SEQ, VOCAB = 128, 30522
BATCHES = (1, 8, 64)


def _model(tiny: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    import peers

    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128) if tiny \
        else BertConfig()
    return peers.Logits(BertModel(cfg, add_pooling_layer=False), "input_ids", "last_hidden_state").eval()


def _export(m: torch.nn.Module, path: str, vocab: int) -> None:
    """fp32 module -> ONNX (TorchScript exporter, opset 17) with a dynamic batch dim."""
    x = torch.randint(1, vocab, (2, SEQ))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=["input_ids"], output_names=["out"], opset_version=17, do_constant_folding=True,
                      dynamic_axes={"input_ids": {0: "batch"}, "out": {0: "batch"}})
        try:
            torch.onnx.export(m, (x,), path, dynamo=False, **kwargs)
        except TypeError:
            torch.onnx.export(m, (x,), path, **kwargs)
    m.eval()


def _time(ctx: Any, feeds: dict, reps: int, cuda: bool) -> float:
    for _ in range(10):
        ctx.run_device(feeds, reuse_outputs=True)
    times = []
    if cuda:
        torch.cuda.synchronize()
        with torch.cuda.stream(ctx.stream):
            for _ in range(reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(ctx.stream)
                ctx.run_device(feeds, reuse_outputs=True)
                e.record(ctx.stream)
                e.synchronize()
                times.append(s.elapsed_time(e))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            ctx.run_device(feeds, reuse_outputs=True)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv: "list[str] | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default="bucket_tactics.json")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (the GPU path emulated)")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer BERT of width 64 (smoke tests)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bucket_tactics.py measures the GPU path: no CUDA GPU here (--device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 2
    import ember

    if not cuda:
        from ember.runtime.context import ExecutionContext

        ExecutionContext.emulate_graphs = True
    precision = "fp16" if cuda else "fp32"
    vocab = 1000 if args.tiny else VOCAB
    torch.manual_seed(0)
    m32 = _model(args.tiny)
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randint(1, vocab, (b, SEQ), generator=g) for b in BATCHES}
    with torch.no_grad():
        refs = {b: m32(x) for b, x in xs.items()}
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                           "precision": precision, "engines": {}, "ms": {}, "rel_l2": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.onnx")
        _export(m32, path, vocab)
        builds = {
            "dyn+buckets": dict(profiles=[{"input_ids": ((1, SEQ), (64, SEQ), (64, SEQ))}]),
            "dyn opt-only": dict(profiles=[{"input_ids": ((1, SEQ), (64, SEQ), (64, SEQ))}], bucket_tactics=False),
            "static b1": dict(shapes={"input_ids": (1, SEQ)}),
            "static b64": dict(shapes={"input_ids": (64, SEQ)}),
        }
        for name, kw in builds.items():
            t0 = time.time()
            eng = ember.build(path, device=args.device, precision=precision, opt_level=3, **kw)
            info = {"build_s": round(time.time() - t0, 1), "tactic_buckets": eng.manifest.get("tactic_buckets")}
            res["engines"][name] = info
            ctx = eng.create_execution_context()
            for b in BATCHES:
                if name.startswith("static") and f"b{b}" != name.split()[1]:
                    continue
                feeds = {"input_ids": xs[b].to(args.device)}
                out = ctx.run_device(feeds)["out"]
                res["rel_l2"][f"{name}|{b}"] = _rel_l2(out.float(), refs[b])
                res["ms"][f"{name}|{b}"] = _time(ctx, feeds, args.reps, cuda)
            print(json.dumps({name: info}), flush=True)
            del ctx, eng
            if cuda:
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    cols = list(builds)
    print(f"\nBERT-base s{SEQ} {precision}, run_device median ms ({res['gpu']})" if not args.tiny
          else f"\ntiny BERT s{SEQ} {precision}, run_device median ms ({res['gpu']})")
    print(f"{'batch':>5s} " + " ".join(f"{c:>13s}" for c in cols) + f" {'max relL2':>10s}")
    for b in BATCHES:
        cells = [f"{res['ms'][k]:>13.3f}" if (k := f'{c}|{b}') in res["ms"] else f"{'-':>13s}" for c in cols]
        errs = [v for k, v in res["rel_l2"].items() if k.endswith(f"|{b}")]
        print(f"{b:>5d} " + " ".join(cells) + f" {max(errs):>10.1e}")
    print("builds: " + ", ".join(f"{k} {v['build_s']}s" for k, v in res["engines"].items()))
    tb = res["engines"]["dyn+buckets"]["tactic_buckets"]
    print(f"per-bucket tactics: {tb}" if tb else "per-bucket tactics: none recorded (CPU builds do not time tactics)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
