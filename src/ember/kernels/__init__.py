"""Kernels: the choices that can run an IR node, and how to find one by name.

A choice (Inductor's ``select_algorithm`` calls them so) is one way to execute an op: the
``reference`` (the op's torch function, always available), vendor kernels reached through torch
(cuDNN, cuBLAS/cuBLASLt, SDPA, ``torch._int_mm``, ``torch._scaled_mm``), and generated Triton
kernels. A :class:`Choice` carries

- its parameters (``params``: tile configuration, layouts...), which its name spells out
  (``triton.gemm[128x64x32,w4,s4]``: family ``triton.gemm``, tile 128x64x32, 4 warps, 4 stages);
- a hash of its code (:attr:`Choice.code_hash`: the source of its run, applicability and weight
  preparation functions and of the kernels it launches, as Inductor keys its autotuning cache on a
  choice's source), which the timing cache keys each timing on, so an edited kernel is timed again;
- its tolerance for the tuner's correctness gate (relative L2 from the reference, per output
  dtype; quantized outputs compared as numbers, not bit for bit).

The builder times the applicable choices and writes the winner's name into ``node.meta["tactic"]``
(graph.json). At load the runtime finds the choice by that name, rebuilding a template choice from
the parameters its name carries (:data:`FAMILIES`); a name that no choice of this ember answers is
a fallback the engine refuses (``FallbackError``) unless told to run the reference instead.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..ir.graph import Node
from ..ops.registry import LoadOnce

RunFn = Callable[[list, dict, Any], Any]  # (inputs, attrs, OpContext) -> outputs
PrepareFn = Callable[[Node, "dict[str, torch.Tensor]"], "dict[int, tuple[str, torch.Tensor]]"]

# relative L2 a choice's outputs may differ from the reference's, by output dtype: the storage
# type's rounding, accumulated in a different order (fp32 allows TF32 GEMMs in tf32 engines).
# Integer outputs must be equal unless a choice says otherwise (quantized outputs: a requantized
# value may land one step away where the float epilogue rounds a hair differently).
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 5e-3,
                                               torch.float64: 1e-6}
QUANTIZED_TOLERANCE: dict[torch.dtype, float] = {torch.int8: 2e-2, torch.uint8: 2e-2}


def source_of(obj: Any) -> str:
    """The source text of a function or Triton kernel (what a change to it changes)."""
    fn = getattr(obj, "fn", obj)  # a @triton.jit kernel wraps its Python function
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True, eq=False)
class Choice:
    """One way to run a node: code (``run``, ``applies``, ``prepare``, and the kernels in ``code``)
    with parameters. ``prepare`` readies constant inputs once (weights to channels-last, int8...):
    {input position: (new constant key, tensor)}; the step then reads the new key."""

    name: str
    ops: tuple[str, ...]
    applies: Callable[[Node, torch.device], bool]
    run: RunFn
    prepare: Optional[PrepareFn] = None
    family: str = ""  # the name without its parameters ('' : the name itself)
    params: Mapping[str, Any] = field(default_factory=dict)
    code: tuple[Any, ...] = ()  # kernels and helpers the run launches (their source is hashed)
    tolerance: Mapping[torch.dtype, float] = field(default_factory=dict)  # over DEFAULT_TOLERANCE

    @functools.cached_property
    def code_hash(self) -> str:
        h = hashlib.sha256(f"{self.family or self.name}|{sorted((k, str(v)) for k, v in self.params.items())}".encode())
        for part in (self.run, self.applies, self.prepare, *self.code):
            if part is not None:
                h.update(source_of(part).encode())
        return h.hexdigest()[:16]

    def tolerance_for(self, dtype: torch.dtype) -> Optional[float]:
        """Relative L2 this choice may differ from the reference by on an output of ``dtype``; None:
        equal (integers)."""
        return self.tolerance.get(dtype, DEFAULT_TOLERANCE.get(dtype, None if not dtype.is_floating_point else 1e-2))


Tactic = Choice  # the name the builder and the tests grew up with

TACTICS: dict[str, Choice] = {}
# family -> make(params text) -> Choice or None: choices rebuilt from the parameters a name carries
FAMILIES: dict[str, Callable[[str], Optional[Choice]]] = {}
_PARSED: dict[str, Optional[Choice]] = {}


def tactic(name: str, ops: tuple[str, ...], applies: Callable[[Node, torch.device], bool],
           prepare: Optional[PrepareFn] = None, **choice: Any) -> Callable[[RunFn], RunFn]:
    """Register ``fn`` as the run function of choice ``name`` (extra fields: family, params, code, tolerance)."""
    def deco(fn: RunFn) -> RunFn:
        TACTICS[name] = Choice(name, ops, applies, fn, prepare, **choice)
        return fn
    return deco


def candidates(node: Node, device: torch.device) -> list[Choice]:
    """Choices that can run this node on this device (the reference is implied and not listed)."""
    _load()
    out = []
    for t in TACTICS.values():
        if node.op in t.ops:
            try:
                ok = t.applies(node, device)
            except Exception:
                ok = False
            if ok:
                out.append(t)
    return out


def get_tactic(name: str) -> Optional[Choice]:
    """The choice ``name`` names: a registered one, or one its family rebuilds from the parameters
    in the name (a tile configuration no longer in the tuning lists still runs); None if unknown."""
    _load()
    t = TACTICS.get(name)
    if t is not None or "[" not in name or not name.endswith("]"):
        return t
    if name not in _PARSED:
        family, params = name[:-1].split("[", 1)
        make = FAMILIES.get(family)
        try:
            _PARSED[name] = make(params) if make is not None else None
        except (ValueError, TypeError):
            _PARSED[name] = None
    return _PARSED[name]


def reference_hash(op: str) -> str:
    """The code hash of an op's reference function (its timing entry is keyed on it too)."""
    from ..ops import get

    return hashlib.sha256(source_of(get(op).fn).encode()).hexdigest()[:16]


