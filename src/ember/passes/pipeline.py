"""The fixed pass pipeline of each optimization level, run to a fixed point.

    level 0  nothing: the graph as imported (values keep their ONNX names; compare --all-layers)
    level 1  cleanup: constant and shape folding, constant Ifs inlined and loop invariants forwarded,
             no-op removal, CSE, dead code
    level 2  + BatchNorm/scale folding, MatMul+Add -> GEMM, epilogues, pattern recognition
             (LayerNorm, RMSNorm, GELU, SiLU, HardSwish, Softmax, attention), quantized models onto
             INT8/FP8 anchors (Q/DQ pairs, QOperator forms: qdq.py), fusion groups
    level 3  + horizontal GEMM merging (Q/K/V projections sharing an input -> one GEMM), attention on
             the (B, S, hidden) layout (head split/merge transposes absorbed)

Every pass rewrites If/Loop/Scan bodies as well as the main graph (see scope.py for how bodies
read outer values). The rewriting passes repeat until none changes the graph; the final passes
(fusion grouping) annotate the result once. In debug mode the graph is verified (scopes
included: no body may read a value, or a constant, that no enclosing graph holds), and every
value checked for a dtype, after each pass, so a broken rewrite is named the moment it happens.
"""
from __future__ import annotations

from typing import Callable

from ..errors import GraphError
from ..ir.graph import Graph
from ..ir.verify import verify
from ..ops import known_ops
from .anchors import fold_into_anchors, fuse_epilogues
from .attention import absorb_head_layout, recognize_attention
from .cleanup import eliminate_common_subexpressions, fold_constants, fold_shapes, remove_dead_code
from .control import simplify_control_flow
from .fusion import group_fusions
from .gemm_merge import merge_parallel_gemms
from .noops import remove_noops
from .patterns import recognize_patterns
from .qdq import fold_quantization
from .rewrite import PassContext
from .scope import check_scopes, nested_graphs

Pass = Callable[[Graph, PassContext], bool]
MAX_ROUNDS = 8

CLEANUP: list[Pass] = [fold_shapes, fold_constants, simplify_control_flow, remove_noops, eliminate_common_subexpressions,
                       remove_dead_code]
# quantized models: Q/DQ onto quantized anchors before constant folding dequantizes their weights
QUANTIZED: list[Pass] = CLEANUP[:1] + [fold_quantization] + CLEANUP[1:]
LEVELS: dict[int, tuple[list[Pass], list[Pass]]] = {
    0: ([], []),
    1: (CLEANUP, []),
    2: (QUANTIZED + [recognize_patterns, recognize_attention, fold_into_anchors, fuse_epilogues], [group_fusions]),
    3: (QUANTIZED + [recognize_patterns, recognize_attention, absorb_head_layout, fold_into_anchors,
                     merge_parallel_gemms, fuse_epilogues], [group_fusions]),
}


def passes_for_level(opt_level: int) -> tuple[list[Pass], list[Pass]]:
    if opt_level not in LEVELS:
        raise GraphError(f"optimization level {opt_level} does not exist; use 0, 1, 2 or 3")
    return LEVELS[opt_level]


def run_pipeline(graph: Graph, opt_level: int = 2, debug: bool = False,
                 ctx: "PassContext | None" = None) -> list[str]:
    """Optimize ``graph`` in place. Returns the names of the passes that changed it, in order."""
    ctx = ctx or PassContext(opt_level=opt_level, debug=debug)
    rewriting, final = passes_for_level(opt_level)
    changed: list[str] = []
    for _ in range(MAX_ROUNDS):
        any_change = False
        for p in rewriting:
            if _run(p, graph, ctx):
                changed.append(p.__name__)
                any_change = True
        if not any_change:
            break
    for p in final:
        if _run(p, graph, ctx):
            changed.append(p.__name__)
    return changed


def _all_values(graph: Graph) -> list:
    return [v for g in [graph, *nested_graphs(graph)] for v in g.values()]


def _run(p: Pass, graph: Graph, ctx: PassContext) -> bool:
    untyped_before = {id(v) for v in _all_values(graph) if v.dtype is None} if ctx.debug else set()
    did = p(graph, ctx)
    if ctx.debug and did:
        try:
            verify(graph, known_ops())
            check_scopes(graph)
        except GraphError as e:
            raise GraphError(f"pass '{p.__name__}' left a malformed graph: {e}") from None
        for v in _all_values(graph):
            if v.kind == "tensor" and v.dtype is None and id(v) not in untyped_before:
                raise GraphError(f"pass '{p.__name__}' created value '{v.name}' without a dtype; "
                                 "build new nodes through Editor.emit so their types are inferred")
    return did
