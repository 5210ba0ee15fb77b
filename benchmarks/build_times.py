"""Build times (issue 10: <= 60 s cold, <= 10 s warm at the default builder level) and fp16 against fp32.

    PYTHONPATH=src python benchmarks/build_times.py --out $OUT/build_times.json [--corpus DIR] [--budget 420]

Models: ResNet-50 (torchvision, random weights) at batch 1 and 256, BERT-base seq 128 (transformers
BertConfig, random weights, batch 1), exported here with the TorchScript exporter (opset 17), and the
ONNX files of a corpus directory (``DIR/<name>.onnx``, ``DIR/<name>/*.onnx`` or the corpus cache's
``DIR/models/<name>/*.onnx``; shapes and inputs from benchmarks/corpus_models.py when it knows the
name, else the model's fixed dims with 1 for the others).

Each (model, precision) is built twice, each time in a fresh process on the GPU:
  cold  empty timing cache, empty Triton cache directory, empty ember kernel folder;
  warm  the same caches again (what a second ``ember build`` on this machine meets).
Reported per build: seconds inside ``ember.build`` (and the whole process); per cold build also
``engine.run`` on numpy inputs (median ms of 20 after 3 warm-ups), the tuner's work (kernels compiled
by workers, configurations pruned, nodes timed), the fp16 engine's layers kept in fp32 by reason and
its fidelity block; per model the fp16 output's relative L2 from the fp32 engine's on the same inputs.

The time budget (--budget, default 420 s of the 8 minutes a GPU call may take) is spent in order:
ResNet-50 b1, BERT, ResNet-50 b256, then corpus models smallest first. A case that would not fit in
what is left (estimated from the slowest build so far) is skipped and listed as such; a build that
overruns is stopped (--case-timeout) and reported. JSON is rewritten after every build.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
PRECISIONS = ("fp16", "fp32")
STARTUP_S = 10.0  # a fresh process: torch, CUDA context, ember imports (estimate until measured)


# -- the models ---------------------------------------------------------------------------------------
def export_resnet50(path: Path) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    _export(model, torch.randn(1, 3, 224, 224), path, "pixel_values", {"pixel_values": {0: "batch"}})


def export_bert(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)

    class Hidden(torch.nn.Module):  # one input, one output: the last hidden state
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig(), add_pooling_layer=False).eval()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    _export(Hidden().eval(), torch.randint(0, 30000, (1, 128)), path, "input_ids", None)


def _export(model: Any, x: Any, path: Path, name: str, dynamic: Optional[dict]) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=[name], output_names=["out"], opset_version=17, do_constant_folding=True,
                      dynamic_axes=dynamic)
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(model, (x,), str(path), **kwargs)


def corpus_cases(root: Path) -> list[dict[str, Any]]:
    """(name, path, shapes, feeds) of the corpus models found under ``root``, smallest file first."""
    sys.path.insert(0, str(HERE))
    try:
        import corpus_models as registry
    except ImportError:
        registry = None
    found: dict[str, Path] = {}
    for pattern in ("*.onnx", "*/*.onnx", "models/*/*.onnx"):
        for p in sorted(root.glob(pattern)):
            name = p.stem if p.parent == root else p.parent.name
            found.setdefault(name, p)
    cases = []
    for name, path in sorted(found.items(), key=lambda kv: kv[1].stat().st_size):
        entry = registry.BY_NAME.get(name) if registry is not None else None
        if entry is not None and entry.expect_error:
            continue  # ember refuses it by design (string tensors, custom ops): nothing to time
        if entry is not None:
            feeds = registry.make_feeds(entry)
            shapes = {k: list(v.shape) for k, v in feeds.items()}
        else:
            feeds, shapes = _default_feeds(path)
            if feeds is None:
                continue
        cases.append({"name": name, "path": str(path), "shapes": shapes, "feeds": feeds})
    return cases


def _default_feeds(path: Path) -> tuple[Optional[dict], dict]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    rng = np.random.default_rng(0)
    feeds, shapes = {}, {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in t.shape.dim]
        if t.elem_type != onnx.TensorProto.FLOAT:
            return None, {}  # integer inputs need value ranges the registry knows; skip the model
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
        shapes[i.name] = dims
    return feeds, shapes


# -- one build, in a fresh process --------------------------------------------------------------------
def build_once(model: str, precision: str, shapes: dict, feeds_path: str, timing_cache: str, result_path: str,
               outputs_path: Optional[str], device: str = "cuda", builder_level: int = 2) -> None:
    """What a child process does: build, then (cold builds) time engine.run and save the outputs."""
    t_start = time.perf_counter()
    import torch

    import ember

    feeds = dict(np.load(feeds_path))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    engine = ember.build(model, device=device, precision=precision, timing_cache=timing_cache,
                         shapes={k: tuple(v) for k, v in shapes.items()}, builder_level=builder_level)
    build_s = time.perf_counter() - t0
    m = engine.manifest
    tune = getattr(engine, "tuning", None)
    layers = m.get("fp32_layers") or []
    result: dict[str, Any] = {
        "build_s": round(build_s, 2), "startup_s": round(t0 - t_start, 2),
        "kept_fp32": {r: sum(1 for s in layers if f"): {r}" in s) for r in ("accuracy", "speed", "op", "control flow")},
        "accuracy_layers": [s for s in layers if "): accuracy" in s][:20],
        "speed_layers": [s for s in layers if "): speed" in s][:20],
        "fidelity": m.get("fidelity"), "nodes_out": m.get("nodes_out"), "tactics": m.get("tactics"),
        "tuning": None if tune is None else {k: getattr(tune, k) for k in
                                             ("timed", "cached", "pruned", "compiled", "compile_seconds")},
        "tactic_failures": len(m.get("tactic_failures") or []),
    }
    if outputs_path:
        for _ in range(3):
            engine.run(feeds)
        times = []
        for _ in range(20):
            sync()
            t = time.perf_counter()
            engine.run(feeds)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        result["run_ms"] = round(statistics.median(times), 3)
        out = engine.run(feeds)
        np.savez(outputs_path, **{k: np.asarray(v) for k, v in out.items()})
    result["process_s"] = round(time.perf_counter() - t_start, 2)
    Path(result_path).write_text(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.t0 = time.perf_counter()
        self.results: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.slowest = {"cold": 60.0 + STARTUP_S, "warm": 10.0 + STARTUP_S}  # until measured
        self.measured: set[str] = set()

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps({"host": host(), "budget_s": self.args.budget,
                                                       "elapsed_s": round(time.perf_counter() - self.t0, 1),
                                                       "results": self.results, "skipped": self.skipped}, indent=1))

    def case(self, name: str, path: str, shapes: dict, feeds: dict[str, np.ndarray]) -> None:
        need = 2 * (self.slowest["cold"] + self.slowest["warm"])
        if self.left() < need:
            self.skipped.append(f"{name}: needs about {need:.0f} s, {self.left():.0f} s of the budget left")
            print(f"  skip {name}: needs about {need:.0f} s, {self.left():.0f} s left", flush=True)
            return
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        feeds_path = str(d / "feeds.npz")
        np.savez(feeds_path, **feeds)
        row: dict[str, Any] = {"model": name, "shapes": shapes}
        for precision in PRECISIONS:
            caches = d / precision
            shutil.rmtree(caches, ignore_errors=True)
            caches.mkdir()
            env = dict(os.environ, TRITON_CACHE_DIR=str(caches / "triton"),
                       EMBER_TRITON_CACHE_DIR=str(caches / "ember_kernels"),
                       PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            env.pop("TRITON_INTERPRET", None)
            if self.args.workers is not None:
                env["EMBER_COMPILE_WORKERS"] = str(self.args.workers)
            for state in ("cold", "warm"):
                res = self.child(path, precision, shapes, feeds_path, str(caches / "timing.json"),
                                 str(d / f"{precision}_{state}.json"),
                                 str(d / f"{precision}_out.npz") if state == "cold" else None, env)
                row[f"{precision}_{state}"] = res
                if "build_s" in res:  # the estimate for what is left: the slowest build measured
                    prev = self.slowest[state] if state in self.measured else 0.0
                    self.slowest[state] = max(prev, res["wall_s"])
                    self.measured.add(state)
                print(f"  {name} {precision} {state}: " + (f"build {res['build_s']:.1f} s" if "build_s" in res
                      else res.get("error", "?")) + (f", run {res['run_ms']:.3f} ms" if "run_ms" in res else ""),
                      flush=True)
        row["fp16_vs_fp32_rel_l2"] = rel_l2(d / "fp16_out.npz", d / "fp32_out.npz")
        self.results.append(row)
        self.save()

    def child(self, path: str, precision: str, shapes: dict, feeds_path: str, cache: str, result_path: str,
              outputs_path: Optional[str], env: dict) -> dict[str, Any]:
        timeout = max(10.0, min(self.args.case_timeout, self.left()))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(
            [path, precision, shapes, feeds_path, cache, result_path, outputs_path, self.args.device,
             self.args.builder_level])]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {timeout:.0f} s (over --case-timeout or the budget)"}
        if proc.returncode != 0 or not Path(result_path).is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
            return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
        res = json.loads(Path(result_path).read_text())
        res["wall_s"] = round(time.perf_counter() - t, 2)
        return res


def rel_l2(a: Path, b: Path) -> Optional[dict[str, float]]:
    if not (a.is_file() and b.is_file()):
        return None
    x, y = np.load(a), np.load(b)
    out = {}
    for k in y.files:
        if k in x.files and np.issubdtype(y[k].dtype, np.floating) and x[k].shape == y[k].shape:
            ref = y[k].astype(np.float64)
            out[k] = float(np.linalg.norm(x[k].astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
    return out


def host() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name}, sm {p.major}.{p.minor}, {p.multi_processor_count} SMs"
    return info


def worst(d: Optional[dict]) -> float:
    return max((v for v in (d or {}).values() if isinstance(v, (int, float))), default=float("nan"))


def table(results: list[dict[str, Any]], skipped: list[str]) -> str:
    head = ("model", "fp16 cold s", "fp16 warm s", "fp32 cold s", "fp32 warm s", "fp16 ms", "fp32 ms",
            "fp16/fp32 rel L2", "fp32 layers (acc/speed)", "fidelity before->after", "compiled/pruned")
    rows = [head]
    for r in results:
        def s(key: str, field: str = "build_s", fmt: str = "{:.1f}") -> str:
            v = (r.get(key) or {}).get(field)
            return fmt.format(v) if isinstance(v, (int, float)) else ("ERR" if "error" in (r.get(key) or {}) else "-")

        f16 = r.get("fp16_cold") or {}
        kept = f16.get("kept_fp32") or {}
        fid = f16.get("fidelity") or {}
        l2 = r.get("fp16_vs_fp32_rel_l2") or {}
        tune = f16.get("tuning") or {}
        rows.append((r["model"], s("fp16_cold"), s("fp16_warm"), s("fp32_cold"), s("fp32_warm"),
                     s("fp16_cold", "run_ms", "{:.3f}"), s("fp32_cold", "run_ms", "{:.3f}"),
                     f"{worst(l2):.1e}" if l2 else "-", f"{kept.get('accuracy', 0)}/{kept.get('speed', 0)}",
                     f"{worst(fid.get('drift_before')):.1e}->{worst(fid.get('drift')):.1e}" if fid else "-",
                     f"{tune.get('compiled', '-')}/{tune.get('pruned', '-')}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON results (rewritten after every model)")
    ap.add_argument("--corpus", type=Path, help="a directory of corpus ONNX models")
    ap.add_argument("--models", default="resnet50_b1,bert_b1,resnet50_b256,corpus",
                    help="which, in order: resnet50_b1, bert_b1, resnet50_b256, corpus")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    ap.add_argument("--case-timeout", type=float, default=150.0, help="seconds one build may take")
    ap.add_argument("--workers", type=int, default=None, help="EMBER_COMPILE_WORKERS for the builds")
    ap.add_argument("--builder-level", type=int, default=2,
                    help="2 (default) shortlists template configurations by shape; 4 times them all (to see "
                         "what the shortlist costs in engine ms)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        build_once(*json.loads(args.one))
        return 0
    run = Run(args, Path(tempfile.mkdtemp(prefix="ember_build_times_")))
    print(f"work dir {run.work}; budget {args.budget:.0f} s", flush=True)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    exported: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    for name in wanted:
        if name == "corpus":
            if args.corpus is None or not args.corpus.is_dir():
                run.skipped.append(f"corpus: no directory {args.corpus or '(give --corpus DIR)'}")
                continue
            cases = corpus_cases(args.corpus)
            if not cases:
                run.skipped.append(f"corpus: no ONNX models with known inputs under {args.corpus}")
            for c in cases:
                run.case(c["name"], c["path"], c["shapes"], c["feeds"])
            continue
        t = time.perf_counter()
        try:
            if name.startswith("resnet50"):
                if "resnet50" not in exported:
                    exported["resnet50"] = run.work / "resnet50.onnx"
                    export_resnet50(exported["resnet50"])
                batch = int(name.split("_b")[1])
                feeds = {"pixel_values": rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)}
                path = exported["resnet50"]
            elif name == "bert_b1":
                path = run.work / "bert.onnx"
                export_bert(path)
                feeds = {"input_ids": rng.integers(0, 30000, (1, 128)).astype(np.int64)}
            else:
                run.skipped.append(f"{name}: unknown model name")
                continue
        except Exception as e:  # an export failing (no torchvision, say) skips that model only
            run.skipped.append(f"{name}: export failed: {type(e).__name__}: {e}"[:300])
            continue
        print(f"exported {name} in {time.perf_counter() - t:.1f} s", flush=True)
        run.case(name, str(path), {k: list(v.shape) for k, v in feeds.items()}, feeds)
    run.save()
    print()
    print(table(run.results, run.skipped))
    print(f"\nelapsed {time.perf_counter() - run.t0:.0f} s of the {args.budget:.0f} s budget; host {host()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
