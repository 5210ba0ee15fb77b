"""Kernels: the tactics that can run an IR node, and how to pick one by name.

A tactic is a named way to execute one op: ``reference`` (the op's torch function, always
available), vendor kernels reached through torch (cuDNN, cuBLAS/cuBLASLt, SDPA), and generated
Triton kernels. The builder times the applicable tactics and writes the winner's name into
``node.meta["tactic"]``; the runtime resolves that name here: a tactic is code of this package,
chosen by name. The compiled binaries of the Triton kernels an engine launches travel in the engine
file (kernel_store.py), so a load on the same GPU and Triton version compiles nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..ir.graph import Node
from ..ops.registry import LoadOnce

RunFn = Callable[[list, dict, Any], Any]  # (inputs, attrs, OpContext) -> outputs


@dataclass
class Tactic:
    name: str
    ops: tuple[str, ...]
    applies: Callable[[Node, torch.device], bool]
    run: RunFn
    # one-time preparation of constant inputs (e.g. weights to channels_last):
    # returns {input position: (new constant key, tensor)}; the step then reads the new key
    prepare: Optional[Callable[[Node, dict[str, torch.Tensor]], dict[int, tuple[str, torch.Tensor]]]] = None


TACTICS: dict[str, Tactic] = {}


def tactic(name: str, ops: tuple[str, ...], applies: Callable[[Node, torch.device], bool],
           prepare: Optional[Callable] = None) -> Callable[[RunFn], RunFn]:
    def deco(fn: RunFn) -> RunFn:
        TACTICS[name] = Tactic(name, ops, applies, fn, prepare)
        return fn
    return deco


def candidates(node: Node, device: torch.device) -> list[Tactic]:
    """Tactics that can run this node on this device (the reference is implied and not listed)."""
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


def get_tactic(name: str) -> Optional[Tactic]:
    _load()
    return TACTICS.get(name)


def _register_tactics() -> None:
    from . import vendor  # noqa: F401  (registers the vendor tactics)
    from . import pool  # noqa: F401  (pooling tactics)
    from . import triton_templates  # noqa: F401  (registers the Triton GEMM/conv template tactics)


# thread-safe and filled before anyone reads TACTICS (server instances load engines in parallel)
_load = LoadOnce(_register_tactics)


@dataclass
class BoundTactic:
    """A tactic bound to one node: what the runtime calls instead of the reference function."""

    name: str
    run: RunFn
    attrs: dict[str, Any]  # the node's attributes plus what the tactic precomputed
    remap: dict[int, str]  # input position -> constant key prepared for this tactic


def bind_tactic(node: Node, device: torch.device, consts: dict[str, torch.Tensor]) -> Optional[BoundTactic]:
    """Bind node.meta['tactic'] for this device; None means run the reference function.

    A tactic name this ember does not know, or one that cannot run here, falls back to the
    reference function: still correct, just not the tuned kernel (the engine reports it).
    """
    name = node.meta.get("tactic", "reference")
    if name == "reference":
        return None
    t = get_tactic(name)
    if t is None or not t.applies(node, device):
        return None
    from .vendor import bind

    remap: dict[int, str] = {}
    if t.prepare is not None:
        for pos, (key, tensor) in t.prepare(node, consts).items():
            consts[key] = tensor
            remap[pos] = key
    return BoundTactic(name, t.run, {**node.attrs, **bind(node, name)}, remap)
