"""What computing a layer in fp32 instead of fp16/bf16 would cost, timed during tuning.

For each layer the timing run computes in the build's low precision, :class:`PrecisionTimer` times
its fp32 twin (same op, inputs, weights and outputs in fp32, its tactics timed like any node's), and
times one cast of every value between the two precisions. precision.choose_fp32_for_speed weighs
them: a layer whose low-precision kernel loses to fp32 (a reference that widens to fp32 inside, an
fp16 vendor kernel slower than its fp32 one) is kept fp32 when that is faster, casts included.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..ir.dtypes import DType
from ..ir.graph import Node, Value
from ..kernels import candidates, reference_hash
from ..ops import OpContext
from ..ops.torch_types import to_torch
from .precision import source_name
from .tuner import _cached_choice, _time, choice_hashes, interp_call_reference, node_signature, pick

log = logging.getLogger(__name__)


class PrecisionTimer:
    """Fills the tuner's report: ``node_ms`` (layer -> (ms as built, ms in fp32)) and ``cast_ms``."""

    def __init__(self, tuner: Any, low: torch.dtype):
        self.tuner, self.low = tuner, low

    def time_in_fp32(self, node: Node, args: list, low_ms: Optional[float]) -> None:
        """Record (ms as built, ms in fp32) for ``node`` if it computes in low precision. ``low_ms``:
        its winning tactic's time, if the tuner knows it. The fp32 twin's timings go into the timing
        cache under the signature the node has once kept fp32: that rebuild times nothing again."""
        t = self.tuner
        if not _computes_in(node, self.low):
            return
        try:
            if low_ms is None:  # a node with no tactics: its reference is what runs
                ctx = OpContext(num_outputs=len(node.outputs), node_name=node.name, memo={})
                low_ms = self._cached_ms(node_signature(node, args), "reference", lambda: _time(
                    lambda: interp_call_reference(node, args, ctx), t.reps, t.device), reference_hash(node.op))
            twin, twin_args, consts = fp32_twin(node, args, t.interp.consts, self.low)
            names = [c.name for c in candidates(twin, t.device)]
            key = t.cache.key(t.device, node_signature(twin, twin_args))
            hashes = choice_hashes(twin.op, names)
            cached = _cached_choice(t.cache, key, hashes)
            if cached is not None:
                ms32 = (t.cache.entries[key].get("ms") or {}).get(cached)
            else:
                saved = t.interp.consts
                t.interp.consts = consts  # the twin's weights, for binding its tactics
                try:
                    # fewer repetitions: fp32 matters only when it wins clearly (a layer's fp16 kernel
                    # widening to fp32 inside), and big fp32 layers take milliseconds each
                    results, failed = t.time_candidates(twin, twin_args, names, reps=max(2, t.reps // 3))
                finally:
                    t.interp.consts = saved
                best = pick(results)
                t.cache.entries[key] = {"tactic": best, "ms": results, "failed": failed,
                                        "code": {n: hashes[n] for n in [*results, *failed] if n in hashes}}
                ms32 = results.get(best)
            if low_ms is not None and ms32 is not None:
                t.report.node_ms[node.name] = (round(low_ms, 5), round(ms32, 5))
        except Exception as e:  # no fp32 figure: the node keeps the build's precision
            log.info("no fp32 timing for node %s: %s: %s", node.name, type(e).__name__, e)

    def time_casts(self, step: Any, args: list) -> None:
        """One cast of each float value this step reads (first time seen), to the other precision."""
        for key, a in zip(step.inputs, args):
            if (key is None or not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.numel() == 0
                    or a.device.type != self.tuner.device.type):  # host values are shape arithmetic
                continue
            name = _root_name(key)
            if name not in self.tuner.report.cast_ms and name not in self.tuner.interp.consts:
                self._time_cast(name, a, torch.float32 if a.dtype == self.low else self.low)

    def time_output_casts(self, outputs: dict[str, Any]) -> None:
        for name, a in outputs.items():
            if isinstance(a, torch.Tensor) and a.is_floating_point() and name not in self.tuner.report.cast_ms:
                self._time_cast(name, a, self.low)

    def _time_cast(self, name: str, a: torch.Tensor, to: torch.dtype) -> None:
        t = self.tuner
        cl = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last)
        sig = f"Cast|{a.dtype}->{to}|{list(a.shape)}{'cl' if cl else ''}"
        ms = self._cached_ms(sig, "cast", lambda: _time(lambda: a.to(to), max(3, t.reps // 2), t.device), "torch.to")
        t.report.cast_ms[name] = round(ms, 5)

    def _cached_ms(self, signature: str, label: str, measure: Any, code: str) -> float:
        """A timing kept in the timing cache (a warm rebuild times no reference or cast again), valid
        while the code it timed (``code``: its hash) is the same."""
        t = self.tuner
        key = t.cache.key(t.device, signature)
        hit = t.cache.entries.get(key)
        if (hit is not None and isinstance((hit.get("ms") or {}).get(label), (int, float))
                and (hit.get("code") or {}).get(label) == code):
            return float(hit["ms"][label])
        ms = measure()
        t.cache.entries[key] = {"tactic": label, "ms": {label: ms}, "failed": [], "code": {label: code}}
        return ms


def _root_name(key: str) -> str:
    """The value an env key names, seen through precision casts ('x:float16@cuda' -> 'x')."""
    return source_name(key.split("@", 1)[0])


def _computes_in(node: Node, low: torch.dtype) -> bool:
    """Whether ``node`` computes in the build's low precision (reads a low-precision input)."""
    if node.op in ("Cast", "CastLike") or any(node.subgraphs()):
        return False
    return any(v is not None and v.dtype is not None and v.dtype.is_float and to_torch(v.dtype) == low
               for v in node.inputs)


def fp32_twin(node: Node, args: list, consts: dict[str, torch.Tensor],
              low: torch.dtype) -> tuple[Node, list, dict[str, torch.Tensor]]:
    """``node`` as it would be kept in fp32: inputs, weights and outputs fp32 (weights converted from
    the low-precision copies, which is exact for timing), with its arguments and constants."""
    consts = dict(consts)
    ins: list = []
    twin_args: list = []
    for v, a in zip(node.inputs, args):
        if v is None:
            ins.append(None)
            twin_args.append(a)
            continue
        is_low = v.dtype is not None and v.dtype.is_float and to_torch(v.dtype) == low
        if v.is_const and is_low:
            name = _root_name(v.name) + "@fp32"
            consts[name] = consts[v.name].float()
            ins.append(Value(name, DType.FLOAT32, v.shape, data=v.data))
            twin_args.append(consts[name])
        elif is_low:
            ins.append(Value(v.name, DType.FLOAT32, v.shape))
            twin_args.append(a.float() if isinstance(a, torch.Tensor) else a)
        else:
            ins.append(v)
            twin_args.append(a)
    outs = [Value(o.name, DType.FLOAT32 if o.dtype is not None and o.dtype.is_float and to_torch(o.dtype) == low
                  else o.dtype, o.shape) for o in node.outputs]
    twin = Node(node.op, ins, outs, dict(node.attrs), name=node.name + "@fp32")
    return twin, twin_args, consts
