"""Engine: a loaded, ready-to-run model. ``Engine.load(path)`` needs no compiler."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import torch

from ..errors import EngineFileError, InputError
from ..ir.dtypes import DType, to_numpy
from ..ir.graph import Graph, Value
from ..ir.shapes import as_symbol
from ..kernels import kernel_store
from ..ops.torch_types import from_torch, to_numpy_value, to_torch_value
from .format import EngineArchive, write_engine
from .interpreter import Interpreter
from .mathmode import MathMode
from .signing import KeySource, load_key
from .tactic_buckets import tactic_names

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .context import ExecutionContext


@dataclass(frozen=True)
class TensorSpec:
    """An engine input or output: name, numpy-style dtype name, shape (str dims are symbolic)."""

    name: str
    dtype: str
    shape: tuple

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _spec(v: Value) -> TensorSpec:
    shape = () if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)
    return TensorSpec(v.name, v.dtype.value if v.dtype else "unknown", shape)


def resolve_device(device: "str | torch.device | None") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineFileError("device 'cuda' was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return dev


class FallbackError(EngineFileError):
    """A tactic or generated kernel the engine was built with cannot run here."""


class Engine:
    """Runs an optimized graph. Thread-safe: a run takes one of the engine's execution contexts (stream,
    CUDA graphs, staging buffers; at most ``max_contexts``, concurrent runs beyond that wait); all of
    them share the weights."""

    def __init__(self, graph: Graph, manifest: "dict[str, Any] | None" = None, *,
                 device: "str | torch.device | None" = None, weights: "dict[str, torch.Tensor] | None" = None,
                 allow_fallback: bool = False, max_contexts: int = 4):
        self.graph = graph
        self.manifest = dict(manifest or {})
        self._device = resolve_device(device)
        consts = {k[len("const/"):]: t for k, t in (weights or {}).items() if k.startswith("const/")}
        # fp32 engines compute in true fp32 unless built with tf32: set per engine while its kernels
        # launch (mathmode.py), never for the whole process
        self.math = MathMode.of_manifest(self.manifest)
        self._interp = Interpreter(graph, self._device, consts or None, math=self.math)
        # compiled Triton kernels stored with the engine: kernels/<hash>/<file> -> bytes
        self.kernel_binaries: dict[str, bytes] = {}
        self.inputs = [_spec(v) for v in graph.inputs]
        self.outputs = [_spec(v) for v in graph.outputs]
        self.profiles = [{k: tuple(tuple(d) for d in v) for k, v in p.items()}
                         for p in self.manifest.get("profiles", [])]
        self.fallbacks = self._fallbacks()
        if self.fallbacks:
            msg = (f"{len(self.fallbacks)} layer(s) of this engine cannot run with the kernels it was built with "
                   f"on {self._device} (they would fall back to the reference implementation): "
                   + "; ".join(self.fallbacks[:8]) + (" …" if len(self.fallbacks) > 8 else ""))
            if not allow_fallback:
                raise FallbackError(msg + ". Rebuild the engine here with `ember build`, or accept the slower "
                                    "reference kernels with allow_fallback=True (--allow-fallback).")
            log.warning("%s", msg)
        # the contexts Engine.run draws from: each a stream, an arena and its captured plans; a few,
        # reused most-recent-first, whatever the number of calling threads
        self.max_contexts = max(1, int(max_contexts))
        self._idle: list = []
        self._made = 0
        self._ctx_cond = threading.Condition()

    # -- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: "str | os.PathLike", device: "str | torch.device | None" = None,
             allow_other_gpu: bool = False, verify_key: "KeySource | None" = None,
             allow_fallback: bool = False) -> "Engine":
        """Load an engine file. An engine tuned on one GPU model refuses to load on another unless
        ``allow_other_gpu`` (it then runs correctly with tactics chosen for the other GPU).

        ``verify_key`` (bytes, or the path of a key file): load only an engine signed with this key
        (``ember build --sign-key``). Without it, a signed engine is refused: its builder asked that
        it be verified.

        A layer whose tactic or generated kernel cannot run here is an error naming it
        (``FallbackError``); ``allow_fallback`` runs such layers with the reference kernels instead,
        with a warning that lists them."""
        dev = resolve_device(device)
        key = load_key(verify_key) if verify_key is not None else None
        with EngineArchive.open(path, key, require_key_if_signed=True) as arc:
            if arc.manifest.get("kind") == "llm":
                raise EngineFileError(f"engine '{os.fspath(path)}' is an LLM engine: run it with `ember generate` or "
                                      "`ember serve`, or ember.llm.LLMEngine.load()")
            warm = None
            if dev.type == "cuda" and arc.manifest.get("kernels"):
                warm = kernel_store.prewarm()  # Triton's first-launch work, while the weights load
            f = arc.engine_file()
            backend = f.manifest.get("backend", "reference")
            if backend != "reference":
                raise EngineFileError(f"engine '{os.fspath(path)}' needs backend '{backend}', which this ember "
                                      "does not have; rebuild it for this machine")
            if dev.type == "cuda":  # the checks `ember doctor` runs, for this GPU (compat.py)
                from . import compat

                p = torch.cuda.get_device_properties(dev)
                host = compat.host_for_gpu(p.name, f"{p.major}.{p.minor}", torch=torch.__version__,
                                           triton=kernel_store.triton_version(), backends=["reference"])
                problems = compat.check_engine(f.manifest, host, allow_other_gpu=allow_other_gpu,
                                               engine=os.fspath(path))
                compat.require_runnable(problems, os.fspath(path))
                for w in problems:
                    if w.severity != "error":
                        log.warning("engine '%s': %s. %s", os.fspath(path), w.reason, w.remedy)
            stored = f.manifest.get("kernels") or {}
            kernels: dict[str, bytes] = {}
            if dev.type == "cuda" and stored.get("triton") and stored.get("triton") == kernel_store.triton_version():
                # compiled kernels of this GPU and Triton version: Triton finds them instead of compiling
                kernels = arc.read_prefix(kernel_store.PREFIX)
                try:
                    kernel_store.restore(kernels)
                except EngineFileError as e:
                    raise EngineFileError(f"engine '{os.fspath(path)}': {e}") from None
                except OSError as e:  # an unwritable kernel folder costs compile time, not correctness
                    log.warning("engine '%s': stored kernels not restored into %s (%s); they will be compiled on "
                                "first use", os.fspath(path), kernel_store.store_dir(), e)
        try:
            engine = cls(f.graph, f.manifest, device=dev, weights=f.weights, allow_fallback=allow_fallback)
        except EngineFileError as e:  # a fallback, or a malformed per-bucket tactic record
            raise type(e)(f"engine '{os.fspath(path)}': {e}") from None
        engine.kernel_binaries = kernels
        if dev.type == "cuda":
            _init_vendor_libraries(f.graph, dev)  # overlaps the prewarm thread's hashing
        if warm is not None:
            warm.join()
        return engine

    def save(self, path: "str | os.PathLike", sign_key: "KeySource | None" = None) -> int:
        """Write the engine file; returns its size. ``sign_key`` (bytes, or the path of a key file):
        sign it, so that loads given the same key accept it and loads without one refuse it."""
        key = load_key(sign_key) if sign_key is not None else None
        manifest = dict(self.manifest)
        manifest.setdefault("backend", "reference")
        manifest["inputs"] = [s.to_json() for s in self.inputs]
        manifest["outputs"] = [s.to_json() for s in self.outputs]
        kernels = self.kernel_binaries
        if kernels:
            manifest["kernels"] = {"triton": kernel_store.triton_version(),
                                   "count": len(kernel_store.kernel_groups(kernels))}
        else:
            manifest.pop("kernels", None)
        return write_engine(path, self.graph, manifest, kernels, sign_key=key)

    @property
    def device(self) -> str:
        return self._device.type

    def _fallbacks(self) -> list[str]:
        """Layers whose build-time kernels cannot run here: tactics that do not bind on this device,
        and fusion groups that were generated at build time but cannot be now."""
        out = list(self._interp.fallbacks)
        built = self.manifest.get("fusion_groups")
        if self._device.type == "cuda" and isinstance(built, list):
            for gid in built:
                if str(gid) not in self._interp.group_kernels:
                    why = self._interp.groups_skipped.get(str(gid), "no kernel can be generated here")
                    out.append(f"fusion group {gid}: {why}")
        return out

    def create_execution_context(self, cuda_graph: bool = True, max_graphs: int = 32,
                                 max_graph_bytes: "int | None" = None, buckets: bool = True) -> "ExecutionContext":
        """A context to run this engine on its own stream; contexts share the engine's weights.
        ``max_graph_bytes`` caps the device memory its plans hold (LRU); ``buckets`` pads a dynamic
        batch to a captured size where the model treats rows independently (buckets.py)."""
        from .context import ExecutionContext

        return ExecutionContext(self, cuda_graph=cuda_graph, max_graphs=max_graphs,
                                max_graph_bytes=max_graph_bytes, buckets=buckets)

    @contextlib.contextmanager
    def _checkout(self) -> "Iterator[ExecutionContext]":
        """A context of the engine's pool for one run: the most recently used idle one, a new one
        while there are fewer than ``max_contexts``, else the next to come back."""
        with self._ctx_cond:
            while not self._idle and self._made >= self.max_contexts:
                self._ctx_cond.wait()
            ctx = self._idle.pop() if self._idle else None
            if ctx is None:
                self._made += 1
        if ctx is None:
            try:
                ctx = self.create_execution_context()
            except BaseException:
                with self._ctx_cond:
                    self._made -= 1
                    self._ctx_cond.notify()
                raise
        try:
            yield ctx
        finally:
            with self._ctx_cond:
                self._idle.append(ctx)
                self._ctx_cond.notify()

    def context(self) -> "ExecutionContext":
        """The context ``run`` would use next (the most recently used one): for reports."""
        with self._checkout() as ctx:
            return ctx

    def capture_report(self, feeds: "Mapping[str, Any] | None" = None) -> dict[str, Any]:
        """How ``run(feeds)`` executes here: one CUDA graph, or segments with the nodes that break it."""
        return self.context().capture_report(feeds)

    # -- running --------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on a dict of inputs (numpy arrays or torch tensors).

        Returns numpy arrays, or torch tensors on the engine's device when every input was a tensor.
        On a GPU each run goes through one of the engine's ExecutionContexts: CUDA graphs per input
        signature, inputs and outputs staged through reused pinned buffers.
        """
        if not isinstance(feeds, Mapping):
            raise InputError(f"run() takes a dict of input name -> array; got {type(feeds).__name__}. "
                             f"Inputs: {', '.join(s.name for s in self.inputs)}")
        if bool(feeds) and all(isinstance(x, torch.Tensor) for x in feeds.values()):
            if self._device.type == "cuda":
                self._check_names(feeds)
                with self._checkout() as ctx:
                    return ctx.run_device({k: x.to(self._device) for k, x in feeds.items()})
            tensors = self._check_inputs(feeds)
            with torch.inference_mode():
                return self._interp.run(tensors)
        with self._checkout() as ctx:
            return ctx.run(feeds)

    __call__ = run

    def _check_names(self, feeds: Mapping[str, Any]) -> None:
        expected = {v.name for v in self.graph.inputs}
        unknown = [k for k in feeds if k not in expected]
        if unknown:
            raise InputError(f"unknown input(s) {', '.join(map(repr, unknown))}; this engine's inputs are: "
                             + ", ".join(str(s) for s in self.inputs))
        missing = [v.name for v in self.graph.inputs if v.name not in feeds]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}; this engine's inputs are: "
                             + ", ".join(str(s) for s in self.inputs))

    def _check_specs(self, specs: Mapping[str, tuple]) -> None:
        """Check each tensor input's (shape, dtype) against the engine: dtype, rank, fixed dims, dims
        that share a name, profiles. ``dtype``: a numpy or torch dtype, or a DType."""
        bound: dict[str, tuple[int, str]] = {}
        for v in self.graph.inputs:
            if v.kind != "tensor" or v.name not in specs:
                continue
            shape, dt = specs[v.name]
            shape = tuple(int(d) for d in shape)
            got_dt = _as_dtype(dt, v.name)
            if v.dtype is not None and got_dt != v.dtype:
                raise InputError(f"input '{v.name}' has dtype {got_dt.value}; the engine expects {v.dtype.value} "
                                 f"(convert it, e.g. x.astype('{v.dtype.value}'))")
            if v.shape is None:
                continue
            if len(shape) != len(v.shape):
                raise InputError(f"input '{v.name}' has rank {len(shape)} (shape {list(shape)}); the engine "
                                 f"expects rank {len(v.shape)}: {_spec(v)}")
            for i, (d, want) in enumerate(zip(shape, v.shape)):
                if isinstance(want, int) and d != want:
                    raise InputError(f"input '{v.name}' has size {d} at axis {i}; the engine expects {want} "
                                     f"({_spec(v)})")
                sym = as_symbol(want)
                if sym is not None:
                    if sym in bound and bound[sym][0] != d:
                        raise InputError(
                            f"dim '{sym}' is {bound[sym][0]} in input '{bound[sym][1]}' but {d} in input "
                            f"'{v.name}' (axis {i}); inputs that share a dim name must agree")
                    bound.setdefault(sym, (d, v.name))
        if self.profiles:
            self._check_profiles({k: tuple(int(d) for d in sd[0]) for k, sd in specs.items()})

    def _check_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Check the inputs and make them runtime values on the engine's device (the eager path)."""
        self._check_names(feeds)
        out: dict[str, Any] = {}
        specs: dict[str, tuple] = {}
        for v in self.graph.inputs:
            x = feeds[v.name]
            if v.kind != "tensor":
                out[v.name] = to_torch_value(x, self._device)
                continue
            if not isinstance(x, (torch.Tensor, np.ndarray)):
                try:
                    x = np.asarray(x, dtype=to_numpy(v.dtype) if v.dtype else None)
                except (TypeError, ValueError) as e:
                    raise InputError(f"input '{v.name}': cannot make an array of {type(x).__name__} ({e})") from None
            specs[v.name] = (tuple(x.shape), x.dtype)
            out[v.name] = x
        self._check_specs(specs)
        return {k: (to_torch_value(x, self._device) if k in specs else x) for k, x in out.items()}

    def _check_profiles(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for p in self.profiles:
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], r[0], r[2])) for n, r in p.items() if n in shapes):
                return
        desc = "; ".join(
            "profile %d: %s" % (i, ", ".join(f"{n} {list(r[0])}..{list(r[2])}" for n, r in p.items()))
            for i, p in enumerate(self.profiles))
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise InputError(f"input shapes ({got}) are outside every optimization profile of this engine ({desc}). "
                         "Rebuild with a profile that covers them (--min-shapes/--opt-shapes/--max-shapes).")

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"Engine({self.device}; inputs: {ins}; outputs: {outs}; {len(self.graph.nodes)} nodes)"


