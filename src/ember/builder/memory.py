"""Activation memory plan: what a run needs with lifetime-based reuse, against one buffer per value.

Computed from the specialization at the profile's opt shapes (every value's size and the step after
which it dies). The runtime's allocator (torch's caching allocator, one private pool per CUDA-graph
context) reuses memory the same way; this plan is the number to budget for and to check against
``--workspace``.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import EmberError
from ..ir.graph import Graph


def _nbytes(shape: tuple, dtype: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * (torch.empty((), dtype=dtype).element_size() if dtype is not None else 4)


def plan_memory(graph: Graph, spec: Any) -> dict[str, float]:
    """Peak live activation bytes with reuse, the naive total, and the weights, in MiB."""
    from ..ops.torch_types import to_torch

    dtypes = {o.name: (to_torch(o.dtype) if o.dtype is not None else None)
              for n in graph.nodes for o in n.outputs}
    inputs = {v.name for v in graph.inputs}
    live = peak = naive = 0
    for step in spec.steps:
        for out in step.outputs:
            shape = spec.shapes.get(out)
            if shape is None:
                continue
            b = _nbytes(shape, dtypes.get(out))
            live += b
            naive += b
        peak = max(peak, live)
        for name in step.free_after:
            if name in inputs or name not in spec.shapes:
                continue
            live -= _nbytes(spec.shapes[name], dtypes.get(name))
    weights = sum(v.data.nbytes for v in graph.initializers.values())
    mib = 1 << 20
    return {"activations_peak_mib": peak / mib, "activations_naive_mib": naive / mib, "weights_mib": weights / mib}


def plan_specialization(graph: Graph, feeds: dict[str, torch.Tensor]) -> Any:
    """The steps and value shapes of a run at these inputs, without loading the weights."""
    from ..ops.torch_types import tensor_from_numpy
    from ..runtime.specialize import HOST_LIMIT, specialize

    small = {k: tensor_from_numpy(v.data) for k, v in graph.initializers.items() if v.data.size <= HOST_LIMIT}
    return specialize(graph, feeds, small, torch.device("cpu"))


def check_workspace(plan: dict[str, float], workspace_mib: "float | None") -> None:
    if workspace_mib is not None and plan["activations_peak_mib"] > workspace_mib:
        raise EmberError(
            f"the engine needs {plan['activations_peak_mib']:.3g} MiB of activation memory at its opt shapes; "
            f"--workspace allows {workspace_mib:.3g} MiB. Raise --workspace, or build for smaller shapes.")