def _register_tactics() -> None:
    from . import vendor  # noqa: F401  (registers the vendor tactics)
    from . import pool  # noqa: F401  (pooling tactics)
    from . import triton_templates  # noqa: F401  (registers the Triton GEMM/conv template tactics)
    from . import quantized  # noqa: F401  (INT8/FP8 GEMM and conv choices)
    from . import rnn  # noqa: F401  (cuDNN LSTM)


# thread-safe and filled before anyone reads TACTICS (server instances load engines in parallel)
_load = LoadOnce(_register_tactics)


@dataclass
class BoundTactic:
    """A choice bound to one node: what the runtime calls instead of the reference function."""

    name: str
    run: RunFn
    attrs: dict[str, Any]  # the node's attributes plus what the choice precomputed
    remap: dict[int, str]  # input position -> constant key prepared for this choice
    choice: Optional[Choice] = None


def bind_tactic(node: Node, device: torch.device, consts: dict[str, torch.Tensor]) -> Optional[BoundTactic]:
    """Bind node.meta['tactic'] for this device; None means run the reference function.

    A name no choice answers, or a choice that cannot run here, binds nothing: the interpreter
    lists the node among its fallbacks, and the engine refuses to load unless allowed to run the
    reference function instead (still correct, not the tuned kernel).
    """
    name = node.meta.get("tactic", "reference")
    if name == "reference":
        return None
    t = get_tactic(name)
    if t is None or node.op not in t.ops or not t.applies(node, device):
        return None
    from .vendor import bind

    remap: dict[int, str] = {}
    if t.prepare is not None:
        for pos, (key, tensor) in t.prepare(node, consts).items():
            consts[key] = tensor
            remap[pos] = key
    return BoundTactic(name, t.run, {**node.attrs, **bind(node, name)}, remap, t)
