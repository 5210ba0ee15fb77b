"""`ember simplify`: the optimized graph written back to ONNX (like onnxsim / polygraphy sanitize).

Two promises: the output keeps the opset of the input (unless another is asked for), and it never
has more nodes than the input. The optimized graph is written at that opset; if it cannot be
(an op the optimizer recognized, such as Attention, is newer than the opset and has no spelling)
or comes out larger, the cleanup-only graph (opt level 1) is tried, and if that fails too the
input is written unchanged. The report says which was written and why.

The output is checked with onnx.checker, and with ``check`` (the default) both models run in ONNX
Runtime on the same random inputs and the result says whether they agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .compare import TensorDiff, diff, ort_session, random_inputs

WROTE_INPUT = "the input, unchanged"


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
    opset_in: int = 0
    opset_out: int = 0
    wrote: str = ""  # "opt level N" or WROTE_INPUT
    notes: list[str] = field(default_factory=list)  # why a less optimized graph was written

    @property
    def passed(self) -> bool:
        return self.check is None or all(d.passed for d in self.check)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"source": self.source, "output": self.output, "nodes_in": self.nodes_in,
                "nodes_out": self.nodes_out, "op_counts_in": self.op_counts_in,
                "op_counts_out": self.op_counts_out, "passes": self.passes, "opset_in": self.opset_in,
                "opset_out": self.opset_out, "wrote": self.wrote, "notes": self.notes, "passed": self.passed,
                "check": None if self.check is None else [asdict(d) for d in self.check]}


def simplify_model(model: Any, output: "str | os.PathLike", opt_level: int = 2, check: bool = True,
                   atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0,
                   opset: Optional[int] = None) -> SimplifyReport:
    """Optimize ``model`` and write it to ``output`` as ONNX at ``opset`` [default: the input's]."""
    import onnx

    from ..frontend.onnx import load_model
    from ..frontend.onnx.exporter import OpsetError, save_onnx
    from ..frontend.onnx.importer import model_opset
    from .loading import import_graph

    proto, _ = load_model(model)
    imported = import_graph(proto)
    opset_in = model_opset(proto)
    target = opset or opset_in
    nodes_in = len(proto.graph.node)
    notes: list[str] = []
    chosen = None
    for level in dict.fromkeys([opt_level, min(opt_level, 1)]):  # the level asked for, then cleanup only
        try:
            out_model, passes = _optimized(proto, level, target)
            _check_onnx(out_model)
        except (OpsetError, onnx.checker.ValidationError) as e:
            notes.append(f"opt level {level}: {e}")
            continue
        if len(out_model.graph.node) > nodes_in:
            notes.append(f"opt level {level}: the graph came out with {len(out_model.graph.node)} nodes, more than "
                         f"the input's {nodes_in}")
            continue
        chosen = (out_model, passes, f"opt level {level}")
        break
    if chosen is None:
        if target != opset_in:
            from ..frontend.onnx.exporter import ExportError

            raise ExportError(f"{_name(model)} cannot be written at opset {target}: " + "; ".join(notes))
        chosen = (proto, [], WROTE_INPUT)
    out_model, passes, wrote = chosen
    save_onnx(out_model, output)
    counts_out: dict[str, int] = {}
    for n in out_model.graph.node:
        counts_out[n.op_type] = counts_out.get(n.op_type, 0) + 1
    report = SimplifyReport(_name(model), os.fspath(output), nodes_in, len(out_model.graph.node),
                            imported.op_counts(), counts_out, passes, opset_in=opset_in,
                            opset_out=model_opset(out_model), wrote=wrote, notes=notes)
    if check:
        report.check = _check_in_onnxruntime(proto, out_model, random_inputs(imported, seed=seed), atol, rtol)
    return report


def _check_in_onnxruntime(src: Any, out: Any, feeds: dict, atol: float, rtol: float) -> list[TensorDiff]:
    from .compare import CompareError

    results = []
    for which, m in (("input", src), ("simplified", out)):
        sess = ort_session(m.SerializeToString())
        try:
            results.append(sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()}))
        except Exception as e:  # ONNX Runtime's own exception types
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise CompareError(f"the check runs both models in ONNX Runtime on random inputs ({shapes}), and it "
                               f"failed on the {which} model: {str(e).strip()[:400]}. The simplified model is "
                               "written; rerun with --no-check to skip the check") from None
    want, got = results
    return [diff(o.name, a, b, atol, rtol, "elemwise")
            for o, a, b in zip(ort_session(src.SerializeToString()).get_outputs(), got, want)]


def _optimized(proto: Any, opt_level: int, opset: int) -> "tuple[Any, list[str]]":
    """The model optimized at ``opt_level`` as ONNX at ``opset``, and the passes that changed it."""
    from ..frontend.onnx.exporter import export_onnx
    from ..passes import run_pipeline
    from .loading import import_graph

    g = import_graph(proto)
    passes = run_pipeline(g, opt_level)
    for n in g.nodes:  # fusion groups are an ember build matter, not ONNX
        n.meta.pop("group", None)
    out = export_onnx(g, opset=opset)
    _keep_other_domains(proto, out)
    return out, passes


def _check_onnx(model: Any) -> None:
    import onnx

    if model.ByteSize() < 1_900_000_000:  # the checker takes larger models only as a path
        onnx.checker.check_model(model)


def _keep_other_domains(src: Any, out: Any) -> None:
    """The input's imports of other domains (ai.onnx.ml...), so a consumer that checks them still finds them."""
    have = {o.domain for o in out.opset_import}
    for o in src.opset_import:
        if o.domain not in have and o.domain not in ("", "ai.onnx"):
            out.opset_import.append(o)


def _name(model: Any) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<model>"
