"""Optimization profiles: static shapes folded at build time, or min/opt/max ranges per input."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import EmberError
from ..ir.graph import Graph
from ..ir.shapes import Sym, substitute
from ..ops.torch_types import to_torch

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


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
                if isinstance(d, Sym) and len(d.symbols) == 1 and str(d) in d.symbols:
                    if env.setdefault(str(d), n) != n:
                        raise EmberError(f"--shapes gives dim '{d}' two values: {env[str(d)]} and {n}")
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


def opt_feeds(graph: Graph, profiles: list[Profile], device: torch.device, which: int = 1) -> dict[str, torch.Tensor]:
    """Random inputs at the first profile's opt shapes (``which``: 0 min, 1 opt, 2 max; symbolic
    dims elsewhere: 1)."""
    rng = np.random.default_rng(0)
    opt = profiles[0] if profiles else {}
    feeds = {}
    for v in graph.inputs:
        if v.name in opt:
            shape = opt[v.name][which]
        else:
            shape = tuple(d if isinstance(d, int) else 1 for d in (v.shape or ()))
        dt = to_torch(v.dtype)
        if v.dtype.is_float:
            t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dt)
        elif dt == torch.bool:
            t = torch.from_numpy(rng.random(shape) < 0.5)
        else:
            t = torch.from_numpy(rng.integers(0, 2, size=shape)).to(dt)
        feeds[v.name] = t.to(device)
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
