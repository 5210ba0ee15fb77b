"""Tactic selection: time every applicable choice of each node at the profile's opt shapes.

Winners go into ``node.meta["tactic"]`` and into a timing cache (JSON) keyed by GPU, compute
capability, library versions and the node's signature, so a second build skips the timing. Each
entry records the code hash of every choice it timed (kernels/__init__.py: Choice.code_hash, and
the reference function's): a choice whose code changed since is untimed there, and the node is
timed again. A choice is timed only if its output matches the reference within its own tolerance.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from ..ir.graph import Graph, Node
from ..kernels import DEFAULT_TOLERANCE, Choice, bind_tactic, candidates, get_tactic, reference_hash
from ..kernels.template_choice import KEEP_BY_LEVEL, shortlist
from ..ops import OpContext
from .progress import ProgressFn, report as send_progress

log = logging.getLogger(__name__)

# the timing method is part of the cache key: entries timed another way are not comparable (since
# "graph-replay-engine-tf32", tactics are timed with the engine's TF32 setting, not torch's default)
TIMING_METHOD = "graph-replay-engine-tf32"
COMPILE_WAIT = 600.0  # seconds to wait for a worker's compile before compiling in this process
# builder level -> timed repetitions per candidate (0: no timing, first vendor tactic wins)
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
    pruned: int = 0  # template configurations not compiled nor timed: they cannot win on the layer's shape
    compiled: int = 0  # kernels compiled ahead of time by the worker processes
    compile_seconds: float = 0.0  # their compile time, summed over workers
    # low-precision builds: node -> (ms as built, ms of the same node computed in fp32), and
    # value -> ms of one cast between fp32 and the low type; what choose_fp32_for_speed weighs
    node_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    cast_ms: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def tf32_mode(allow: bool) -> Iterator[None]:
    """Tune with the math the engine will use: fp32 engines run without TF32 (the runtime turns it
    off), but torch's cuDNN default is on, which made fp32 tactics look faster while tuning than
    they run (the widened fp32 reference of a half-precision conv among them)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def select_tactics(graph: Graph, device: torch.device, feeds: dict[str, torch.Tensor], level: int,
                   cache: TimingCache, progress: ProgressFn = None, *, allow_tf32: bool = False,
                   low: Optional[torch.dtype] = None) -> TuneReport:
    """Pick a tactic for every node that has more than the reference. ``feeds``: inputs at opt shapes.

    One run of the graph, in order: each node is timed on the inputs its producers' *chosen*
    tactics made, then runs with its own winner, so every candidate is timed on the layouts it
    will see in the engine (a cuDNN channels-last conv after another one gets an NHWC input, not
    the reference's NCHW one, whose conversion it would otherwise be charged for).

    Before it, a planning run sends the compile of every template configuration that will be timed
    to worker processes (kernels/compile_pool.py), so compiling runs on every core while the
    timing run waits only for the kernels of the node at hand. Template configurations that cannot
    win on a layer's shape are neither compiled nor timed (kernels/template_choice.py).

    ``low``: the build's reduced precision (torch.float16/bfloat16), or None. Then every node
    computed in it is also timed as it would run in fp32, and every value's cast, for
    precision.choose_fp32_for_speed: a layer whose fp16 kernel loses to fp32 (a reference that
    widens to fp32 internally, say) is kept fp32 when that is faster casts included.
    """
    from ..runtime.interpreter import Interpreter

    report = TuneReport()
    tunable = {n.name: n for n in graph.nodes if candidates(n, device)}
    if not tunable and low is None:
        return report
    reps = REPS.get(level, 10)
    keep = KEEP_BY_LEVEL.get(level, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    with tf32_mode(allow_tf32), torch.inference_mode():
        interp = Interpreter(graph, device)
        for n in tunable.values():
            n.meta.pop("tactic", None)
        compiles: dict[str, list[Future]] = {}
        if reps and device.type == "cuda":
            from .compile_plan import plan_compiles

            compiles = plan_compiles(device, interp, feeds, tunable, cache, keep, sms, report)
        tuner = _Tuner(graph, device, interp, tunable, cache, reps, keep, sms, report, progress, compiles, low)
        interp.on_step = tuner.on_step
        try:
            outputs = interp.run(feeds)
        finally:
            interp.on_step = None
        if tuner.precision is not None:
            tuner.precision.time_output_casts(outputs)
    # nodes not reached at these shapes (e.g. inside a branch) keep the reference
    return report


def choice_hashes(op: str, names: "list[str] | set[str]") -> dict[str, str]:
    """name -> code hash of each choice named, and of the op's reference function ("reference")."""
    out = {"reference": reference_hash(op)}
    for n in names:
        c = get_tactic(n)
        if c is not None and n != "reference":
            out[n] = c.code_hash
    return out


def _cached_choice(cache: TimingCache, key: str, hashes: dict[str, str]) -> Optional[str]:
    """The choice a timing-cache entry picks among those in ``hashes`` (name -> code hash; the rule
    may have changed since it was stored), or None when the entry is missing, never timed one of
    them (a choice added since), or timed one whose code has changed since (an edited kernel)."""
    hit = cache.entries.get(key)
    if hit is None or not isinstance(hit.get("ms"), dict):
        return None
    code = hit.get("code") if isinstance(hit.get("code"), dict) else {}
    seen = set(hit["ms"]) | set(hit.get("failed", []))
    fresh = {n for n, h in hashes.items() if n not in seen or code.get(n) != h}
    timed = {k: v for k, v in hit["ms"].items() if k in hashes}
    return pick(timed) if timed and not fresh else None


def _bound_args(node: Node, name: str, device: torch.device, interp: Any, args: list) -> "tuple[Any, list] | None":
    """Bind tactic ``name`` to ``node`` (its weights prepared into a copy of the interpreter's
    constants) and the arguments it runs on, or None if it cannot bind."""
    node.meta["tactic"] = name
    consts = dict(interp.consts)
    bound = bind_tactic(node, device, consts)  # (the choice itself: bound.choice)
    if bound is None:
        return None
    return bound, [consts[bound.remap[j]] if j in bound.remap else a for j, a in enumerate(args)]


def report_progress(progress: ProgressFn, stage: str, done: int, total: int, item: str = "") -> None:
    try:
        send_progress(progress, stage, done, total, item)
    except Exception:  # a broken progress display must not fail the build
        log.debug("progress callback failed", exc_info=True)


class _Tuner:
    """The timing run's per-step hook: choose each tunable node's tactic, and in low-precision
    builds time what computing a node in fp32 would cost."""

    def __init__(self, graph: Graph, device: torch.device, interp: Any, tunable: dict[str, Node],
                 cache: TimingCache, reps: int, keep: int, sms: int, report: TuneReport, progress: ProgressFn,
                 compiles: dict[str, list[Future]], low: Optional[torch.dtype]):
        self.graph, self.device, self.interp, self.tunable, self.cache = graph, device, interp, tunable, cache
        self.reps, self.keep, self.sms, self.report, self.progress = reps, keep, sms, report, progress
        self.compiles = compiles
        self.waited: set[int] = set()  # compile futures already counted
        self.warmed = device.type != "cuda"
        self.done = 0
        self.precision = None
        if low is not None:
            from .precision_timing import PrecisionTimer

            self.precision = PrecisionTimer(self, low)

    def on_step(self, step: Any, args: list) -> None:
        node = step.node
        if self.precision is not None:
            self.precision.time_casts(step, args)
        # a fused step's arguments are its group's inputs, not the sink node's: nodes of a fused
        # group run inside the generated kernel, so there is no tactic of theirs to time
        if step.kernel is not None:
            return
        if node.name in self.tunable and "tactic" not in node.meta:
            ms = self.choose(node, args)
            self.report.choices[node.meta["tactic"]] = self.report.choices.get(node.meta["tactic"], 0) + 1
            b = bind_tactic(node, self.device, self.interp.consts)  # this step now runs with its winner
            if b is not None:
                self.interp.bound[node.name] = b
            else:
                self.interp.bound.pop(node.name, None)
        else:
            ms = None
        if self.precision is not None and self.reps:
            self.precision.time_in_fp32(node, args, ms)

    def choose(self, node: Node, args: list) -> Optional[float]:
        """Pick ``node``'s tactic; returns the winner's ms when known (timed now or cached)."""
        name, device, report = node.name, self.device, self.report
        names = shortlist([c.name for c in candidates(node, device)], args, node.attrs, self.keep, self.sms)
        report.pruned += sum(1 for c in candidates(node, device) if c.name not in names)
        key = self.cache.key(device, node_signature(node, args))
        self.done += 1
        hashes = choice_hashes(node.op, names)
        cached = _cached_choice(self.cache, key, hashes)
        if cached is not None:
            node.meta["tactic"] = cached
            report.cached += 1
            self.cache.hits += 1
            return (self.cache.entries[key].get("ms") or {}).get(cached)
        if self.reps == 0:
            node.meta["tactic"] = names[0] if names else "reference"
            return None
        if self.compiles:
            jobs = {id(f): f for fs in self.compiles.values() for f in fs}
            report_progress(self.progress, "compile", sum(f.done() for f in jobs.values()), len(jobs))
        report_progress(self.progress, "tune", self.done, len(self.tunable), f"{node.op} {name}")
        if not self.warmed:
            _warm_gpu(device)
            self.warmed = True
        for fut in self.compiles.get(name, []):  # this node's kernels, compiled by the workers
            try:
                seconds = fut.result(timeout=COMPILE_WAIT)
                if id(fut) not in self.waited:
                    self.waited.add(id(fut))
                    report.compile_seconds += seconds
            except Exception as e:  # compiled (or failed, and said so) below, in this process
                log.info("ahead-of-time compile for %s failed: %s", name, e)
        results, failed = self.time_candidates(node, args, names)
        best = pick(results)
        report.timings[name] = {k: round(v, 5) for k, v in results.items()}
        node.meta["tactic"] = best
        self.cache.entries[key] = {"tactic": best, "ms": results, "failed": failed,
                                   "code": {n: hashes[n] for n in [*results, *failed] if n in hashes}}
        self.cache.misses += 1
        report.timed += 1
        return results.get(best)

    def time_candidates(self, node: Node, args: list, names: list[str],
                        reps: Optional[int] = None) -> tuple[dict[str, float], list[str]]:
        """Median ms of the reference and of each tactic in ``names`` that matches it; the failed ones."""
        reps = reps or self.reps
        ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name, memo={})
        t0 = time.perf_counter()
        want = interp_call_reference(node, args, ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        first_ms = (time.perf_counter() - t0) * 1e3  # an upper bound of one reference run (with its launches)
        results: dict[str, float] = {}
        failed: list[str] = []
        for cname in names:
            b = _bound_args(node, cname, self.device, self.interp, args)
            if b is None:
                failed.append(cname)
                continue
            bound, bargs = b
            try:
                # a candidate must compute the node's function (within its tolerance) before its speed counts
                err = _mismatch(bound.run(bargs, bound.attrs, ctx), want, len(node.outputs), bound.choice)
                if err:
                    raise ValueError(f"output differs from the reference: {err}")
                results[cname] = _time(lambda: bound.run(bargs, bound.attrs, ctx), reps, self.device)
            except Exception as e:  # not chosen, and said in the build report
                msg = " ".join(str(e).split())[:300]
                self.report.failures.append(f"{node.name} ({node.op}): {cname}: {type(e).__name__}: {msg}")
                failed.append(cname)
                log.warning("tactic %s failed on node %s: %s", cname, node.name, msg)
        best = min(results.values(), default=None)
        if best is not None and first_ms > REFERENCE_SKIP * best:
            # far slower than a tactic (the exact float64 reference of a quantized layer takes milliseconds):
            # it cannot win, and timing its repetitions would cost more than the rest of the node
            results["reference"] = round(first_ms, 5)
        else:
            results["reference"] = _time(lambda: interp_call_reference(node, args, ctx), reps, self.device)
        return results, failed

# the reference (the op's torch function: several kernels, halves widened to fp32) must beat the best
# tactic by this factor: timed alone it can look as fast, but in the graph its extra kernels and
# memory traffic cost more (BERT b1 on the H200: SDPA 16.7 us vs the reference 20.1 us per layer;
# builds where noise flipped such pairs ran 150 kernels instead of 102)
REFERENCE_MARGIN = 0.9
REFERENCE_SKIP = 20.0  # one reference run this many times the best tactic's median: not timed further


def pick(results: dict[str, float]) -> str:
    """The fastest tactic; the reference only when clearly faster than every tactic."""
    tactics = {k: v for k, v in results.items() if k != "reference"}
    if not tactics:
        return "reference"
    best = min(tactics, key=tactics.get)
    ref = results.get("reference")
    return "reference" if ref is not None and ref < REFERENCE_MARGIN * tactics[best] else best


MISMATCH_TOL = DEFAULT_TOLERANCE  # a choice without tolerances of its own is held to these


def _mismatch(got: Any, want: Any, outputs: Optional[int] = None, choice: Optional[Choice] = None) -> str:
    """'' when a candidate's output matches the reference's, else what differs. ``outputs``: how many
    outputs the node uses (a reference may return optional outputs the node does not have);
    ``choice``: the candidate, whose tolerances apply (the defaults without one)."""
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
        tol = choice.tolerance_for(w.dtype) if choice is not None else MISMATCH_TOL.get(
            w.dtype, 1e-2 if w.is_floating_point() else None)
        if tol is None:  # integers: equal
            if not torch.equal(g, w):
                return f"output {i}: values differ"
            continue
        gf, wf = (g.double(), w.double()) if w.dtype == torch.float64 else (g.float(), w.float())
        err = float((gf - wf).norm() / wf.norm().clamp_min(1e-30))
        if not err <= tol:  # NaN fails too
            return f"output {i}: relative L2 {err:.2e} > {tol:.0e}"
    return ""


def interp_call_reference(node: Node, args: list, ctx: OpContext) -> Any:
    from ..ops import get

    return get(node.op).call(args, node.attrs, ctx)
