"""`ember simplify`: the optimized graph written back to ONNX (like onnxsim / polygraphy sanitize).

The output loads in ONNX Runtime and gives the same outputs; with ``check`` (the default) both
models run in ONNX Runtime on the same random inputs and the result says whether they agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .compare import TensorDiff, diff, ort_session, random_inputs


@dataclass
class SimplifyReport:
    source: str
    output: str
    nodes_in: int
    nodes_out: int
    op_counts_in: dict[str, int]
    op_counts_out: dict[str, int]
    passes: list[str] = field(default_factory=list)
    check: Optional[list[TensorDiff]] = None

    @property
    def passed(self) -> bool:
        return self.check is None or all(d.passed for d in self.check)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"source": self.source, "output": self.output, "nodes_in": self.nodes_in,
                "nodes_out": self.nodes_out, "op_counts_in": self.op_counts_in,
                "op_counts_out": self.op_counts_out, "passes": self.passes, "passed": self.passed,
                "check": None if self.check is None else [asdict(d) for d in self.check]}


def simplify_model(model: Any, output: "str | os.PathLike", opt_level: int = 2, check: bool = True,
                   atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0) -> SimplifyReport:
    """Optimize ``model`` and write it to ``output`` as ONNX."""
    import onnx

    from ..frontend.onnx import load_model
    from ..frontend.onnx.exporter import export_onnx
    from ..passes import run_pipeline
    from .loading import import_graph

    proto, _ = load_model(model)
    imported = import_graph(proto)
    g = import_graph(proto)
    passes = run_pipeline(g, opt_level)
    for n in g.nodes:  # fusion groups are an ember build matter, not ONNX
        n.meta.pop("group", None)
    out_model = export_onnx(g, output)
    counts_out: dict[str, int] = {}
    for n in out_model.graph.node:
        counts_out[n.op_type] = counts_out.get(n.op_type, 0) + 1
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    report = SimplifyReport(src, os.fspath(output), len(proto.graph.node), len(out_model.graph.node),
                            imported.op_counts(), counts_out, passes)
    if check:
        feeds = random_inputs(imported, seed=seed)
        ref = ort_session(proto.SerializeToString())
        new = ort_session(onnx.load(os.fspath(output)).SerializeToString())
        want = ref.run(None, {i.name: feeds[i.name] for i in ref.get_inputs()})
        got = new.run(None, {i.name: feeds[i.name] for i in new.get_inputs()})
        report.check = [diff(o.name, a, b, atol, rtol, "elemwise")
                        for o, a, b in zip(ref.get_outputs(), got, want)]
    return report
