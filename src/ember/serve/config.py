"""Model configuration: ember's config.yaml and Triton's config.pbtxt, read into one dataclass.

config.yaml (every key optional; inputs/outputs default to the engine's):

    max_batch_size: 8              # 0: no batching, shapes below are full shapes
    inputs:  [{name: x, dtype: float32, shape: [4]}]    # shape without the batch dim
    outputs: [{name: y, dtype: float32, shape: [4]}]
    dynamic_batching:
      preferred_batch_sizes: [4, 8]
      max_queue_delay_us: 500
      max_queue_size: 64           # 0: the server's --max-queue-size
      default_timeout_us: 0        # 0: no timeout
      allow_timeout_override: true
      timeout_action: reject       # or delay
      priority_levels: 2
      default_priority_level: 1
    instance_count: 2
    version_policy: {latest: 1}    # or: all, or {specific: [1, 3]}
    build: {precision: fp16}       # ember.build options, used when a version holds model.onnx
    warmup:
      - {name: w, batch_size: 4, count: 1, inputs: {x: {dtype: float32, shape: [4], data: random}}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datatypes import config_type_name, normalize_datatype
from .errors import RepositoryError
from .pbtxt import PbtxtError, parse_pbtxt


@dataclass
class TensorConfig:
    name: str
    datatype: str  # KServe name: FP32, INT64, ...
    dims: tuple[int, ...]  # -1 = any size; excludes the batch dim when max_batch_size > 0
    optional: bool = False


@dataclass
class QueuePolicy:
    max_queue_size: int = 0  # 0: the server default (never unbounded)
    default_timeout_us: int = 0  # 0: no timeout
    allow_timeout_override: bool = True
    timeout_action: str = "REJECT"  # REJECT: fail expired requests; DELAY: run them after the others


@dataclass
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    priority_levels: int = 0  # 0: one level
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: dict[int, QueuePolicy] = field(default_factory=dict)
    preserve_ordering: bool = False


@dataclass
class VersionPolicy:
    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return [v for v in available if v in self.versions]
        return available[-self.num_versions:] if self.num_versions > 0 else []


@dataclass
class WarmupInput:
    datatype: str
    dims: tuple[int, ...]
    source: str = "zero"  # zero | random | file
    file: str | None = None


@dataclass
class Warmup:
    name: str
    batch_size: int = 1
    inputs: dict[str, WarmupInput] = field(default_factory=dict)
    count: int = 1


@dataclass
class ModelConfig:
    name: str
    max_batch_size: int = 0
    inputs: list[TensorConfig] = field(default_factory=list)
    outputs: list[TensorConfig] = field(default_factory=list)
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = 1
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup: list[Warmup] = field(default_factory=list)
    default_model_filename: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # ember.build options for model.onnx (YAML only)
    source: str = ""  # the file this came from, for error messages

    def to_triton_json(self, platform: str) -> dict[str, Any]:
        """The model configuration as Triton's JSON (GET .../config, gRPC ModelConfig)."""
        vp: dict[str, Any]
        if self.version_policy.kind == "all":
            vp = {"all": {}}
        elif self.version_policy.kind == "specific":
            vp = {"specific": {"versions": list(self.version_policy.versions)}}
        else:
            vp = {"latest": {"num_versions": self.version_policy.num_versions}}
        out: dict[str, Any] = {
            "name": self.name, "platform": platform, "backend": "ember", "version_policy": vp,
            "max_batch_size": self.max_batch_size,
            "input": [{"name": t.name, "data_type": config_type_name(t.datatype), "dims": list(t.dims),
                       "optional": t.optional} for t in self.inputs],
            "output": [{"name": t.name, "data_type": config_type_name(t.datatype), "dims": list(t.dims)}
                       for t in self.outputs],
            "instance_group": [{"name": f"{self.name}_0", "kind": "KIND_MODEL", "count": self.instance_count,
                                "gpus": []}],
            "default_model_filename": self.default_model_filename or "model.engine",
            "parameters": {k: {"string_value": v} for k, v in self.parameters.items()},
            "model_warmup": [{"name": w.name, "batch_size": w.batch_size, "count": w.count,
                              "inputs": {k: {"data_type": config_type_name(i.datatype), "dims": list(i.dims),
                                             **({"input_data_file": i.file} if i.source == "file"
                                                else {f"{i.source}_data": True})}
                                         for k, i in w.inputs.items()}} for w in self.warmup],
        }
        db = self.dynamic_batching
        if db is not None:
            def qp(p: QueuePolicy) -> dict[str, Any]:
                return {"timeout_action": p.timeout_action, "default_timeout_microseconds": p.default_timeout_us,
                        "allow_timeout_override": p.allow_timeout_override, "max_queue_size": p.max_queue_size}
            out["dynamic_batching"] = {
                "preferred_batch_size": list(db.preferred_batch_sizes),
                "max_queue_delay_microseconds": db.max_queue_delay_us,
                "preserve_ordering": db.preserve_ordering,
                "priority_levels": db.priority_levels, "default_priority_level": db.default_priority_level,
                "default_queue_policy": qp(db.default_queue_policy),
                "priority_queue_policy": {str(k): qp(v) for k, v in db.priority_queue_policy.items()},
            }
        return out


