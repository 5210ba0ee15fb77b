"""`ember check`: will this model build, and what is at risk? Exit code 0/1 for scripts.

Errors (the build would fail): the file does not load, ops ember does not implement, a malformed
graph, an optimizer failure. Warnings: dynamic dims no profile covers (the CUDA backend needs a
min/opt/max range for each), and ops at risk in fp16 — values that overflow 65504 when stored in
half precision between kernels (x**p, exp, sums) because they were not fused into an op or group
that accumulates in fp32. Recognized norms and softmax are reported as safe (info).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import EmberError, ModelLoadError, UnsupportedOpError
from ..ir.graph import Graph, Node
from ..ir.shapes import Sym

FP32_ACCUMULATING = ("LayerNormalization", "RMSNormalization", "Softmax", "LogSoftmax", "Attention",
                     "GroupNormalization", "InstanceNormalization", "BatchNormalization")
SUM_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "CumSum")


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    category: str  # "load" | "unsupported_op" | "graph" | "optimizer" | "dynamic_dim" | "fp16_risk" | "fp16_safe"
    message: str
    node: Optional[str] = None
    op: Optional[str] = None


@dataclass
class CheckReport:
    source: str
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False
    nodes_in: Optional[int] = None
    nodes_out: Optional[int] = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors and not (self.strict and self.warnings)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings),
                "nodes_in": self.nodes_in, "nodes_out": self.nodes_out,
                "findings": [asdict(f) for f in self.findings]}


def _symbols(g: Graph) -> dict[str, list[str]]:
    """Named dynamic dims -> the inputs that use them."""
    out: dict[str, list[str]] = {}
    for v in g.inputs:
        for d in v.shape or ():
            if isinstance(d, Sym):
                for s in sorted(d.symbols):
                    out.setdefault(s, []).append(v.name)
    return out


def _exponent(n: Node) -> Optional[float]:
    e = n.inputs[1] if len(n.inputs) > 1 else None
    if e is None or not e.is_const or e.data.size != 1:
        return None
    return float(np.asarray(e.data).reshape(()))


def fp16_findings(g: Graph) -> list[Finding]:
    out = []
    for n in g.nodes:
        x = n.inputs[0] if n.inputs else None
        if x is None or x.dtype is None or not x.dtype.is_float:
            continue
        grouped = f" (inside fusion group {n.meta['group']}, which keeps it in fp32 registers)" \
            if "group" in n.meta else ""
        if n.op in FP32_ACCUMULATING:
            out.append(Finding("info", "fp16_safe", f"{n.op} accumulates in fp32", n.name, n.op))
        elif n.op == "Pow":
            p = _exponent(n)
            if p is None or p >= 2:
                limit = f"|x| > {65504 ** (1 / p):.4g}" if p else "large |x|"
                out.append(Finding("info" if grouped else "warning", "fp16_risk",
                                   f"x**{p if p is not None else 'y'} overflows fp16 for {limit}; an unfused "
                                   f"decomposed norm spends its fp16 range here{grouped}", n.name, n.op))
        elif n.op == "Exp":
            out.append(Finding("info" if grouped else "warning", "fp16_risk",
                               f"exp overflows fp16 for x > 11.09; a softmax written by hand without the max "
                               f"subtraction overflows{grouped}", n.name, n.op))
        elif n.op in SUM_REDUCTIONS:
            out.append(Finding("info" if grouped else "warning", "fp16_risk",
                               f"{n.op} sums in the input type unless accumulated in fp32; ember's kernels "
                               f"accumulate in fp32, other runtimes may not{grouped}", n.name, n.op))
    return out


def check_model(model: Any, profile: "dict[str, tuple[int, int, int]] | None" = None, opt_level: int = 2,
                strict: bool = False) -> CheckReport:
    """Check ``model`` (path, bytes or ModelProto). ``profile`` maps dim names to (min, opt, max)."""
    import os

    from ..passes import count_kernels, run_pipeline
    from .loading import import_graph

    src = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<model>"
    report = CheckReport(src, strict=strict)
    try:
        g = import_graph(model)
    except UnsupportedOpError as e:
        for (name, op, domain, opset), why in zip(e.nodes, e.reasons):
            extra = f": {why}" if why and why != "op not implemented" else ""
            report.findings.append(Finding("error", "unsupported_op",
                                           f"op {domain or 'ai.onnx'}::{op} (opset {opset}) is not supported{extra}",
                                           name, op))
        return report
    except ModelLoadError as e:
        report.findings.append(Finding("error", "load", str(e)))
        return report
    except EmberError as e:
        report.findings.append(Finding("error", "graph", str(e)))
        return report
    report.nodes_in = len(g.nodes)
    profile = profile or {}
    for sym, users in _symbols(g).items():
        if sym not in profile:
            report.findings.append(Finding(
                "warning", "dynamic_dim",
                f"dynamic dim '{sym}' (input {', '.join(users)}) has no profile: give its range, "
                f"e.g. --profile {sym}=1:8:64 (min:opt:max)"))
    try:
        run_pipeline(g, opt_level, debug=True)
    except EmberError as e:
        report.findings.append(Finding("error", "optimizer", f"the optimizer failed: {e}"))
        return report
    except Exception as e:  # a pass bug must not hide the rest of the report
        report.findings.append(Finding("error", "optimizer", f"the optimizer crashed ({type(e).__name__}: {e}); "
                                                             "build with --opt-level 1 and report this model"))
        return report
    report.nodes_out = count_kernels(g)
    report.findings.extend(fp16_findings(g))
    return report


def parse_profile(items: "tuple[str, ...] | list[str]") -> dict[str, tuple[int, int, int]]:
    """'batch=1:8:32' (or 'batch=8' for a static value) -> {'batch': (1, 8, 32)}."""
    out = {}
    for item in items:
        for part in item.split(","):
            name, sep, rng = part.strip().partition("=")
            try:
                vals = [int(x) for x in rng.split(":")]
            except ValueError:
                vals = []
            if not sep or not name or len(vals) not in (1, 3):
                raise EmberError(f"--profile '{part}': write DIM=MIN:OPT:MAX (or DIM=VALUE), e.g. batch=1:8:32")
            out[name] = (vals[0], vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1], vals[2])
    return out
