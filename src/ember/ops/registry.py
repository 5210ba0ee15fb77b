"""The op registry: every IR op defined once.

An op is a torch reference function. Its signature *is* the op's schema:

    @op("LeakyRelu", kind="pointwise")
    def leaky_relu(x, *, alpha: float = 0.01):
        return torch.nn.functional.leaky_relu(x, alpha)

- positional parameters are the inputs, in order; a default of ``None`` makes an input optional;
  ``*xs`` makes the op variadic;
- keyword-only parameters are the attributes; one without a default is required;
- a keyword-only parameter named ``ctx`` receives an :class:`OpContext` (number of outputs wanted,
  a way to run subgraphs) and is not an attribute;
- the function returns a tensor, or a tuple of values for several outputs (extra trailing
  outputs are dropped when the node asks for fewer); a list is one sequence value, None an empty
  optional.

IR op semantics are those of the newest ONNX opset of the same name; the ONNX frontend
normalizes older forms. Ops ember adds of its own (fused ops) are named ``ember.Something``.
Shape and dtype inference: :func:`shape_rule` registers a symbolic rule; without one, ember
runs the reference function on meta tensors when input shapes are static.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REQUIRED = inspect.Parameter.empty

# fusion classes, used by the optimizer and the CUDA backend
KINDS = ("pointwise", "reduction", "anchor", "view", "shape", "control", "other")


@dataclass
class OpContext:
    """What a reference function may need beyond its inputs and attributes."""

    num_outputs: int
    node_name: str = ""
    run_graph: Optional[Callable[..., list]] = None  # run_graph(graph, inputs: list) -> list of outputs
    output_dtypes: list = field(default_factory=list)  # declared DTypes of the node's outputs (may be None)
    # tables an op derives from host parameters (Resize's gather indices...), kept per planned step:
    # built on the first run, reused by later ones, so no run copies host data to the device (a copy
    # from the host cannot be captured in a CUDA graph)
    memo: Optional[dict] = None

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per key and planned step (every time when the caller keeps no memo)."""
        if self.memo is None:
            return make()
        try:
            return self.memo[key]
        except KeyError:
            value = self.memo[key] = make()
            return value


@dataclass
class OpDef:
    name: str
    fn: Callable
    input_names: list[str]
    min_inputs: int
    variadic: bool
    attrs: dict[str, Any]  # name -> default (REQUIRED if none)
    kind: str
    wants_ctx: bool
    shape_rule: Optional[Callable] = None
    doc: str = ""
    host_inputs: frozenset = frozenset()  # positions of shape-parameter inputs (see host_inputs.py)

    def max_inputs(self) -> Optional[int]:
        return None if self.variadic else len(self.input_names)

    def check_attrs(self, attrs: dict[str, Any]) -> list[str]:
        """Problems with a node's attributes: unknown names and missing required ones."""
        problems = [f"unknown attribute '{k}'" for k in attrs if k not in self.attrs]
        problems += [f"missing required attribute '{k}'" for k, d in self.attrs.items()
                     if d is REQUIRED and k not in attrs]
        return problems

    def call(self, inputs: list, attrs: dict[str, Any], ctx: OpContext):
        kwargs = dict(attrs)
        if self.wants_ctx:
            kwargs["ctx"] = ctx
        return self.fn(*inputs, **kwargs)


REGISTRY: dict[str, OpDef] = {}


def op(name: str, kind: str = "other", aliases: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register a reference function as the definition of IR op ``name``."""
    if kind not in KINDS:
        raise ValueError(f"op {name}: kind must be one of {KINDS}")

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        input_names: list[str] = []
        min_inputs = 0
        variadic = False
        attrs: dict[str, Any] = {}
        wants_ctx = False
        for p in sig.parameters.values():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                input_names.append(p.name)
                if p.default is p.empty:
                    min_inputs = len(input_names)
            elif p.kind is p.VAR_POSITIONAL:
                variadic = True
                input_names.append("*" + p.name)
            elif p.kind is p.KEYWORD_ONLY:
                if p.name == "ctx":
                    wants_ctx = True
                else:
                    attrs[p.name] = p.default
        for n in (name, *aliases):
            if n in REGISTRY:
                raise ValueError(f"op {n} is registered twice ({REGISTRY[n].fn.__module__} and {fn.__module__})")
            REGISTRY[n] = OpDef(n, fn, input_names, min_inputs, variadic, attrs, kind, wants_ctx,
                                doc=(fn.__doc__ or "").strip())
        return fn

    return deco


def shape_rule(*names: str) -> Callable[[Callable], Callable]:
    """Register a symbolic shape/dtype rule: ``rule(node) -> list[(DType|None, shape|None)]``."""

    def deco(fn: Callable) -> Callable:
        for n in names:
            _PENDING_RULES[n] = fn
            if n in REGISTRY:
                REGISTRY[n].shape_rule = fn
        return fn

    return deco


_PENDING_RULES: dict[str, Callable] = {}


def get(name: str) -> OpDef:
    _load_all()
    return REGISTRY[name]


def known_ops() -> set[str]:
    _load_all()
    return set(REGISTRY)


class LoadOnce:
    """Fill a lazy registry exactly once, safely across threads.

    The first caller runs ``fill`` while holding a lock; every other thread waits on that lock and
    reads the registry only after ``fill`` has imported every module. (Marking the registry loaded
    before its modules were imported let a second thread read it half filled: the server's model
    instances warming up in parallel failed with ``KeyError: 'ember.Conv'``.) A call from inside
    ``fill`` on the same thread (a module being imported asks the registry) returns at once instead
    of recursing. If ``fill`` raises, the next call tries again.
    """

    def __init__(self, fill: Callable[[], None]):
        self._fill = fill
        self._lock = threading.RLock()
        self._done = False
        self._running = False

    @property
    def done(self) -> bool:
        return self._done

    def __call__(self) -> None:
        if self._done:  # the common path: no lock once filled
            return
        with self._lock:
            if self._done or self._running:
                return
            self._running = True
            try:
                self._fill()
                self._done = True
            finally:
                self._running = False


def _fill_registry() -> None:
    """Import every module of ember.ops so that their @op decorators run."""
    from .. import ops as pkg

    import_submodules(pkg, skip=("registry", "torch_types", "infer", "host_inputs"))
    for n, rule in _PENDING_RULES.items():
        if n in REGISTRY:
            REGISTRY[n].shape_rule = rule
    from .host_inputs import host_input_positions

    for d in REGISTRY.values():
        d.host_inputs = host_input_positions(d.name, d.input_names)


_load_all = LoadOnce(_fill_registry)


def import_submodules(pkg, skip: tuple[str, ...] = ()) -> None:
    """Import every module of a package of definitions (ops, converters). A module that fails to
    import is reported loudly and the others still load."""
    import importlib
    import pkgutil
    import warnings

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name in skip:
            continue
        name = f"{pkg.__name__}.{mod.name}"
        try:
            importlib.import_module(name)
        except Exception as e:  # keep the other modules usable; the warning names what is missing
            warnings.warn(f"{name} failed to import ({type(e).__name__}: {e}); its definitions are unavailable",
                          RuntimeWarning, stacklevel=2)