# ---- reading ------------------------------------------------------------------------------------------


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read <model_dir>/config.yaml (or .yml), else config.pbtxt, else defaults."""
    name = model_dir.name
    for fname in ("config.yaml", "config.yml"):
        path = model_dir / fname
        if path.is_file():
            try:
                import yaml
            except ImportError as e:
                raise RepositoryError(f"{path}: reading YAML needs pyyaml: pip install 'ember[serve]'") from e
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise RepositoryError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise RepositoryError(f"{path}: the top level must be a mapping of settings")
            return config_from_yaml(data, name, str(path))
    path = model_dir / "config.pbtxt"
    if path.is_file():
        try:
            msg = parse_pbtxt(path.read_text())
        except PbtxtError as e:
            raise RepositoryError(f"{path}: {e}") from None
        from .triton_config import config_from_pbtxt

        return config_from_pbtxt(msg, name, str(path))
    return ModelConfig(name=name, source=str(model_dir))


def _fail(src: str, what: str) -> RepositoryError:
    return RepositoryError(f"{src}: {what}")


def _check_keys(d: dict, allowed: set[str], src: str, where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _fail(src, f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def _int(v: Any, src: str, where: str, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _fail(src, f"{where} must be an integer >= {minimum}, got {v!r}")
    return v


def _dims(v: Any, src: str, where: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise _fail(src, f"{where} must be a list of dims like [3, 224, 224] (-1 = any), got {v!r}")
    return tuple(_int(d, src, f"{where}[{i}]", minimum=-1) for i, d in enumerate(v))


def _dtype(v: Any, src: str, where: str) -> str:
    try:
        return normalize_datatype(v, where)
    except ValueError as e:
        raise _fail(src, str(e)) from None


def _yaml_tensor(d: Any, src: str, where: str) -> TensorConfig:
    if not isinstance(d, dict):
        raise _fail(src, f"{where} must be a mapping with name, dtype and shape")
    _check_keys(d, {"name", "dtype", "datatype", "data_type", "shape", "dims", "optional"}, src, where)
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise _fail(src, f"{where} needs a name")
    dt = d.get("dtype", d.get("datatype", d.get("data_type")))
    if dt is None:
        raise _fail(src, f"{where} ('{d['name']}') needs a dtype")
    shape = d.get("shape", d.get("dims"))
    if shape is None:
        raise _fail(src, f"{where} ('{d['name']}') needs a shape (without the batch dim when max_batch_size > 0)")
    return TensorConfig(d["name"], _dtype(dt, src, f"{where} ('{d['name']}')"), _dims(shape, src, where),
                        bool(d.get("optional", False)))


def _duration_us(d: dict, key: str, src: str, where: str) -> int:
    """Accept key_us, key_ms (may be fractional) or Triton's key_microseconds."""
    base = key[:-3]
    if f"{base}_ms" in d:
        v = d[f"{base}_ms"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _fail(src, f"{where}.{base}_ms must be a number >= 0, got {v!r}")
        return int(round(v * 1000))
    v = d.get(key, d.get(f"{base}_microseconds", 0))
    return _int(v, src, f"{where}.{key}")


def _yaml_queue_policy(d: dict, src: str, where: str) -> QueuePolicy:
    action = str(d.get("timeout_action", "reject")).upper()
    if action not in ("REJECT", "DELAY"):
        raise _fail(src, f"{where}.timeout_action must be reject or delay, got {d.get('timeout_action')!r}")
    return QueuePolicy(
        max_queue_size=_int(d.get("max_queue_size", 0), src, f"{where}.max_queue_size"),
        default_timeout_us=_duration_us(d, "default_timeout_us", src, where),
        allow_timeout_override=bool(d.get("allow_timeout_override", True)),
        timeout_action=action,
    )


_QP_KEYS = {"max_queue_size", "default_timeout_us", "default_timeout_ms", "default_timeout_microseconds",
            "allow_timeout_override", "timeout_action"}
_DB_KEYS = _QP_KEYS | {"preferred_batch_sizes", "preferred_batch_size", "max_queue_delay_us", "max_queue_delay_ms",
                       "max_queue_delay_microseconds", "priority_levels", "default_priority_level",
                       "priority_queue_policy", "preserve_ordering"}
_TOP_KEYS = {"name", "max_batch_size", "inputs", "outputs", "input", "output", "dynamic_batching", "instance_count",
             "version_policy", "warmup", "model_warmup", "default_model_filename", "parameters", "platform", "backend",
             "build"}


def _guarded(fn):
    """A value of the wrong form deep inside a config (a number where a list belongs, ...) becomes a
    RepositoryError naming the file, never a stray TypeError."""
    def wrapper(d: Any, name: str, src: str) -> ModelConfig:
        try:
            return fn(d, name, src)
        except RepositoryError:
            raise
        except (AttributeError, TypeError, ValueError, KeyError) as e:
            raise _fail(src, f"a setting has the wrong form ({type(e).__name__}: {e}); see docs/serve.md for the "
                             "schema") from None
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_guarded
def config_from_yaml(d: dict, name: str, src: str) -> ModelConfig:
    _check_keys(d, _TOP_KEYS, src, "config")
    if "name" in d and d["name"] != name:
        raise _fail(src, f"name '{d['name']}' differs from the model directory '{name}'; make them equal")
    cfg = ModelConfig(name=name, source=src)
    cfg.max_batch_size = _int(d.get("max_batch_size", 0), src, "max_batch_size")
    for key, attr in (("inputs", "inputs"), ("input", "inputs"), ("outputs", "outputs"), ("output", "outputs")):
        if key in d:
            if not isinstance(d[key], list):
                raise _fail(src, f"{key} must be a list")
            setattr(cfg, attr, [_yaml_tensor(t, src, f"{key}[{i}]") for i, t in enumerate(d[key])])
    db = d.get("dynamic_batching")
    if db is not None and db is not False:
        if db is True:
            db = {}
        if not isinstance(db, dict):
            raise _fail(src, "dynamic_batching must be a mapping (or true for the defaults)")
        _check_keys(db, _DB_KEYS, src, "dynamic_batching")
        pref = db.get("preferred_batch_sizes", db.get("preferred_batch_size", []))
        ppol = db.get("priority_queue_policy") or {}
        if not isinstance(ppol, dict):
            raise _fail(src, "dynamic_batching.priority_queue_policy must map a priority level to a queue policy")
        cfg.dynamic_batching = DynamicBatching(
            preferred_batch_sizes=tuple(_int(p, src, "preferred_batch_sizes[]", 1) for p in pref),
            max_queue_delay_us=_duration_us(db, "max_queue_delay_us", src, "dynamic_batching"),
            priority_levels=_int(db.get("priority_levels", 0), src, "dynamic_batching.priority_levels"),
            default_priority_level=_int(db.get("default_priority_level", 0), src, "default_priority_level"),
            default_queue_policy=_yaml_queue_policy(db, src, "dynamic_batching"),
            priority_queue_policy={_int(int(k), src, "priority level", 1): _yaml_queue_policy(
                v, src, f"priority_queue_policy[{k}]") for k, v in ppol.items()},
            preserve_ordering=bool(db.get("preserve_ordering", False)),
        )
    cfg.instance_count = _int(d.get("instance_count", 1), src, "instance_count", 1)
    cfg.version_policy = _yaml_version_policy(d.get("version_policy"), src)
    warm = d.get("warmup", d.get("model_warmup", []))
    if not isinstance(warm, list):
        raise _fail(src, "warmup must be a list of warm-up requests")
    cfg.warmup = [_yaml_warmup(w, src, i) for i, w in enumerate(warm)]
    dmf = d.get("default_model_filename")
    cfg.default_model_filename = str(dmf) if dmf else None
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(src, "parameters must be a mapping of strings")
    cfg.parameters = {str(k): str(v) for k, v in params.items()}
    build = d.get("build") or {}
    if not isinstance(build, dict):
        raise _fail(src, "build must be a mapping of ember.build options, like {precision: fp16}")
    cfg.build = {str(k): v for k, v in build.items()}
    validate_config(cfg)
    return cfg


def _yaml_version_policy(v: Any, src: str) -> VersionPolicy:
    if v is None:
        return VersionPolicy()
    if v == "all" or (isinstance(v, dict) and "all" in v):
        return VersionPolicy(kind="all")
    if v == "latest":
        return VersionPolicy()
    if isinstance(v, dict) and len(v) == 1 and "latest" in v:
        n = v["latest"]
        n = n.get("num_versions", 1) if isinstance(n, dict) else n
        return VersionPolicy(kind="latest", num_versions=_int(n, src, "version_policy.latest", 1))
    if isinstance(v, dict) and len(v) == 1 and "specific" in v:
        vs = v["specific"]
        vs = vs.get("versions", []) if isinstance(vs, dict) else vs
        if not isinstance(vs, list) or not vs:
            raise _fail(src, "version_policy.specific must be a non-empty list of version numbers")
        return VersionPolicy(kind="specific", versions=tuple(_int(x, src, "version_policy.specific[]", 1) for x in vs))
    raise _fail(src, f"version_policy must be 'all', {{latest: N}} or {{specific: [versions]}}, got {v!r}")


def _yaml_warmup(w: Any, src: str, i: int) -> Warmup:
    where = f"warmup[{i}]"
    if not isinstance(w, dict):
        raise _fail(src, f"{where} must be a mapping with name, batch_size, inputs")
    _check_keys(w, {"name", "batch_size", "inputs", "count"}, src, where)
    inputs: dict[str, WarmupInput] = {}
    raw = w.get("inputs") or {}
    if not isinstance(raw, dict):
        raise _fail(src, f"{where}.inputs must map input names to {{dtype, shape, data}}")
    for k, spec in raw.items():
        if not isinstance(spec, dict):
            raise _fail(src, f"{where}.inputs.{k} must be a mapping with dtype, shape and data")
        _check_keys(spec, {"dtype", "datatype", "data_type", "shape", "dims", "data", "file"}, src,
                    f"{where}.inputs.{k}")
        dt = spec.get("dtype", spec.get("datatype", spec.get("data_type")))
        shape = spec.get("shape", spec.get("dims"))
        if dt is None or shape is None:
            raise _fail(src, f"{where}.inputs.{k} needs dtype and shape")
        source = "file" if "file" in spec else str(spec.get("data", "zero"))
        if source not in ("zero", "random", "file"):
            raise _fail(src, f"{where}.inputs.{k}.data must be zero or random (or give file: path)")
        inputs[str(k)] = WarmupInput(_dtype(dt, src, f"{where}.inputs.{k}"), _dims(shape, src, f"{where}.inputs.{k}"),
                                     source, spec.get("file"))
    return Warmup(str(w.get("name", f"warmup_{i}")), _int(w.get("batch_size", 1), src, f"{where}.batch_size"),
                  inputs, _int(w.get("count", 1), src, f"{where}.count", 1))


def validate_config(cfg: ModelConfig) -> None:
    src = cfg.source
    for group in ("inputs", "outputs"):
        names = [t.name for t in getattr(cfg, group)]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise _fail(src, f"{group}: duplicate name(s) {sorted(dup)}")
    db = cfg.dynamic_batching
    if db is None:
        return
    if cfg.max_batch_size == 0 and db.preferred_batch_sizes:
        raise _fail(src, "preferred batch sizes need max_batch_size > 0")
    bad = [p for p in db.preferred_batch_sizes if p > cfg.max_batch_size]
    if bad:
        raise _fail(src, f"preferred batch size(s) {bad} exceed max_batch_size {cfg.max_batch_size}")
    if db.priority_levels and not (0 <= db.default_priority_level <= db.priority_levels):
        raise _fail(src, f"default_priority_level {db.default_priority_level} must be in 1..{db.priority_levels}")
    if not db.priority_levels and db.default_priority_level:
        raise _fail(src, "default_priority_level needs priority_levels > 0")
    bad = [k for k in db.priority_queue_policy if k > max(db.priority_levels, 1)]
    if bad:
        raise _fail(src, f"priority_queue_policy levels {bad} exceed priority_levels {db.priority_levels}")
