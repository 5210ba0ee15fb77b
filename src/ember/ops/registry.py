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

Everything else the compiler must know about an op is stated here too, once, as arguments of
:func:`op` (passes, kernels and the runtime read them from the OpDef; adding an op or a precision
edits one place):

- ``host_inputs``: inputs that are shape parameters (Reshape's ``shape``, Slice's ``starts``...),
  read on the host (TensorRT's shape tensors); ``type_inputs``: inputs of which only the dtype is
  read (CastLike's target);
- ``random``: the value is not a function of the inputs (never folded nor merged);
- ``low_precision``: which float inputs compute in fp16/bf16 in a reduced-precision engine
  (``"all"``, a tuple of input names, or ``"fp32"`` for ops that overflow there); pointwise ops
  default to ``"all"``, the others to ``"fp32"``;
- ``quant``: the op's INT8/FP8 form (:class:`QuantSpec`): which inputs are quantized, and the
  weight's output-channel axis;
- ``triton``: the op's fused-kernel lowering (a template string or a function, ops/lowering.py);
  ``epilogue``: how a GEMM/conv epilogue computes it as an activation (:class:`Epilogue`).
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REQUIRED = inspect.Parameter.empty

# fusion classes, used by the optimizer and the CUDA backend
KINDS = ("pointwise", "reduction", "anchor", "view", "shape", "control", "other")
ALL_INPUTS = "all"  # low_precision: every float input
FP32 = "fp32"  # low_precision: the op computes in fp32 in every engine (overflow-prone)


@dataclass(frozen=True)
class QuantSpec:
    """How an anchor runs in INT8/FP8: ``activations`` (input names) are quantized per tensor with
    calibrated scales, ``weight`` (an input name; a constant) per output channel along the axis
    ``weight_axis(attrs)`` gives. ``quantized_op``: the ember op that computes it on quantized
    inputs (passes/qdq.py rewrites into it)."""

    activations: tuple[str, ...]
    weight: str
    weight_axis: Callable[[dict], int]
    quantized_op: str


@dataclass(frozen=True)
class Epilogue:
    """This activation as the epilogue of a GEMM/conv (ember.Gemm/ember.Conv ``activation``).

    ``code``: the ACT constant of the template kernels (kernels/triton_templates.py), ``attrs``: the
    attributes they read, ``params(attrs)``: (code, p0, p1) for those attributes (raises ValueError
    when the kernels cannot compute them); ``torch``: a one-kernel torch form for vendor tactics
    (returns None when it has none for these attributes); ``vendor_conv``: cuDNN conv tactics take
    it (as one torch kernel after the convolution)."""

    code: int
    attrs: tuple[str, ...] = ()
    params: Optional[Callable[[dict], tuple[int, float, float]]] = None
    torch: Optional[Callable[[Any, dict], Any]] = None
    vendor_conv: bool = False

    def kernel_params(self, attrs: dict) -> tuple[int, float, float]:
        return self.params(attrs) if self.params is not None else (self.code, 0.0, 0.0)


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
    host_inputs: frozenset = frozenset()  # positions of shape-parameter inputs
    type_inputs: frozenset = frozenset()  # positions of inputs whose dtype alone is read
    random: bool = False
    low_precision: "str | frozenset[int]" = FP32  # ALL_INPUTS, FP32, or input positions
    quant: Optional[QuantSpec] = None
    triton: Optional[Callable] = None  # (builder, node, operands) -> operand; see ops/lowering.py
    epilogue: Optional[Epilogue] = None

    def max_inputs(self) -> Optional[int]:
        return None if self.variadic else len(self.input_names)

    @property
    def foldable(self) -> bool:
        """Whether a node's value may be computed ahead of the run from constant inputs (and two equal
        nodes computed once): not for random draws, nor control flow (its bodies run at run time)."""
        return not self.random and self.kind != "control"

    @property
    def param_inputs(self) -> frozenset:
        """Inputs that are parameters, not data a kernel streams: shape parameters and type inputs."""
        return self.host_inputs | self.type_inputs

    def low_precision_inputs(self, n_inputs: int) -> "set[int] | None":
        """Positions of the float inputs computed in fp16/bf16, or None when the op stays fp32."""
        if self.low_precision == FP32:
            return None
        if self.low_precision == ALL_INPUTS:
            return set(range(n_inputs))
        return set(self.low_precision)

    def position(self, input_name: str) -> int:
        return self.input_names.index(input_name)

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


def op(name: str, kind: str = "other", aliases: tuple[str, ...] = (), *, host_inputs: tuple[str, ...] = (),
       type_inputs: tuple[str, ...] = (), random: bool = False, low_precision: "str | tuple[str, ...] | None" = None,
       quant: Optional[QuantSpec] = None, triton: "str | Callable | None" = None,
       epilogue: Optional[Epilogue] = None) -> Callable[[Callable], Callable]:
    """Register a reference function as the definition of IR op ``name``, with the facts the compiler
    needs about it (see the module docstring)."""
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
        def positions(names: tuple[str, ...], what: str) -> frozenset[int]:
            unknown = [n for n in names if n not in input_names]
            if unknown:
                raise ValueError(f"op {name}: {what} names {unknown}, which are not inputs ({input_names})")
            return frozenset(input_names.index(n) for n in names)

        if low_precision is None:
            low = ALL_INPUTS if kind == "pointwise" else FP32
        elif low_precision in (ALL_INPUTS, FP32):
            low = low_precision
        else:
            low = positions(tuple(low_precision), "low_precision")
        if quant is not None:
            positions((*quant.activations, quant.weight), "quant")
        lowering = triton
        if isinstance(triton, str):
            from .lowering import template

            lowering = template(triton)
        for n in (name, *aliases):
            if n in REGISTRY:
                raise ValueError(f"op {n} is registered twice ({REGISTRY[n].fn.__module__} and {fn.__module__})")
            REGISTRY[n] = OpDef(n, fn, input_names, min_inputs, variadic, attrs, kind, wants_ctx,
                                doc=(fn.__doc__ or "").strip(), host_inputs=positions(host_inputs, "host_inputs"),
                                type_inputs=positions(type_inputs, "type_inputs"), random=random,
                                low_precision=low, quant=quant, triton=lowering, epilogue=epilogue)
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


def epilogue_ops() -> tuple[str, ...]:
    """The activations a GEMM/conv epilogue computes (ops with an :class:`Epilogue`)."""
    _load_all()
    return tuple(sorted(n for n, d in REGISTRY.items() if d.epilogue is not None))


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

    import_submodules(pkg, skip=("registry", "torch_types", "infer", "lowering"))
    for n, rule in _PENDING_RULES.items():
        if n in REGISTRY:
            REGISTRY[n].shape_rule = rule


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