def _as_dtype(dt: Any, name: str) -> DType:
    if isinstance(dt, DType):
        return dt
    if isinstance(dt, torch.dtype):
        try:
            return from_torch(dt)
        except ValueError:
            raise InputError(f"input '{name}' has dtype {dt}, which ember does not run") from None
    return _np_dtype(np.dtype(dt), name)


def _np_dtype(dt: np.dtype, name: str) -> DType:
    from ..ir.dtypes import from_numpy

    try:
        return from_numpy(dt)
    except ValueError:
        raise InputError(f"input '{name}' has dtype {dt}, which ember does not run") from None


def check_same_gpu(manifest: dict[str, Any], name: str, capability: str, path: str) -> None:
    """Tactics and kernels are chosen per GPU: a CUDA engine from another GPU model is refused."""
    built = (manifest.get("build_host") or {}).get("gpu")
    if manifest.get("device") != "cuda" or not built:
        return
    if (built.get("name"), built.get("capability")) != (name, capability):
        raise EngineFileError(
            f"engine '{path}' was built and tuned on {built.get('name')} (sm {built.get('capability')}); this GPU "
            f"is {name} (sm {capability}). Rebuild it here with `ember build`, or load it with "
            "Engine.load(path, allow_other_gpu=True) to run it with the other GPU's tactics.")


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}
    return info


