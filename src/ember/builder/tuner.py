"""Tactic selection: time every applicable tactic of each node at the profile's opt shapes.

Winners go into ``node.meta["tactic"]`` and into a timing cache (JSON) keyed by GPU, compute
capability, library versions and the node's signature, so a second build skips the timing.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..ir.graph import Graph, Node
from ..kernels import bind_tactic, candidates
from ..ops import OpContext

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
    return f"{dev}|torch{torch.__version__}|triton{triton_version}"


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


def _time(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median milliseconds of ``reps`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class TuneReport:
    timed: int = 0
    cached: int = 0
    choices: dict[str, int] = field(default_factory=dict)  # tactic name -> node count


def select_tactics(graph: Graph, device: torch.device, feeds: dict[str, torch.Tensor], level: int,
                   cache: TimingCache, progress: Optional[Callable[[str], None]] = None) -> TuneReport:
    """Pick a tactic for every node that has more than the reference. ``feeds``: inputs at opt shapes."""
    from ..runtime.interpreter import Interpreter

    report = TuneReport()
    tunable = {n.name: n for n in graph.nodes if candidates(n, device)}
    if not tunable:
        return report
    interp = Interpreter(graph, device)
    seen_args: dict[str, list] = {}

    def on_step(step: Any, args: list) -> None:
        # a fused step's arguments are its group's inputs, not the sink node's: nodes of a fused
        # group run inside the generated kernel, so there is no tactic of theirs to time
        if step.kernel is None and step.node.name in tunable and step.node.name not in seen_args:
            seen_args[step.node.name] = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]

    interp.on_step = on_step
    with torch.inference_mode():
        interp.run(feeds)
        reps = REPS.get(level, 10)
        for i, (name, node) in enumerate(tunable.items()):
            args = seen_args.get(name)
            cands = candidates(node, device)
            if args is None:  # not reached at these shapes (e.g. inside a branch): keep the reference
                continue
            key = cache.key(device, node_signature(node, args))
            hit = cache.entries.get(key)
            if hit is not None and (hit["tactic"] == "reference" or any(c.name == hit["tactic"] for c in cands)):
                node.meta["tactic"] = hit["tactic"]
                report.cached += 1
                cache.hits += 1
            elif reps == 0:
                node.meta["tactic"] = cands[0].name
            else:
                if progress:
                    progress(f"tuning {i + 1}/{len(tunable)} {node.op} {name}")
                results: dict[str, float] = {}
                ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name)
                results["reference"] = _time(lambda: interp_call_reference(node, args, ctx), reps, device)
                for c in cands:
                    node.meta["tactic"] = c.name
                    consts = dict(interp.consts)
                    bound = bind_tactic(node, device, consts)
                    if bound is None:
                        continue
                    bargs = [consts[bound.remap[j]] if j in bound.remap else a for j, a in enumerate(args)]
                    try:
                        results[c.name] = _time(lambda: bound.run(bargs, bound.attrs, ctx), reps, device)
                    except Exception:
                        continue  # a tactic that fails here is simply not chosen
                best = min(results, key=results.get)
                node.meta["tactic"] = best
                cache.entries[key] = {"tactic": best, "ms": results}
                cache.misses += 1
                report.timed += 1
            report.choices[node.meta["tactic"]] = report.choices.get(node.meta["tactic"], 0) + 1
    return report


def interp_call_reference(node: Node, args: list, ctx: OpContext) -> Any:
    from ..ops import get

    return get(node.op).call(args, node.attrs, ctx)
