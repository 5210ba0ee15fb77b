"""The step runtime: executes the plan of an input signature (see specialize.py) step by step.

Works on CPU and CUDA. Values live in an environment keyed by name; each value is dropped after
its last use so peak memory tracks the live set, not the whole graph. The execution context
(context.py) runs the same steps, capturing them into CUDA graphs.
"""
from __future__ import annotations

import threading
from collections import ChainMap, OrderedDict
from typing import Any, Optional

import torch

from ..errors import EmberError, NodeExecutionError
from ..ir.graph import Graph
from ..kernels import BoundTactic, bind_tactic
from ..ops import OpContext, get
from ..ops.torch_types import tensor_from_numpy
from . import mathmode
from .tactic_buckets import REFERENCE, BucketChoices, symbol_size
from .specialize import (HOST_LIMIT, Specialization, Step, Tail, assign_frees, fuse_steps, signature_of,
                         specialize, specialize_tail, value_inputs)


def _plan_steps(graph: Graph) -> list[Step]:
    """Every node of a (sub)graph as a step, each value freed after its last use."""
    steps = [Step(n, get(n.op), [v.name if v is not None else None for v in n.inputs], [o.name for o in n.outputs])
             for n in graph.nodes]
    assign_frees(graph, steps)
    return steps


class Interpreter:
    """Runs a graph (and its subgraphs) on one device."""

    def __init__(self, graph: Graph, device: "str | torch.device" = "cpu",
                 weights: "dict[str, torch.Tensor] | None" = None, fuse_groups: "bool | str" = True,
                 math: "mathmode.MathMode | None" = None):
        self.graph = graph
        self.device = torch.device(device)
        self.math = math  # the engine's math mode, applied while its kernels launch (mathmode.py)
        self._plans: dict[int, list[Step]] = {}
        # constants of every scope, on the device once
        self.consts: dict[str, torch.Tensor] = {}
        for g in _all_graphs(graph):
            for name, v in g.initializers.items():
                if weights is not None and name in weights:
                    self.consts[name] = weights[name].to(self.device)
                else:
                    self.consts[name] = tensor_from_numpy(v.data, self.device)
        # tactics chosen at build time (node.meta['tactic']), bound to this device
        self.bound: dict[str, BoundTactic] = {}
        self._top = {id(n) for n in graph.nodes}  # tactics bind to these: a body node may share a name
        self.fallbacks: list[str] = []  # "node (op): tactic" chosen at build time that cannot run here
        for n in graph.nodes:
            b = bind_tactic(n, self.device, self.consts)
            if b is not None:
                self.bound[n.name] = b
            elif n.meta.get("tactic", "reference") != "reference":
                self.fallbacks.append(f"{n.name} ({n.op}): tactic {n.meta['tactic']}")
        # choices per shape bucket (tactic_buckets.py), looked up once per specialization
        self.bucket_tactics: dict[str, tuple[BucketChoices, list[Any]]] = {}
        for n in graph.nodes:
            self._bind_buckets(n)
        # CPU copies of small constants: shape arithmetic reads them on the host
        self.small_consts = {k: (t if t.device.type == "cpu" else t.cpu()) for k, t in self.consts.items()
                             if t.numel() <= HOST_LIMIT}
        self.on_step: Any = None  # optional hook(step, args), used by the tuner and the profiler
        # fusion groups become one generated Triton kernel each on CUDA (node by node elsewhere)
        self.group_kernels: dict = {}
        self.groups_skipped: dict[str, str] = {}
        if fuse_groups is True and self.device.type == "cuda" or fuse_groups == "always":
            from ..kernels.fused_groups import lower_groups

            self.group_kernels = lower_groups(graph, self.groups_skipped)
        self.value_inputs = value_inputs(graph)  # inputs whose values key the plan (shape tensors)
        self.specializations: "OrderedDict[tuple, Specialization]" = OrderedDict()
        self.max_specializations = 64
        self._spec_lock = threading.Lock()

    def _bind_buckets(self, n: Any) -> None:
        """Bind each bucket's choice of node ``n`` (the one of meta.tactic is bound already)."""
        rec = BucketChoices.of(n)
        if rec is None:
            return
        bound: list[Any] = []
        opt = n.meta.get("tactic", "reference")
        for size, name in zip(rec.sizes, rec.tactics):
            if name == "reference":
                bound.append(REFERENCE)
            elif name == opt:
                bound.append(self.bound.get(n.name, REFERENCE))
            else:
                n.meta["tactic"] = name  # bind_tactic binds meta.tactic
                try:
                    b = bind_tactic(n, self.device, self.consts)
                finally:
                    n.meta["tactic"] = opt
                if b is None:
                    self.fallbacks.append(f"{n.name} ({n.op}): tactic {name} ({rec.symbol} <= {size})")
                bound.append(REFERENCE if b is None else b)
        self.bucket_tactics[n.name] = (rec, bound)

    def _choose_bucket_tactics(self, spec: Specialization, size: Optional[int]) -> None:
        """Give the plan's steps the choice of the bucket holding ``size`` (the bucketed dim's size in
        the plan's inputs), where their node has choices per bucket; its tail remembers the size."""
        if size is None:
            return
        for step in spec.steps:
            entry = self.bucket_tactics.get(step.node.name)
            if entry is not None and step.kernel is None and step.opdef is not None and id(step.node) in self._top:
                rec, bound = entry
                step.bound = bound[rec.index_for(size)]
        if spec.tail is not None:
            spec.tail.bucket_size = size

    def _bucket_size(self, feeds: dict[str, Any]) -> Optional[int]:
        if not self.bucket_tactics:
            return None
        symbol = next(iter(self.bucket_tactics.values()))[0].symbol
        return symbol_size(self.graph, feeds, symbol)

    def bound_of(self, step: Any) -> Optional[BoundTactic]:
        """The choice a step runs: its plan's bucket choice, else the node's bound tactic (None: the reference)."""
        if step.opdef is None or id(step.node) not in self._top:
            return None
        b = getattr(step, "bound", None)
        if b is None:
            return self.bound.get(step.node.name)
        return None if b is REFERENCE else b

    def _plan(self, g: Graph) -> list[Step]:
        p = self._plans.get(id(g))
        if p is None:
            p = self._plans[id(g)] = _plan_steps(g)
        return p

    # -- planning -----------------------------------------------------------------------------------
    def specialization(self, feeds: dict[str, Any]) -> Specialization:
        """The plan of this input signature: shape arithmetic done once on the host, then cached."""
        sig = signature_of(self.graph, feeds, self.value_inputs)
        return self._cached_plan(self.specializations, self._spec_lock, sig, self.max_specializations,
                                 lambda: specialize(self.graph, feeds, self.small_consts, self.device,
                                                    self.value_inputs), self._bucket_size(feeds))

    def tail_specialization(self, tail: Tail, env: Any) -> Specialization:
        """The plan of a tail for the tensors reaching it in ``env`` (cached per their signature)."""
        return self._cached_plan(tail.plans, tail.lock, tail.signature(env), tail.max_plans,
                                 lambda: specialize_tail(self.graph, tail, env, self.small_consts, self.device),
                                 tail.bucket_size)

    def _cached_plan(self, cache: "OrderedDict[tuple, Specialization]", lock: Any, sig: tuple, limit: int,
                     make: Any, size: Optional[int] = None) -> Specialization:
        """An LRU of plans shared by the engine's contexts across threads; new plans get the fusion
        groups' generated kernels and the choices of the bucket holding ``size``."""
        with lock:
            spec = cache.get(sig)
            if spec is None:
                spec = cache[sig] = make()
                if self.group_kernels:
                    fuse_steps(self.graph, spec, self.group_kernels)
                self._choose_bucket_tactics(spec, size)
                if len(cache) > limit:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(sig)
        return spec

    # -- running ------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        with mathmode.applied(self.math, self.device):
            spec = self.specialization(feeds)
            env: Any = ChainMap(dict(feeds), spec.host, self.consts)
            self.run_spec(spec, env)
        return {v.name: env[v.name] for v in self.graph.outputs}

    def run_spec(self, spec: Specialization, env: Any) -> None:
        """Execute a plan and the plans of its tails in ``env``."""
        self.execute(spec.steps, env)
        while spec.tail is not None:
            spec = self.tail_specialization(spec.tail, env)
            env.maps.insert(1, spec.host)
            self.execute(spec.steps, env)

    def run_graph(self, g: Graph, inputs: list, outer: "dict[str, Any] | None") -> list:
        env: Any = ChainMap({}, outer if outer is not None else self.consts)
        for v, x in zip(g.inputs, inputs):
            env[v.name] = x

        self.execute(self._plan(g), env)
        return [env[v.name] for v in g.outputs]

    def execute(self, steps: "list[Any]", env: Any, at: Optional[list] = None,
                record: Optional[list] = None) -> None:
        """Run steps (objects with node, opdef, inputs, outputs, free_after) in ``env``, in place.
        ``at``: if given, ``at[0]`` is kept at the index of the step running (to name a failing one).
        ``record``: if given, gets (step, bound tactic, args, outputs) of every step (CPU emulation of
        a CUDA-graph capture, for tests of the run path)."""

        def run_sub(sub: Graph, sub_inputs: list) -> list:
            return self.run_graph(sub, sub_inputs, env)

        for i, step in enumerate(steps):
            if at is not None:
                at[0] = i
            bound = self.bound_of(step)
            keys = step.inputs
            if bound is not None and bound.remap:
                keys = [bound.remap.get(j, k) for j, k in enumerate(keys)]
            try:
                args = [env[n] if n is not None else None for n in keys]
            except KeyError as e:
                raise NodeExecutionError(
                    f"node '{step.node.name}' ({step.node.op}): input {e} has no value; the graph is malformed"
                ) from None
            if self.on_step is not None:
                self.on_step(step, args)
                if step.opdef is not None and id(step.node) in self._top and \
                        self.bound_of(step) is not bound:  # the hook chose a tactic
                    bound = self.bound_of(step)
                    keys = step.inputs if bound is None else [bound.remap.get(j, k) for j, k in enumerate(step.inputs)]
                    args = [env[n] if n is not None else None for n in keys]
            result = self.invoke(step, bound, args, run_sub)
            if record is not None:
                record.append((step, bound, args, result))
            if step.kernel is not None:  # a generated kernel for a whole fusion group, or plan glue
                env[step.outputs[0]] = result
                for name in step.free_after:
                    env.maps[0].pop(name, None)
                continue
            if isinstance(result, tuple):  # several outputs (a list is one sequence value)
                if len(result) < len(step.outputs):
                    raise NodeExecutionError(
                        f"node '{step.node.name}' ({step.node.op}) produced {len(result)} outputs, "
                        f"the graph asks for {len(step.outputs)}")
                for name, r in zip(step.outputs, result):
                    env[name] = r
            else:
                env[step.outputs[0]] = result
            for name in step.free_after:
                env.maps[0].pop(name, None)


    def invoke(self, step: Any, bound: Optional[BoundTactic], args: list, run_sub: Any = None) -> Any:
        """Compute one step's result from its arguments."""
        if step.kernel is not None:
            return step.kernel(*args)
        ctx = OpContext(num_outputs=len(step.outputs), node_name=step.node.name, run_graph=run_sub,
                        output_dtypes=[o.dtype for o in step.node.outputs], memo=step.memo)
        try:
            if bound is not None:
                return bound.run(args, bound.attrs, ctx)
            return step.opdef.call(args, step.node.attrs, ctx)
        except EmberError:
            raise
        except Exception as e:  # a reference function failed: say which node, with what
            shapes = ", ".join(_describe(a) for a in args)
            raise NodeExecutionError(
                f"node '{step.node.name}' ({step.node.op}) failed on inputs ({shapes}): "
                f"{type(e).__name__}: {e}") from e


def _describe(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        where = "" if a.device.type == "cpu" else f"@{a.device}"
        return f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}{where}"
    if a is None:
        return "none"
    if isinstance(a, list):
        return f"sequence[{len(a)}]"
    return type(a).__name__


def _all_graphs(g: Graph):
    yield g
    for n in g.nodes:
        for sg in n.subgraphs():
            yield from _all_graphs(sg)
