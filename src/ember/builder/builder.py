"""build(): ONNX model -> optimized IR -> Engine."""
from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import onnx
import torch

from .. import __version__
from ..errors import EmberError
from ..frontend.onnx import import_onnx
from ..ir.dtypes import DType
from ..ir.graph import Graph
from ..ir.verify import verify
from ..kernels import kernel_store
from ..ops import known_ops
from ..ops.infer import infer_shapes
from ..runtime.engine import Engine, host_info, resolve_device
from .memory import check_workspace, plan_memory, plan_specialization
from .fidelity import DEFAULT_BUDGET, parse_budget
from .mixed_precision import build_low_precision
from .precision import KeptLayer
from .profiles import bind_static_shapes, check_profiles, opt_feeds, profile_feeds, tuning_profiles
from .quantize import CalibrationOptions
from .bucket_tuning import profile_at, tune_buckets
from .tuner import TimingCache, default_cache_path, select_tactics

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")


@dataclass
class BuilderConfig:
    """What to build. Fields grow with the backends; unknown combinations are refused, not ignored."""

    device: str = "auto"
    opt_level: int = 2
    precision: str = "fp32"
    debug: bool = False  # verify the graph after every pass
    # static input shapes: dims folded at build time ({"x": (1, 3, 224, 224)})
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # dynamic-shape profiles: [{"x": (min, opt, max)}, ...]; tactics are tuned at opt
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = field(default_factory=list)
    builder_level: int = 2  # 0: no timing ... 5: most repetitions
    # also time anchor ops at smaller sizes of the profile's dynamic batch (min, a middle bucket) and
    # record per node the winner of each bucket where they differ (bucket_tuning.py); False: opt only
    bucket_tactics: bool = True
    workspace: Optional[float] = None  # MiB of activation memory the engine may plan for (None: no limit)
    timing_cache: Optional[str] = "default"  # path, "default" (~/.cache/ember), or None
    # called with builder.progress.Progress values (strings that also carry stage, done and total)
    progress: Optional[Callable[[str], None]] = None
    # fp16/bf16: the relative L2 distance from fp32 the engine's outputs may have on the tuning
    # inputs; layers that drift are kept fp32 until it holds. None, "none" or "off": no check
    fidelity_budget: "float | str | None" = DEFAULT_BUDGET
    # INT8/FP8 (builder/quantize.py): "int8" or "fp8"; the float layers follow ``precision``
    quantize: Optional[str] = None
    calibration: Any = None  # the data: a path (folder of .npz/.npy or images, one .npz, a .txt) or an iterable
    calib_method: Optional[str] = None  # entropy | minmax | percentile | mse (default: mse; fp8: minmax)
    calib_samples: Optional[int] = 512  # at most this many samples (None: all)
    calib_cache: Optional[str] = None  # a readable text file of the ranges, reused while the graph is the same
    calib_options: CalibrationOptions = field(default_factory=CalibrationOptions)
    # SmoothQuant for the GEMMs' activations: "auto" (alpha 0.8), a number (that alpha), or None
    smooth_alpha: "float | str | None" = "auto"
    # the relative L2 distance from fp32 the quantized engine may have on held-out data ("1%"); the
    # most sensitive layers stay in floating point until it holds. None: quantize every layer
    accuracy_budget: "float | str | None" = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildReport:
    nodes_in: int
    nodes_out: int
    seconds: float
    passes: list[str] = field(default_factory=list)


def tunes_on(device: torch.device) -> bool:
    """Whether builds on ``device`` time tactics (CPU builds run the reference and vendor defaults)."""
    return device.type == "cuda"


def count_kernels(graph: Graph) -> int:
    from ..passes import count_kernels as count

    return count(graph)


def reinfer_static(graph: Graph) -> None:
    """Forget inferred shapes of intermediate values and infer them again (inputs keep theirs).
    If/Loop/Scan bodies too: a branch computes from the outer values that just became static."""
    from ..passes.scope import nested_graphs

    for g in [graph, *nested_graphs(graph)]:
        for n in g.nodes:
            for o in n.outputs:
                o.shape = None
    infer_shapes(graph)


