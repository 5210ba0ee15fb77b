"""Tactic selection: time every applicable tactic of each node at the profile's opt shapes.

Winners go into ``node.meta["tactic"]`` and into a timing cache (JSON) keyed by GPU, compute
capability, library versions and the node's signature, so a second build skips the timing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..ir.graph import Graph, Node
from ..kernels import bind_tactic, candidates
from ..ops import OpContext

log = logging.getLogger(__name__)

# builder level -> timed repetitions per candidate (0: no timing, first vendor tactic wins)
TIMING_METHOD = "graph-replay"
REPS = {0: 0, 1: 3, 2: 10, 3: 25, 4: 50, 5: 100}


def default_cache_path() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ember", "timing_cache.json")


def device_key(device: torch.device) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # CPU-only machines without triton: no generated kernels to key on
        triton_version = "none"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev = f"{p.name}|sm{p.major}{p.minor}"
    else:
        dev = "cpu"
    # the timing method is part of the key: entries timed another way are not comparable
    return f"{dev}|torch{torch.__version__}|triton{triton_version}|{TIMING_METHOD}"


def node_signature(node: Node, args: list) -> str:
    def desc(a: Any) -> str:
        if isinstance(a, torch.Tensor):
            return f"{a.dtype}{list(a.shape)}{'cl' if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) else ''}"
        return repr(a)
    attrs = json.dumps({k: v for k, v in sorted(node.attrs.items()) if isinstance(v, (int, float, str, list))},
                       sort_keys=True, default=str)
    return f"{node.op}|{attrs}|{','.join(desc(a) for a in args)}"


@dataclass
class TimingCache:
    path: Optional[str]
    entries: dict[str, dict] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @classmethod
    def open(cls, path: Optional[str]) -> "TimingCache":
        c = cls(path)
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    c.entries = json.load(f).get("entries", {})
            except (OSError, json.JSONDecodeError):
                c.entries = {}  # a damaged cache only costs a slower build
        return c

    def key(self, device: torch.device, sig: str) -> str:
        return hashlib.sha256(f"{device_key(device)}|{sig}".encode()).hexdigest()[:32]

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": "ember-timing-cache", "version": 1, "entries": self.entries}, f, indent=1)
        os.replace(tmp, self.path)


def _time(fn: Callable[[], Any], reps: int, device: torch.device, inner: int = 1) -> float:
    """Median milliseconds per call of ``reps`` runs after two warm-ups (a run: ``inner`` calls).

    On CUDA the candidate is captured in a CUDA graph and the graph's replays are timed, which is how
    an engine runs it: GPU time, without the Python and launch gaps that eager timing would add
    (those differ between tactics and would pick by host overhead, not by kernel speed). A
    candidate that cannot be captured is timed eagerly.
    """
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        def calls() -> None:
            for _ in range(inner):
                fn()

        try:
            with torch.cuda.graph(graph):
                calls()
        except Exception:
            graph = None
            torch.cuda.synchronize(device)
        run = graph.replay if graph is not None else calls
        for _ in range(2):
            run()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / inner)
        del graph
        return statistics.median(times)
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(times)


def _warm_gpu(device: torch.device, ms: float = 200.0) -> None:
    """Keep the GPU busy for a moment so its clocks are up before the first candidate is timed."""
    a = torch.randn(2048, 2048, device=device, dtype=torch.float16)
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)


@dataclass
class TuneReport:
    timed: int = 0
    cached: int = 0
    choices: dict[str, int] = field(default_factory=dict)  # tactic name -> node count
    # node name -> {tactic: median ms}, for the nodes timed in this build (not the cached ones)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # "node (op): tactic: error", never silent


def select_tactics(graph: Graph, device: torch.device, feeds: dict[str, torch.Tensor], level: int,
                   cache: TimingCache, progress: Optional[Callable[[str], None]] = None) -> TuneReport:
    """Pick a tactic for every node that has more than the reference. ``feeds``: inputs at opt shapes.

    One run of the graph, in order: each node is timed on the inputs its producers' *chosen*
    tactics made, then runs with its own winner, so every candidate is timed on the layouts it
    will see in the engine (a cuDNN channels-last conv after another one gets an NHWC input, not
    the reference's NCHW one, whose conversion it would otherwise be charged for).
    """
    from ..runtime.interpreter import Interpreter

    report = TuneReport()
    tunable = {n.name: n for n in graph.nodes if candidates(n, device)}
    if not tunable:
        return report
    interp = Interpreter(graph, device)
    reps = REPS.get(level, 10)
    state = {"warmed": device.type != "cuda", "done": 0}

    def choose(node: Node, args: list) -> None:
        name = node.name
        cands = candidates(node, device)
        key = cache.key(device, node_signature(node, args))
        hit = cache.entries.get(key)
        state["done"] += 1
        names = {c.name for c in cands} | {"reference"}
        if hit is not None and isinstance(hit.get("ms"), dict):  # choose again: the rule may have changed
            timed = {k: v for k, v in hit["ms"].items() if k in names}
            # a candidate this entry never saw (a tactic added since) means timing again
            fresh = names - set(hit["ms"]) - set(hit.get("failed", []))
            hit = {"tactic": pick(timed)} if timed and not fresh else None
        if hit is not None and hit.get("tactic") in names:
            node.meta["tactic"] = hit["tactic"]
            report.cached += 1
            cache.hits += 1
            return
        if reps == 0:
            node.meta["tactic"] = cands[0].name
            return
        if progress:
            progress(f"tuning {state['done']}/{len(tunable)} {node.op} {name}")
        if not state["warmed"]:
            _warm_gpu(device)
            state["warmed"] = True
        results: dict[str, float] = {}
        failed: list[str] = []
        ctx = OpContext(num_outputs=len(node.outputs), node_name=name)
        want = interp_call_reference(node, args, ctx)
        results["reference"] = _time(lambda: interp_call_reference(node, args, ctx), reps, device)
        for c in cands:
            node.meta["tactic"] = c.name
            consts = dict(interp.consts)
            bound = bind_tactic(node, device, consts)
            if bound is None:
                failed.append(c.name)
                continue
            bargs = [consts[bound.remap[j]] if j in bound.remap else a for j, a in enumerate(args)]
            try:
                # a candidate must compute the node's function before its speed counts
                err = _mismatch(bound.run(bargs, bound.attrs, ctx), want, len(node.outputs))
                if err:
                    raise ValueError(f"output differs from the reference: {err}")
                results[c.name] = _time(lambda: bound.run(bargs, bound.attrs, ctx), reps, device)
            except Exception as e:  # not chosen, and said in the build report
                msg = " ".join(str(e).split())[:300]
                report.failures.append(f"{name} ({node.op}): {c.name}: {type(e).__name__}: {msg}")
                failed.append(c.name)
                log.warning("tactic %s failed on node %s: %s", c.name, name, msg)
        best = pick(results)
        report.timings[name] = {k: round(v, 5) for k, v in results.items()}
        node.meta["tactic"] = best
        cache.entries[key] = {"tactic": best, "ms": results, "failed": failed}
        cache.misses += 1
        report.timed += 1

    def on_step(step: Any, args: list) -> None:
        # a fused step's arguments are its group's inputs, not the sink node's: nodes of a fused
        # group run inside the generated kernel, so there is no tactic of theirs to time
        node = step.node
        if step.kernel is not None or node.name not in tunable or "tactic" in node.meta:
            return
        choose(node, args)
        report.choices[node.meta["tactic"]] = report.choices.get(node.meta["tactic"], 0) + 1
        bound = bind_tactic(node, device, interp.consts)  # this step now runs with its winner
        if bound is not None:
            interp.bound[node.name] = bound
        else:
            interp.bound.pop(node.name, None)

    for n in tunable.values():
        n.meta.pop("tactic", None)
    interp.on_step = on_step
    with torch.inference_mode():
        interp.run(feeds)
    # nodes not reached at these shapes (e.g. inside a branch) keep the reference
    return report


# the reference (the op's torch function: several kernels, halves widened to fp32) must beat the best
# tactic by this factor: timed alone it can look as fast, but in the graph its extra kernels and
# memory traffic cost more (BERT b1 on the H200: SDPA 16.7 us vs the reference 20.1 us per layer;
# builds where noise flipped such pairs ran 150 kernels instead of 102)
REFERENCE_MARGIN = 0.9


def pick(results: dict[str, float]) -> str:
    """The fastest tactic; the reference only when clearly faster than every tactic."""
    tactics = {k: v for k, v in results.items() if k != "reference"}
    if not tactics:
        return "reference"
    best = min(tactics, key=tactics.get)
    ref = results.get("reference")
    return "reference" if ref is not None and ref < REFERENCE_MARGIN * tactics[best] else best


# relative L2 a tactic may differ from the reference by: the storage type's rounding, accumulated
# in a different order (fp32 allows TF32 GEMMs in tf32 engines)
MISMATCH_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 5e-3, torch.float64: 1e-6}


def _mismatch(got: Any, want: Any, outputs: Optional[int] = None) -> str:
    """'' when a candidate's output matches the reference's, else what differs. ``outputs``: how many
    outputs the node uses (a reference may return optional outputs the node does not have)."""
    gs = list(got) if isinstance(got, tuple) else [got]
    ws = list(want) if isinstance(want, tuple) else [want]
    if outputs is not None:
        gs, ws = gs[:outputs], ws[:outputs]
    if len(gs) != len(ws):
        return f"{len(gs)} outputs, expected {len(ws)}"
    for i, (g, w) in enumerate(zip(gs, ws)):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            return (f"output {i}: {getattr(g, 'dtype', type(g).__name__)}{list(getattr(g, 'shape', []))}, "
                    f"expected {w.dtype}{list(w.shape)}")
        if not w.is_floating_point():
            if not torch.equal(g, w):
                return f"output {i}: values differ"
            continue
        gf, wf = (g.double(), w.double()) if w.dtype == torch.float64 else (g.float(), w.float())
        err = float((gf - wf).norm() / wf.norm().clamp_min(1e-30))
        tol = MISMATCH_TOL.get(w.dtype, 1e-2)
        if not err <= tol:  # NaN fails too
            return f"output {i}: relative L2 {err:.2e} > {tol:.0e}"
    return ""


def interp_call_reference(node: Node, args: list, ctx: OpContext) -> Any:
    from ..ops import get

    return get(node.op).call(args, node.attrs, ctx)
