"""ExecutionContext: runs an engine on its own stream, one CUDA graph per input-shape signature.

Several contexts of one engine share its weights. A context is used by one thread at a time
(it holds a lock); make one context per concurrent caller. On CPU a context simply runs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..ops.torch_types import to_numpy_value
from .specialize import signature_of

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class _Captured:
    graph: Optional[torch.cuda.CUDAGraph]  # None: this signature runs eagerly
    inputs: dict[str, torch.Tensor]  # static input buffers the graph reads
    outputs: dict[str, torch.Tensor]  # graph-owned output buffers
    reason: str = ""
    pinned_in: dict[str, torch.Tensor] = field(default_factory=dict)
    pinned_out: dict[str, torch.Tensor] = field(default_factory=dict)


class ExecutionContext:
    def __init__(self, engine: "Engine", cuda_graph: bool = True, max_graphs: int = 8):
        self.engine = engine
        self.interp = engine._interp
        self.device = engine._interp.device
        self.cuda = self.device.type == "cuda"
        self.cuda_graph = cuda_graph and self.cuda
        self.stream: Optional[torch.cuda.Stream] = torch.cuda.Stream(self.device) if self.cuda else None
        self.max_graphs = max_graphs
        self._captured: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None
        self._lock = threading.Lock()
        self.graph_notes: list[str] = []  # why some signature could not be captured

    # -- device-side API: torch tensors on the engine's device in and out, no copies ---------------
    def run_device(self, feeds: dict[str, torch.Tensor], *, reuse_outputs: bool = False) -> dict[str, torch.Tensor]:
        """Run on device tensors. With ``reuse_outputs`` the returned tensors are the context's own
        buffers, overwritten by its next run (no copy, as TensorRT bindings); otherwise clones."""
        with self._lock:
            if not self.cuda:
                return self.interp.run(self.engine._check_inputs(feeds))
            # inputs may have been written on the caller's stream: order our work after it
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                cap = self._get(feeds)
                if cap.graph is None:
                    outs = self.interp.run(feeds)
                else:
                    for name, x in feeds.items():
                        buf = cap.inputs[name]
                        if buf.data_ptr() != x.data_ptr():
                            buf.copy_(x, non_blocking=True)
                    cap.graph.replay()
                    outs = cap.outputs
                if not reuse_outputs:
                    outs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in outs.items()}
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            return outs

    def _get(self, feeds: dict[str, torch.Tensor]) -> _Captured:
        sig = signature_of(self.interp.graph, feeds)
        cap = self._captured.get(sig)
        if cap is not None:
            self._captured.move_to_end(sig)
            return cap
        checked = self.engine._check_inputs(feeds)  # full checks once per new signature
        cap = self._capture(checked)
        self._captured[sig] = cap
        if len(self._captured) > self.max_graphs:
            self._captured.popitem(last=False)
        return cap

    def _capture(self, feeds: dict[str, torch.Tensor]) -> _Captured:
        static = {k: v.clone() for k, v in feeds.items()}
        spec = self.interp.specialization(static)
        if not self.cuda_graph or not spec.capturable:
            reason = "; ".join(spec.reasons[:3]) if spec.reasons else "CUDA graphs disabled"
            if self.cuda_graph:
                self.graph_notes.append(reason)
            return _Captured(None, {}, {}, reason)
        # warm up on the side stream (cuBLAS/cuDNN handles, Triton compiles, lazy weights)
        for _ in range(2):
            self.interp.run(static)
        self.stream.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._pool, stream=self.stream):
                outs = self.interp.run(static)
        except Exception as e:  # an op synced or allocated on the host inside capture: run eagerly
            self.graph_notes.append(f"capture failed: {type(e).__name__}: {e}")
            torch.cuda.synchronize(self.device)
            return _Captured(None, {}, {}, str(e))
        return _Captured(g, static, outs)

    # -- host-side API: numpy (or CPU tensors) in, numpy out ------------------------------------------
    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Like Engine.run; on GPU copies go through pinned buffers on the context's stream."""
        if not self.cuda:
            return self.engine.run(feeds)
        dev_feeds = {}
        for k, x in feeds.items():
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
            if t.device.type == "cpu":
                t = t.pin_memory().to(self.device, non_blocking=True)
            dev_feeds[k] = t
        outs = self.run_device(dev_feeds, reuse_outputs=True)
        host = {k: v.to("cpu", non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in outs.items()}
        torch.cuda.synchronize(self.device)
        return {k: to_numpy_value(v) for k, v in host.items()}

    @property
    def graphs(self) -> int:
        return sum(1 for c in self._captured.values() if c.graph is not None)
