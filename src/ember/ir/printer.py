"""A readable text form of a graph, one line per node."""
from __future__ import annotations

from typing import Any

import numpy as np

from .graph import Graph


def _attr(v: Any) -> str:
    from .graph import Graph as G

    if isinstance(v, G):
        return f"<graph {v.name}: {len(v.nodes)} nodes>"
    if isinstance(v, np.ndarray):
        return f"tensor<{v.dtype}{list(v.shape)}>" if v.size > 4 else f"{v.tolist()}"
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v)


def format_graph(g: Graph, indent: str = "") -> str:
    lines = [f"{indent}graph {g.name} (opset {g.opset}) {{"]
    for v in g.inputs:
        lines.append(f"{indent}  input  %{v.name}: {v.type_str()}")
    for v in g.initializers.values():
        lines.append(f"{indent}  const  %{v.name}: {v.type_str()}")
    for n in g.nodes:
        outs = ", ".join(f"%{o.name}: {o.type_str()}" for o in n.outputs)
        ins = ", ".join(f"%{v.name}" if v is not None else "_" for v in n.inputs)
        attrs = ", ".join(f"{k}={_attr(v)}" for k, v in n.attrs.items())
        group = f"  # group {n.meta['group']}" if "group" in n.meta else ""
        lines.append(f"{indent}  {outs} = {n.op}({ins}){' {' + attrs + '}' if attrs else ''}{group}")
        for sg in n.subgraphs():
            lines.append(format_graph(sg, indent + "    "))
    for v in g.outputs:
        lines.append(f"{indent}  output %{v.name}: {v.type_str()}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)
