"""Loading a model or an engine for the tools: the IR as imported and as optimized."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

from ..ir.graph import Graph


@dataclass
class LoadedGraphs:
    source: str
    kind: str  # "onnx" | "engine"
    optimized: Graph
    imported: Optional[Graph] = None  # None for engines: the engine holds only its optimized graph
    nodes_in: Optional[int] = None
    passes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


def is_engine_file(path: str) -> bool:
    if path.endswith(".engine"):
        return True
    if not os.path.isfile(path) or path.endswith(".onnx"):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except zipfile.BadZipFile:
        return False


def import_graph(model: Any) -> Graph:
    """ONNX (path, bytes or ModelProto) -> IR with shapes inferred and verified."""
    from ..frontend.onnx import import_onnx
    from ..ir.verify import verify
    from ..ops import known_ops
    from ..ops.infer import infer_shapes

    g = import_onnx(model)
    infer_shapes(g)
    verify(g, known_ops())
    return g


def load_graphs(model: Any, opt_level: int = 2, debug: bool = False) -> LoadedGraphs:
    """An .engine file is read as it was built; an ONNX model is imported and optimized here."""
    from ..passes import run_pipeline

    if isinstance(model, (str, os.PathLike)) and is_engine_file(os.fspath(model)):
        from ..runtime.format import read_engine

        f = read_engine(model)
        return LoadedGraphs(os.fspath(model), "engine", f.graph, None, f.manifest.get("nodes_in"),
                            manifest=f.manifest)
    imported = import_graph(model)
    optimized = import_graph(model)
    passes = run_pipeline(optimized, opt_level, debug=debug)
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    return LoadedGraphs(src, "onnx", optimized, imported, len(imported.nodes), passes)
