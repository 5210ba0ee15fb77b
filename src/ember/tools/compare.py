"""`ember compare`: ember against ONNX Runtime on the same inputs, per output or per layer.

With ``all_layers`` every node output of the ONNX model is made a graph output of a copy of the
model (so ONNX Runtime keeps and returns it), ember exposes its values by the same names (the
model runs at opt level 0, or the engine's graph runs with every value kept), and the first
tensor, in the model's node order, that differs beyond tolerance names the node that diverges.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import EmberError
from ..ir.dtypes import DType, to_numpy
from ..ir.graph import Graph

ERROR_STATS = ("elemwise", "max", "mean", "median", "quantile")


class CompareError(EmberError):
    """compare could not run (ONNX Runtime missing or failing, inputs that do not fit)."""


@dataclass
class TensorDiff:
    name: str
    shape: list[int]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    passed: bool
    node: Optional[str] = None
    op: Optional[str] = None


@dataclass
class CompareReport:
    source: str
    atol: float
    rtol: float
    error_stat: str
    outputs: list[TensorDiff] = field(default_factory=list)
    layers: list[TensorDiff] = field(default_factory=list)
    first_divergent: Optional[dict[str, Any]] = None
    inputs: dict[str, list[int]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.outputs) and self.first_divergent is None

    def to_json(self) -> dict[str, Any]:
        d = {"source": self.source, "passed": self.passed, "atol": self.atol, "rtol": self.rtol,
             "error_stat": self.error_stat, "inputs": self.inputs,
             "outputs": [asdict(x) for x in self.outputs]}
        if self.layers:
            d["layers_compared"] = len(self.layers)
            d["layers"] = [asdict(x) for x in self.layers]
        d["first_divergent"] = self.first_divergent
        return d


# -- ONNX Runtime ---------------------------------------------------------------------------------------
def ort_session(model_bytes: bytes, optimize: bool = True):
    try:
        import onnxruntime as ort
    except ImportError:
        raise CompareError("compare needs ONNX Runtime as the reference: pip install onnxruntime "
                           "(it comes with pip install 'ember[dev]')") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CompareError(f"ONNX Runtime cannot load the model: {e}") from None


def with_all_outputs(model) -> tuple[Any, list[tuple[str, str, str]]]:
    """A copy of the model whose every node output is a graph output; and (tensor, node, op) in order."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        typed = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:
        typed = m
    types = {vi.name: vi.type for vi in list(typed.graph.value_info) + list(typed.graph.output)}
    have = {o.name for o in m.graph.output}
    order = []
    for n in m.graph.node:
        for o in n.output:
            if not o:
                continue
            order.append((o, n.name or o, n.op_type))
            if o in have:
                continue
            vi = onnx.ValueInfoProto()
            vi.name = o
            if o in types and types[o].HasField("tensor_type"):
                vi.type.CopyFrom(types[o])
                vi.type.tensor_type.ClearField("shape")
            elif o in types:
                continue  # sequences and optionals are not compared
            m.graph.output.append(vi)
            have.add(o)
    return m, order


