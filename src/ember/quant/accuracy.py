"""The accuracy budget: keep the layers whose quantization costs most in floating point, until the
engine's outputs on held-out data are within the budget of the fp32 model's.

The measure is the relative L2 distance of every float output from the fp32 graph's on the held-out
samples (all batches together; the largest over outputs), as the fp16 fidelity check measures.

1. The fully quantized graph is measured; within budget, nothing is kept.
2. Each layer's *sensitivity*: the distance when only that layer is quantized (one run per layer).
3. Layers are kept in floating point in order of sensitivity, the fewest that bring the fully
   quantized rest within budget (a bisection over that order: a handful of runs more).

Every run uses the reference kernels, which compute the quantized numerics exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import EmberError
from ..ir.graph import Graph


def parse_budget(value: Any) -> Optional[float]:
    """'1%' -> 0.01, '0.01' -> 0.01; None or 'none' -> None (no budget)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    text = str(value).strip()
    try:
        budget = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise EmberError(f"accuracy budget {value!r} is not a number; give a relative distance from fp32 "
                         "such as 1% or 0.01") from None
    if not (0 < budget < 1 and math.isfinite(budget)):
        raise EmberError(f"accuracy budget {value!r} must be between 0 and 100% (the relative L2 distance of "
                         "the outputs from fp32 on held-out data)")
    return budget


@dataclass
class BudgetResult:
    budget: float
    error_all: float  # every layer quantized
    error: float  # as built: the kept layers in floating point
    kept: dict[str, float] = field(default_factory=dict)  # layer -> its sensitivity
    sensitivity: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    seconds: float = 0.0

    def to_json(self, top: int = 16) -> dict[str, Any]:
        worst = sorted(self.sensitivity.items(), key=lambda kv: -kv[1])[:top]
        return {"budget": self.budget, "error_all_quantized": _round(self.error_all), "error": _round(self.error),
                "within_budget": self.error <= self.budget, "layers_kept": len(self.kept), "runs": self.runs,
                "seconds": round(self.seconds, 3), "most_sensitive": {k: _round(v) for k, v in worst}}


def _round(x: float) -> Any:
    return float(f"{x:.3e}") if math.isfinite(x) else "inf"


class HeldOut:
    """Held-out batches and the fp32 graph's outputs on them."""

    def __init__(self, graph32: Graph, batches: list[dict[str, np.ndarray]], device: torch.device):
        if not batches:
            raise EmberError("the accuracy budget needs held-out samples: give --accuracy-data, or more calibration "
                             "samples than one batch")
        self.batches, self.device = batches, device
        self.reference = self._outputs(graph32)

    def _outputs(self, graph: Graph) -> dict[str, torch.Tensor]:
        from ..runtime.interpreter import Interpreter

        interp = Interpreter(graph, self.device, fuse_groups=False)
        got: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for feeds in self.batches:
                out = interp.run({k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
                                  for k, v in feeds.items()})
                for name, t in out.items():
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        got.setdefault(name, []).append(t.detach().double().reshape(-1).cpu())
        return {k: torch.cat(v) for k, v in got.items()}

    def error(self, graph: Graph) -> float:
        """The largest relative L2 distance of ``graph``'s float outputs from fp32's (inf if not finite)."""
        out = self._outputs(graph)
        worst = 0.0
        for name, ref in self.reference.items():
            norm = float(ref.norm())
            if name not in out or norm == 0:
                continue
            e = float((out[name] - ref).norm()) / norm
            worst = max(worst, e if math.isfinite(e) else math.inf)
        return worst


def fit_budget(layers: list[str], make: Callable[[set[str]], Graph], held: HeldOut, budget: float,
               progress: Optional[Callable[[str, int, int, str], None]] = None) -> BudgetResult:
    """The layers to keep in floating point (most sensitive first) so that the graph ``make(quantized)``
    builds is within ``budget`` on the held-out data."""
    t0 = time.perf_counter()
    runs = [0]

    def error(quantized: set[str]) -> float:
        runs[0] += 1
        return held.error(make(quantized))

    everything = set(layers)
    e_all = error(everything)
    result = BudgetResult(budget, e_all, e_all)
    if e_all <= budget:
        result.runs, result.seconds = runs[0], time.perf_counter() - t0
        return result
    for i, name in enumerate(layers):
        if progress is not None:
            progress("sensitivity", i, len(layers), name)
        result.sensitivity[name] = error({name})
    order = sorted(layers, key=lambda n: -result.sensitivity[n])
    lo, hi = 0, len(order)  # keeping every layer is within budget (nothing is quantized)
    errors = {len(order): 0.0}
    while lo < hi:
        mid = (lo + hi) // 2
        errors[mid] = error(everything - set(order[:mid]))
        if errors[mid] <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept = order[:lo]
    result.kept = {n: result.sensitivity[n] for n in kept}
    result.error = errors.get(lo, 0.0)
    result.runs, result.seconds = runs[0], time.perf_counter() - t0
    return result


def describe(node: str, sensitivity: float, budget: float, qtype: str) -> str:
    shown = "overflow" if not math.isfinite(sensitivity) else f"{sensitivity:.1e}"
    return f"output drift {shown} on held-out data when only it is {qtype} (budget {budget:.1e})"