def optimize(graph: Graph, config: BuilderConfig) -> list[str]:
    """Run the pass pipeline of ``config.opt_level``. Returns the names of passes that changed the graph."""
    from ..passes import run_pipeline

    return run_pipeline(graph, config.opt_level, debug=config.debug)


def build(model: "str | os.PathLike | bytes | onnx.ModelProto", config: Optional[BuilderConfig] = None,
          **kwargs: Any) -> Engine:
    """Build an engine from an ONNX model (path, bytes or ModelProto).

    ``ember.build("model.onnx", device="cpu", opt_level=2)``; keyword arguments fill a BuilderConfig.
    """
    if config is None:
        unknown = set(kwargs) - set(BuilderConfig.__dataclass_fields__)
        if unknown:
            raise EmberError(f"build() got unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(BuilderConfig.__dataclass_fields__)}")
        config = BuilderConfig(**kwargs)
    if config.precision not in PRECISIONS:
        raise EmberError(f"precision '{config.precision}' is not one of {', '.join(PRECISIONS)}")
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    graph = import_onnx(model)
    nodes_in = len(graph.nodes)
    profiles = check_profiles(graph, config)
    if config.shapes:
        bind_static_shapes(graph, config.shapes)
    infer_shapes(graph)
    verify(graph, known_ops())
    changed = optimize(graph, config)
    for _ in range(4 if config.shapes else 0):
        # the exporter's unnamed dims (unk__N) hid static sizes: infer again from the folded graph
        # and optimize again (each round folds the shape arithmetic the last one made static)
        reinfer_static(graph)
        more = optimize(graph, config)
        changed += more
        if not any(p != "group_fusions" for p in more):
            break
    tuning = tuning_profiles(graph, profiles)  # every input's shapes to tune at (chosen, with a warning, if not given)
    low = {"fp16": DType.FLOAT16, "bf16": DType.BFLOAT16}.get(config.precision)
    budget = parse_budget(config.fidelity_budget)  # checked in every build: a typo is an error, not a default
    quantization = None
    if config.quantize is not None:
        graph, quantization = _quantize(graph, config, device)
    cache = None
    if tunes_on(device):
        cache = TimingCache.open(default_cache_path() if config.timing_cache == "default" else config.timing_cache)
    tune = None
    kept_fp32: list[KeptLayer] = []
    fidelity = None
    if low is not None:
        lowered = build_low_precision(graph, low, device, opt_feeds(graph, tuning, device), opt_level=config.opt_level,
                                      builder_level=config.builder_level, cache=cache, budget=budget,
                                      progress=config.progress, debug=config.debug)
        graph, kept_fp32, tune, fidelity = lowered.graph, lowered.kept, lowered.tune, lowered.fidelity
        verify(graph, known_ops())
    elif config.debug:
        verify(graph, known_ops())
    buckets = None
    if cache is not None:
        if low is None:
            tune = select_tactics(graph, device, opt_feeds(graph, tuning, device), config.builder_level, cache,
                                  config.progress, allow_tf32=config.precision == "tf32")
        # the winners at smaller sizes of a dim the profile varies, where they differ (bucket_tuning.py)
        if config.bucket_tactics:
            buckets = tune_buckets(graph, device, tuning, config.builder_level, cache, config.progress,
                                   allow_tf32=config.precision == "tf32")
        cache.save()
    memory = plan_memory(graph, plan_specialization(graph, opt_feeds(graph, tuning, torch.device("cpu"))))
    check_workspace(memory, config.workspace)
    report = BuildReport(nodes_in, count_kernels(graph), time.perf_counter() - t0, changed)
    manifest = {
        "ember_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": _source_info(model),
        "backend": "reference",
        "device": device.type,
        "precision": config.precision,
        "opt_level": config.opt_level,
        "builder_level": config.builder_level,  # so that `ember build --rebuild-from` can build it again
        "build_host": host_info(),
        "profiles": [{k: [list(d) for d in v] for k, v in p.items()} for p in profiles],
        "memory": memory,
        "static_shapes": {k: list(v) for k, v in config.shapes.items()},
        "tactics": tune.choices if tune else {},
        "tactic_failures": tune.failures if tune else [],
        # numerics that differ from the model's ops beyond storage rounding, said out loud
        "approximations": ([f"{n.name}: erf-GELU computed in the tanh form inside the cuBLASLt epilogue"
                            for n in graph.nodes if n.op == "ember.Gemm" and n.attrs.get("activation") == "Gelu"
                            and n.meta.get("tactic") == "cublaslt.linear"]
                           if config.precision in ("fp16", "bf16") else []),
        "fp32_layers": [str(k) for k in kept_fp32],
        "nodes_in": nodes_in,
        "nodes_out": count_kernels(graph),  # a fusion group counts once
    }
    if config.precision == "tf32":
        manifest["allow_tf32"] = True
    if buckets is not None:
        manifest["tactic_buckets"] = buckets.manifest()  # the dim and sizes tactics were also timed at
    if fidelity is not None:
        manifest["fidelity"] = fidelity  # the fp16/bf16 check: budget, output drift before and after
    if quantization is not None:
        manifest["quantization"] = quantization.manifest  # INT8/FP8: calibration, layers, the accuracy budget
    # the shapes the engine was tuned and planned at (a profile's opt shapes, or the ones chosen)
    opt = tuning[0] if tuning else {}
    manifest["tuned_shapes"] = {v.name: [int(d) for d in opt[v.name][1]] if v.name in opt else
                                [d if isinstance(d, int) else 1 for d in (v.shape or ())] for v in graph.inputs}
    engine = Engine(graph, manifest, device=device)
    if device.type == "cuda":
        # a group given a generated kernel here must get one wherever the engine loads (else: a fallback)
        engine.manifest["fusion_groups"] = sorted(engine._interp.group_kernels)
        # runs at each profile's min, opt and max shapes: they compile what first inferences would
        # (Triton specializes on sizes of 1 and multiples of 16), and record the kernels the engine
        # launches so that save() stores their binaries
        with kernel_store.recording() as launched, torch.inference_mode():
            for feeds in profile_feeds(graph, tuning, device):
                engine._interp.run(feeds)
            for size in buckets.sizes[1:-1] if buckets else ():  # a middle bucket's choices (min, opt: above)
                engine._interp.run(opt_feeds(graph, [profile_at(graph, tuning[0], buckets.symbol, size)], device))
        engine.kernel_binaries = kernel_store.members(launched)
    engine.build_report = report  # type: ignore[attr-defined]
    engine.tuning = tune  # type: ignore[attr-defined]  (per-node timings of this build; None off CUDA)
    engine.bucket_tuning = buckets  # type: ignore[attr-defined]  (tactics per shape bucket; None if not tuned)
    return engine