__all__ = ["Engine", "TensorSpec", "host_info", "resolve_device"]


def _init_vendor_libraries(graph: Graph, device: torch.device) -> None:
    """One tiny call into each vendor library the engine's tactics use (cuDNN, cuBLASLt, SDPA), so
    their one-time initialization (handles, lazily loaded kernel modules: about 0.2 s for cuDNN on
    the H200 machine) happens during load, not inside the first inference. Best effort."""
    used = {t for n in graph.nodes for t in tactic_names(n)}
    try:
        with torch.inference_mode():
            if any(t.startswith("cudnn.") for t in used):
                x = torch.ones(1, 8, 4, 4, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
                w = torch.ones(8, 8, 1, 1, device=device, dtype=torch.float16).to(memory_format=torch.channels_last)
                if hasattr(torch, "cudnn_convolution_relu"):
                    torch.cudnn_convolution_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1)
                else:
                    torch.nn.functional.conv2d(x, w)
            if any(t.startswith("cublaslt.") for t in used):
                a = torch.ones(8, 8, device=device, dtype=torch.float16)
                torch._addmm_activation(a[0], a, a)
            if "sdpa" in used:
                q = torch.ones(1, 1, 8, 64, device=device, dtype=torch.float16)
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except Exception as e:  # warming is an optimization only
        log.debug("vendor library warm-up skipped: %s", e)
