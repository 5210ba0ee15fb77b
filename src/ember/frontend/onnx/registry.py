"""Converters from ONNX nodes to IR nodes, registered by (op_type, since_version).

Most ONNX ops map one-to-one onto the IR op of the same name (the default converter). A converter
is needed where an older opset spelled the same op differently (attribute vs input, other
defaults, other semantics): it normalizes the node to the newest semantics.

    @converter("Clip", until=10)          # opsets 1..10
    def clip_v6(b: NodeBuilder) -> None:
        lo, hi = b.attr("min", -3.4e38), b.attr("max", 3.4e38)
        b.emit("Clip", [b.input(0), b.const_f32(lo), b.const_f32(hi)])
"""
from __future__ import annotations

from typing import Callable

from ...ops.registry import LoadOnce

ConverterFn = Callable[["NodeBuilder"], None]  # noqa: F821  (NodeBuilder lives in importer.py)

# op_type -> list of (first_opset, last_opset, fn)
CONVERTERS: dict[str, list[tuple[int, int, ConverterFn]]] = {}


def converter(op_type: str, since: int = 1, until: int = 10_000) -> Callable[[ConverterFn], ConverterFn]:
    """Register ``fn`` for ``op_type`` at model opsets ``since..until`` (inclusive)."""

    def deco(fn: ConverterFn) -> ConverterFn:
        CONVERTERS.setdefault(op_type, []).append((since, until, fn))
        return fn

    return deco


def find_converter(op_type: str, opset: int) -> "ConverterFn | None":
    _load_all()
    for lo, hi, fn in CONVERTERS.get(op_type, []):
        if lo <= opset <= hi:
            return fn
    return None


def _import_converters() -> None:
    from ...ops.registry import import_submodules
    from . import converters as pkg

    import_submodules(pkg)


# thread-safe and filled before anyone reads CONVERTERS (models may be imported on several threads)
_load_all = LoadOnce(_import_converters)