def _quantize(graph: Graph, config: BuilderConfig, device: torch.device) -> "tuple[Graph, Any]":
    """The INT8/FP8 graph of an optimized fp32 graph (builder/quantize.py), its fusion groups made again."""
    from ..quant import parse_budget as parse_accuracy_budget
    from .mixed_precision import regroup
    from .quantize import build_quantized

    alpha = config.smooth_alpha
    if isinstance(alpha, str):
        text = alpha.strip().lower()
        try:
            alpha = None if text in ("none", "off", "") else "auto" if text == "auto" else float(text)
        except ValueError:
            raise EmberError(f"SmoothQuant alpha {config.smooth_alpha!r} is not a number, 'auto' or 'none'") from None
    if alpha is not None and alpha != "auto" and not 0.0 <= alpha <= 1.0:
        raise EmberError(f"SmoothQuant alpha {alpha} must be between 0 and 1 (0.5 balances activation and weight "
                         "ranges)")
    q = build_quantized(graph, config.quantize, device, config.calibration, method=config.calib_method,
                        samples=config.calib_samples, cache_path=config.calib_cache, options=config.calib_options,
                        smooth_alpha=alpha, budget=parse_accuracy_budget(config.accuracy_budget),
                        progress=config.progress)
    regroup(q.graph, config.opt_level)  # the quantized anchors and what is left of the Q/DQ pairs
    if config.debug:
        verify(q.graph, known_ops())
    return q.graph, q


def _source_info(model: Any) -> dict[str, Any]:
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return {"file": os.path.basename(path), "sha256": h.hexdigest()}
    return {"file": None}