# -- inputs ---------------------------------------------------------------------------------------------
def random_inputs(g: Graph, dims: "dict[str, int] | None" = None, seed: int = 0,
                  given: "dict[str, np.ndarray] | None" = None) -> dict[str, np.ndarray]:
    """Normal floats, small non-negative ints, masks of ones; symbolic dims from ``dims`` (default 1
    for batch-like names, 8 otherwise)."""
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds = dict(given or {})
    for v in g.inputs:  # bind dims from the arrays given
        if v.name in feeds and v.shape is not None:
            for d, want in zip(np.shape(feeds[v.name]), v.shape):
                if not isinstance(want, int):
                    dims.setdefault(str(want), int(d))
    for v in g.inputs:
        if v.name in feeds:
            continue
        if v.shape is None or v.dtype is None:
            raise CompareError(f"input '{v.name}' has no known shape or dtype; give it with --input {v.name}=FILE.npy")
        shape = []
        for d in v.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                name = str(d)
                shape.append(dims.setdefault(name, 1 if "batch" in name.lower() or name in ("N", "B") else 8))
        lname = v.name.lower()
        np_dt = to_numpy(v.dtype)
        if v.dtype == DType.BOOL:
            feeds[v.name] = rng.random(shape) < 0.5
        elif v.dtype.is_float:
            feeds[v.name] = rng.standard_normal(shape).astype(np_dt)
        elif "mask" in lname:
            feeds[v.name] = np.ones(shape, dtype=np_dt)
        elif "position" in lname:
            feeds[v.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(np_dt) if shape else np.zeros((), np_dt)
        else:
            feeds[v.name] = rng.integers(0, 2 if "type" in lname else 16, size=shape).astype(np_dt)
    return feeds


# -- statistics ----------------------------------------------------------------------------------------
def diff(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float, error_stat: str,
         quantile: float = 0.99) -> TensorDiff:
    g = np.asarray(got).astype(np.float64)
    w = np.asarray(want).astype(np.float64)
    if g.shape != w.shape:
        return TensorDiff(name, list(w.shape), float("inf"), float("inf"), float("inf"), float("inf"), 0.0, False)
    both_nan = np.isnan(g) & np.isnan(w)
    same_inf = np.isinf(g) & np.isinf(w) & (np.sign(g) == np.sign(w))
    absd = np.where(both_nan | same_inf, 0.0, np.abs(g - w))
    absd = np.where(np.isnan(absd), np.inf, absd)
    with np.errstate(divide="ignore", invalid="ignore"):
        reld = np.where(absd == 0, 0.0, absd / np.abs(w))
    reld = np.where(np.isnan(reld), np.inf, reld)
    gf, wf = np.nan_to_num(g.reshape(-1)), np.nan_to_num(w.reshape(-1))
    ng, nw = np.linalg.norm(gf), np.linalg.norm(wf)
    cos = 1.0 if ng == 0 and nw == 0 else float(gf @ wf / (ng * nw)) if ng and nw else 0.0
    if absd.size == 0:
        return TensorDiff(name, list(w.shape), 0.0, 0.0, 0.0, 0.0, 1.0, True)
    if error_stat == "elemwise":
        passed = bool(np.all((absd <= atol) | (absd <= rtol * np.abs(w))))
    else:
        stat = {"max": np.max, "mean": np.mean, "median": np.median,
                "quantile": lambda a: np.quantile(a, quantile)}[error_stat]
        passed = bool(stat(absd) <= atol or stat(reld) <= rtol)
    return TensorDiff(name, list(w.shape), float(absd.max()), float(absd.mean()), float(reld.max()),
                      float(reld.mean()), cos, passed)


# -- the comparison --------------------------------------------------------------------------------------
def _ember_values(model: Any, engine: Any, opt_level: int, all_layers: bool, feeds: dict, device: str) -> dict:
    import torch

    from ..ops.torch_types import tensor_from_numpy, to_numpy_value
    from ..runtime.interpreter import Interpreter
    from .loading import import_graph, is_engine_file

    if engine is not None:
        from ..runtime.engine import Engine

        graph = (engine if isinstance(engine, Engine) else Engine.load(engine, device="cpu")).graph
    else:
        graph = import_graph(model)
        if opt_level:
            from ..passes import run_pipeline

            run_pipeline(graph, opt_level)
    if all_layers:
        keep = [o for n in graph.nodes for o in n.outputs if o.kind == "tensor"]
        graph = Graph(graph.name, graph.inputs, list(graph.outputs) + [v for v in keep if v not in graph.outputs],
                      graph.nodes, graph.initializers, graph.opset, graph.metadata)
    missing = [v.name for v in graph.inputs if v.name not in feeds]
    if missing:
        raise CompareError(f"the engine's inputs {missing} are not inputs of the ONNX model; compare an engine "
                           "with the model it was built from")
    with torch.inference_mode():
        out = Interpreter(graph, device).run({v.name: tensor_from_numpy(feeds[v.name]) for v in graph.inputs})
    return {k: to_numpy_value(v) for k, v in out.items()}


def compare_models(model: Any, engine: Any = None, *, atol: float = 1e-4, rtol: float = 1e-3,
                   error_stat: str = "elemwise", quantile: float = 0.99, inputs: "dict[str, np.ndarray] | None" = None,
                   dims: "dict[str, int] | None" = None, seed: int = 0, all_layers: bool = False,
                   opt_level: int = 2, device: str = "cpu") -> CompareReport:
    """Run ember (the model built at ``opt_level``, or ``engine``) and ONNX Runtime on the same inputs."""
    from ..frontend.onnx import load_model
    from .loading import import_graph

    if error_stat not in ERROR_STATS:
        raise CompareError(f"--error-stat must be one of {', '.join(ERROR_STATS)}; got '{error_stat}'")
    proto, _ = load_model(model)
    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    ref_graph = import_graph(proto)
    feeds = random_inputs(ref_graph, dims, seed, inputs)
    report = CompareReport(src, atol, rtol, error_stat, inputs={k: list(np.shape(v)) for k, v in feeds.items()})
    order: list[tuple[str, str, str]] = []
    run_model = proto
    if all_layers:
        run_model, order = with_all_outputs(proto)
    sess = ort_session(run_model.SerializeToString(), optimize=not all_layers)
    onnx_inputs = [i.name for i in sess.get_inputs()]
    try:
        ort_out = dict(zip([o.name for o in sess.get_outputs()],
                           sess.run(None, {k: feeds[k] for k in onnx_inputs})))
    except Exception as e:
        raise CompareError(f"ONNX Runtime failed to run the model: {e}") from None
    ours = _ember_values(proto, engine, 0 if all_layers and engine is None else opt_level, all_layers, feeds, device)
    for o in proto.graph.output:
        if o.name not in ours:
            raise CompareError(f"ember produced no output named '{o.name}'")
        report.outputs.append(diff(o.name, ours[o.name], ort_out[o.name], atol, rtol, error_stat, quantile))
    if all_layers:
        _compare_layers(report, order, ours, ort_out, proto, quantile)
    return report


def _compare_layers(report: CompareReport, order, ours: dict, theirs: dict, proto, quantile: float) -> None:
    producer = {o: (n.name or o, n.op_type, list(n.input)) for n in proto.graph.node for o in n.output if o}
    for tensor, node, op in order:
        if tensor not in ours or tensor not in theirs or not isinstance(ours[tensor], np.ndarray):
            continue
        d = diff(tensor, ours[tensor], theirs[tensor], report.atol, report.rtol, report.error_stat, quantile)
        d.node, d.op = node, op
        report.layers.append(d)
        if not d.passed and report.first_divergent is None:
            report.first_divergent = {"node": node, "op": op, "tensor": tensor, "max_abs": d.max_abs,
                                      "max_rel": d.max_rel, "cosine": d.cosine,
                                      "fused_upstream": _uncompared_upstream(tensor, producer, ours)}


def _uncompared_upstream(tensor: str, producer: dict, ours: dict) -> list[str]:
    """Nodes feeding ``tensor`` whose outputs ember fused away (so the cause may lie in them too)."""
    out, seen, work = [], set(), list(producer.get(tensor, (None, None, []))[2])
    while work:
        t = work.pop()
        if t in seen or t in ours or t not in producer:
            continue
        seen.add(t)
        name, op, ins = producer[t]
        out.append(f"{name} ({op})")
        work.extend(ins)
    return out
