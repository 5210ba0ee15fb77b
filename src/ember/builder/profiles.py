"""Optimization profiles: static shapes folded at build time, or min/opt/max ranges per input; and
the shapes the builder tunes at when the user gave none.

A dynamic model built without a profile still needs concrete shapes for tactic timing, the memory
plan and kernel recording. Setting every symbolic dim to 1 is invalid for many models (a Conv whose
kernel is larger than a 1-pixel image, a detector whose feature maps no longer align), so
``tuning_profiles`` chooses them: batch-like dims 1, image and sequence dims typical sizes (the
model's own hints), the rest grown from small sizes until the graph runs on the CPU reference
interpreter. It warns which shapes it chose and how to give a profile; when no shape runs, it raises
an EmberError naming the input, the failing node and the flag to pass.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

from ..errors import EmberError
from ..ir.dtypes import DType
from ..ir.graph import Graph, Value
from ..ir.shapes import Dim, Sym, as_symbol, substitute
from ..ops.torch_types import to_torch

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

IMAGE_SIZE = 320  # a typical detector / recognizer side; a multiple of 64, so stride-32 FPNs align
SEQUENCE_LENGTH = 128  # a typical token or frame count
GROWTH = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_TRIAL_ELEMENTS = 1 << 26  # larger input sets are not tried (the trial runs on the CPU)
_BATCH_NAMES = {"n", "b", "bs", "bsz", "batch", "batch_size", "batchsize", "num_batch", "nbatch"}
_SEQUENCE_WORDS = ("seq", "len", "token", "time", "frame", "step", "word", "char", "text", "past")


class TuningShapeWarning(UserWarning):
    """The builder chose the shapes to tune at, because no profile or static shape gave them."""


# -- checking what the user gave -----------------------------------------------------------------
def _check_shape(graph: Graph, name: str, shape: tuple[int, ...], what: str) -> None:
    inputs = {v.name: v for v in graph.inputs}
    if name not in inputs:
        raise EmberError(f"{what} names input '{name}', which the model does not have; its inputs: "
                         + ", ".join(v.name for v in graph.inputs))
    v = inputs[name]
    if v.shape is not None:
        if len(v.shape) != len(shape):
            raise EmberError(f"{what} gives '{name}' rank {len(shape)}; the model's input has rank {len(v.shape)} "
                             f"({[str(d) for d in v.shape]})")
        for i, (d, want) in enumerate(zip(shape, v.shape)):
            if isinstance(want, int) and d != want:
                raise EmberError(f"{what}: '{name}' axis {i} is fixed to {want} in the model, not {d}")


def check_profiles(graph: Graph, config) -> list[Profile]:
    for name, shape in config.shapes.items():
        _check_shape(graph, name, tuple(shape), "--shapes")
    out = []
    for i, p in enumerate(config.profiles):
        for name, (lo, opt, hi) in p.items():
            for tag, s in (("min", lo), ("opt", opt), ("max", hi)):
                _check_shape(graph, name, tuple(s), f"profile {i} {tag}-shapes")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise EmberError(f"profile {i}: '{name}' needs min <= opt <= max on every axis; got "
                                 f"{list(lo)} / {list(opt)} / {list(hi)}")
        out.append({k: (tuple(a), tuple(b), tuple(c)) for k, (a, b, c) in p.items()})
    return out


def bind_static_shapes(graph: Graph, shapes: dict[str, tuple[int, ...]]) -> None:
    """Replace the symbolic dims the given shapes pin down, everywhere in the graph."""
    env: dict[str, int] = {}
    for v in graph.inputs:
        if v.name in shapes and v.shape is not None:
            for d, n in zip(v.shape, shapes[v.name]):
                name = as_symbol(d)
                if name is not None and env.setdefault(name, n) != n:
                    raise EmberError(f"--shapes gives dim '{name}' two values: {env[name]} and {n}")
            v.shape = tuple(shapes[v.name])
    if not env:
        return

    def visit(g: Graph) -> None:
        for val in g.values():
            if val.shape is not None:
                val.shape = substitute(val.shape, env)
        for n in g.nodes:
            for sg in n.subgraphs():
                visit(sg)

    visit(graph)


# -- feeds ----------------------------------------------------------------------------------------
_COMPARISONS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}
_PASS_THROUGH = {"Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"}


def value_hints(graph: Graph) -> dict[str, np.ndarray]:
    """Values for the inputs whose values key a plan (small integer inputs that decide an If or a
    shape: runtime/specialize.value_inputs), taken from the constant each is compared with, e.g.
    Silero VAD's ``sr`` compared with 16000. Random values there would send tuning and fidelity runs
    down a branch the model rejects at the other inputs' shapes."""
    from ..runtime.specialize import value_inputs

    hints: dict[str, np.ndarray] = {}
    users: dict[int, list] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                users.setdefault(id(v), []).append(n)
    for name in sorted(value_inputs(graph)):
        v = next(x for x in graph.inputs if x.name == name)
        frontier, seen = [v], set()
        while frontier and name not in hints:
            cur = frontier.pop()
            for n in users.get(id(cur), []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op in _PASS_THROUGH and n.inputs[0] is cur:
                    frontier.extend(n.outputs)
                elif n.op in _COMPARISONS:
                    other = next((x for x in n.inputs if x is not None and x is not cur and x.is_const), None)
                    if other is not None and np.asarray(other.data).size >= 1:
                        hints[name] = np.asarray(other.data).reshape(-1)[0]
                        break
    return hints


def random_input(v: Value, shape: tuple[int, ...], rng: np.random.Generator,
                 hint: "np.ndarray | None" = None) -> torch.Tensor:
    """Random data for an input: normal floats, booleans, ints in {0, 1} (valid ids, indices,
    lengths); a ``hint`` (value_hints) fills the input instead."""
    dt = to_torch(v.dtype)
    if hint is not None:
        return torch.from_numpy(np.broadcast_to(np.asarray(hint), shape).copy()).to(dt)
    if v.dtype.is_float:
        return torch.from_numpy(np.asarray(rng.standard_normal(shape), dtype=np.float32)).to(dt)
    if dt == torch.bool:
        return torch.from_numpy(np.asarray(rng.random(shape) < 0.5))  # a 0-d draw is a numpy scalar
    return torch.from_numpy(np.asarray(rng.integers(0, 2, size=shape))).to(dt)


def opt_feeds(graph: Graph, profiles: list[Profile], device: torch.device, which: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs at the first profile's opt shapes (``which``: 0 min, 1 opt, 2 max; symbolic
    dims no profile covers: 1). Pass ``tuning_profiles(...)`` to cover every input."""
    rng = np.random.default_rng(0)
    opt = profiles[0] if profiles else {}
    hints = value_hints(graph)
    feeds = {}
    for v in graph.inputs:
        if v.name in opt:
            shape = tuple(opt[v.name][which])
        else:
            shape = tuple(d if isinstance(d, int) else 1 for d in (v.shape or ()))
        feeds[v.name] = random_input(v, shape, rng, hints.get(v.name)).to(device)
    return feeds


def profile_feeds(graph: Graph, profiles: list[Profile], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Random inputs at every profile's min, opt and max shapes, each distinct set of shapes once
    (a static build: one set)."""
    seen: set = set()
    for p in profiles or [{}]:
        for which in (0, 1, 2) if p else (1,):
            shapes = tuple(sorted((k, tuple(v[which])) for k, v in p.items()))
            if shapes not in seen:
                seen.add(shapes)
                yield opt_feeds(graph, [p] if p else [], device, which)


# -- tuning shapes for dims nobody gave ---------------------------------------------------------
@dataclass
class _Free:
    """Symbols of the inputs that no profile binds: which are batch-like, which have a typical size."""

    batch: set[str] = field(default_factory=set)
    hints: dict[str, int] = field(default_factory=dict)
    grow: list[str] = field(default_factory=list)  # no hint: grown from 1

    @property
    def names(self) -> list[str]:
        return sorted(self.batch) + sorted(self.hints) + self.grow


def _is_batch_name(name: str) -> bool:
    low = name.lower()
    return low in _BATCH_NAMES or "batch" in low


def _hint(v: Value, axis: int, name: str) -> Optional[int]:
    """A typical size for axis ``axis`` of input ``v`` (symbol ``name``), from what the input looks like."""
    shape, low = v.shape or (), name.lower()
    if len(shape) == 4 and v.dtype is not None and v.dtype.is_float:
        nchw = isinstance(shape[1], int) and shape[1] <= 4 and axis in (2, 3)
        nhwc = isinstance(shape[3], int) and shape[3] <= 4 and axis in (1, 2)
        if nchw or nhwc:
            return IMAGE_SIZE
    if len(shape) == 2 and axis == 1 and v.dtype in (DType.INT64, DType.INT32):
        return SEQUENCE_LENGTH  # token ids, masks, positions
    if any(w in low for w in _SEQUENCE_WORDS):
        return SEQUENCE_LENGTH
    return None


def _free_symbols(graph: Graph, bound: set[str]) -> _Free:
    free = _Free()
    seen: set[str] = set(bound)
    uses: dict[str, list[tuple[Value, int]]] = {}
    for v in graph.inputs:
        for axis, d in enumerate(v.shape or ()):
            if isinstance(d, Sym):
                for s in sorted(d.symbols):
                    uses.setdefault(s, []).append((v, axis))
    for s, where in uses.items():
        if s in seen:
            continue
        seen.add(s)
        if _is_batch_name(s) or any(axis == 0 and len(v.shape or ()) >= 2 and as_symbol(v.shape[0]) == s
                                    and not any(w in s.lower() for w in _SEQUENCE_WORDS) for v, axis in where):
            free.batch.add(s)
            continue
        hint = next((h for v, axis in where if (h := _hint(v, axis, s)) is not None), None)
        if hint is not None:
            free.hints[s] = hint
        else:
            free.grow.append(s)
    return free


def _shapes_at(graph: Graph, profile: dict, which: int, env: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every input: the profile's where it has them, the others from the symbols
    the profile's inputs bind, then from ``env``."""
    dims = dict(env)
    for v in graph.inputs:
        if v.name in profile and v.shape is not None:
            for d, n in zip(v.shape, profile[v.name][which]):
                if as_symbol(d) is not None:
                    dims[as_symbol(d)] = int(n)
    out = {}
    for v in graph.inputs:
        if v.name in profile:
            out[v.name] = tuple(profile[v.name][which])
        else:
            out[v.name] = tuple(d if isinstance(d, int) else d.evaluate(dims) for d in (v.shape or ()))
    return out


def _bound_symbols(graph: Graph, profile: dict) -> set[str]:
    return {as_symbol(d) for v in graph.inputs if v.name in profile for d in (v.shape or ())
            if as_symbol(d) is not None}


class _Search:
    """Symbol values tried on the CPU reference interpreter, each set of input shapes at most once."""

    def __init__(self, graph: Graph, first: dict, validate: bool):
        self.graph, self.first, self.validate = graph, first, validate
        self.tried: list[tuple[dict[str, tuple[int, ...]], str]] = []  # shapes that failed, and why
        self._seen: dict[tuple, bool] = {}
        self._interp: Any = None

    def runs(self, env: dict[str, int]) -> bool:
        shapes = _shapes_at(self.graph, self.first, 1, env)
        key = tuple(sorted(shapes.items()))
        if key in self._seen:
            return self._seen[key]
        if sum(int(np.prod(s)) for s in shapes.values()) > MAX_TRIAL_ELEMENTS:
            return False
        why = None
        if self.validate:
            if self._interp is None:
                from ..runtime.interpreter import Interpreter

                self._interp = Interpreter(self.graph, "cpu")
            why = _try(self.graph, self._interp, shapes)
        if why is not None:
            self.tried.append((shapes, why))
        self._seen[key] = why is None
        return why is None


def _discover(free: _Free, search: _Search) -> Optional[dict[str, int]]:
    """Values for the free symbols at which the graph runs: the hints if they run; else the smallest
    common size that runs (batch-like dims too, if need be), then each hinted symbol raised to its hint
    and each other one lowered to 1 where the graph still runs (an OCR recognizer: height stays 32,
    width goes to 320)."""
    base = {s: 1 for s in free.batch}
    env = {**base, **free.hints, **{s: 1 for s in free.grow}}
    if search.runs(env):
        return env
    others = list(free.hints) + free.grow
    found = next((e for g in GROWTH if search.runs(e := {**base, **{s: g for s in others}})), None)
    if found is None and free.batch:  # a batch of 1 may be too few (index inputs counting rows)
        found = next((e for g in GROWTH if search.runs(e := {s: g for s in free.names})), None)
    if found is None:
        return None
    for s, want in [*free.hints.items(), *((s, 1) for s in free.grow), *((s, 1) for s in sorted(free.batch))]:
        if found[s] != want and search.runs(trial := {**found, s: want}):
            found = trial
    return found


def _spec(shapes: dict[str, tuple[int, ...]]) -> str:
    return " ".join(f"{k}:{'x'.join(map(str, s)) or 'scalar'}" for k, s in shapes.items())


def _try(graph: Graph, interp: Any, shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """None if the graph runs at these shapes on the CPU, else why not (naming the failing node)."""
    rng = np.random.default_rng(0)
    hints = value_hints(graph)
    feeds = {v.name: random_input(v, shapes[v.name], rng, hints.get(v.name)) for v in graph.inputs}
    try:
        with torch.inference_mode():
            interp.run(feeds)
    except Exception as e:  # every failure is a reason to try other shapes; the last one is reported
        return f"{type(e).__name__}: {e}" if not isinstance(e, EmberError) else str(e)
    return None


def tuning_profiles(graph: Graph, profiles: list[Profile], validate: bool = True) -> list[Profile]:
    """``profiles`` with every input covered, for the builder's feeds (never for the manifest): the
    shapes of inputs no profile gives are chosen here, tried on the CPU reference interpreter (unless
    ``validate`` is False), and announced with a TuningShapeWarning."""
    first = profiles[0] if profiles else {}
    uncovered = [v for v in graph.inputs if v.shape is not None and not all(isinstance(d, int) for d in v.shape)
                 and any(v.name not in p for p in profiles or [{}])]
    if not uncovered:
        return profiles
    free = _free_symbols(graph, _bound_symbols(graph, first))
    at_first_opt = {as_symbol(d): int(n) for v in graph.inputs if v.name in first and v.shape is not None
                    for d, n in zip(v.shape, first[v.name][1]) if as_symbol(d) is not None}
    search = _Search(graph, first, validate)
    env = _discover(free, search)
    tried = search.tried
    names = ", ".join(f"'{v.name}' ({v.type_str()})" for v in uncovered)
    if env is not None:
        example = _spec({v.name: _shapes_at(graph, first, 1, env)[v.name] for v in uncovered})
    else:  # a template: the batch 1, the other dims for the user to fill in
        example = " ".join(f"{v.name}:" + "x".join(str(d) if isinstance(d, int) else "1" if as_symbol(d) in free.batch
                                                    else f"<{d}>" for d in v.shape) for v in uncovered)
    how = (f"fix them with --shapes {example}, or give a profile: --opt-shapes {example} with --min-shapes and "
           "--max-shapes (in Python: build(..., shapes={...}) or profiles=[{name: (min, opt, max)}])")
    if env is None:
        tried_text = "; ".join(_spec(s) for s, _ in tried[:4]) + (" ..." if len(tried) > 4 else "")
        first_fail = tried[0][1] if tried else "the inputs would be too large to try"
        last = tried[-1][1] if tried else first_fail
        raise EmberError(
            f"input(s) {names} have dims that no profile or --shapes fixes, and the graph runs at none of the "
            f"{len(tried)} shapes ember tried ({tried_text}). At the first, {first_fail}"
            + (f"; at the last, {last}" if last != first_fail else "") + f". Give the shapes to build for: {how}.")
    env = {**at_first_opt, **env}  # symbols only the first profile binds, for the inputs other profiles lack
    out = []
    for p in profiles or [{}]:
        points = [_shapes_at(graph, p, which, env) for which in range(3)]
        out.append({name: (points[0][name], points[1][name], points[2][name]) for name in points[1]})
    chosen = _spec({v.name: out[0][v.name][1] for v in uncovered})
    warnings.warn(TuningShapeWarning(
        f"input(s) {names} have dims that no profile or --shapes fixes: ember tunes and plans memory at "
        f"{chosen} (the engine still runs at other shapes). To tune for the shapes you serve, {how}."),
        stacklevel=_outside_ember())
    return out


def _outside_ember() -> int:
    """The stacklevel of the first caller outside the ember package (whose line the warning shows)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root + os.sep):
        frame, level = frame.f_back, level + 1
    return level
