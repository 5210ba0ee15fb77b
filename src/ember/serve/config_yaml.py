"""ember's config.yaml, mapped onto Triton's ModelConfig in its JSON form.

config.yaml is the friendlier spelling of the same settings (every key optional; inputs and
outputs default to the engine's):

    max_batch_size: 8              # 0: no batching, shapes below are full shapes
    inputs:  [{name: x, dtype: float32, shape: [4]}]    # shape without the batch dim
    outputs: [{name: y, dtype: float32, shape: [4]}]
    dynamic_batching:
      preferred_batch_sizes: [4, 8]
      max_queue_delay_us: 500      # or max_queue_delay_ms: 0.5
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

`yaml_to_triton_json` renames keys and normalizes values (dtype names, durations) and nothing
else: the result is parsed with protobuf's `json_format` into the ModelConfig message that
config.pbtxt is parsed into, and checked by the same code (config.config_from_message). Keys
are checked here, so a typo is an error listing the allowed keys instead of a setting silently
ignored. `build` is ember's own (Triton has no such field) and is returned beside the JSON.
"""
from __future__ import annotations

from typing import Any

from .datatypes import config_type_name, normalize_datatype
from .errors import RepositoryError

_QP_KEYS = {"max_queue_size", "default_timeout_us", "default_timeout_ms", "default_timeout_microseconds",
            "allow_timeout_override", "timeout_action"}
_DB_KEYS = _QP_KEYS | {"preferred_batch_sizes", "preferred_batch_size", "max_queue_delay_us", "max_queue_delay_ms",
                       "max_queue_delay_microseconds", "priority_levels", "default_priority_level",
                       "priority_queue_policy", "preserve_ordering"}
TOP_KEYS = {"name", "max_batch_size", "inputs", "outputs", "input", "output", "dynamic_batching", "instance_count",
            "version_policy", "warmup", "model_warmup", "default_model_filename", "parameters", "platform", "backend",
            "build"}
_TENSOR_KEYS = {"name", "dtype", "datatype", "data_type", "shape", "dims", "optional"}
_WARMUP_KEYS = {"name", "batch_size", "inputs", "count"}
_WARMUP_INPUT_KEYS = {"dtype", "datatype", "data_type", "shape", "dims", "data", "file"}


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


def _dtype(v: Any, src: str, where: str) -> str:
    """float32 / FP32 / TYPE_FP32 -> TYPE_FP32 (Triton's enum name)."""
    try:
        return config_type_name(normalize_datatype(v, where))
    except ValueError as e:
        raise _fail(src, str(e)) from None


def _list(v: Any, src: str, where: str) -> list:
    if not isinstance(v, list):
        raise _fail(src, f"{where} must be a list, got {v!r:.60}")
    return v


def _duration_us(d: dict, key: str, src: str, where: str) -> int:
    """Accept key_us, key_ms (may be fractional) or Triton's key_microseconds."""
    base = key[:-3]
    if f"{base}_ms" in d:
        v = d[f"{base}_ms"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise _fail(src, f"{where}.{base}_ms must be a number >= 0, got {v!r}")
        return int(round(v * 1000))
    return _int(d.get(key, d.get(f"{base}_microseconds", 0)), src, f"{where}.{key}")


def _tensor(d: Any, src: str, where: str) -> dict:
    if not isinstance(d, dict):
        raise _fail(src, f"{where} must be a mapping with name, dtype and shape")
    _check_keys(d, _TENSOR_KEYS, src, where)
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise _fail(src, f"{where} needs a name")
    dt = d.get("dtype", d.get("datatype", d.get("data_type")))
    if dt is None:
        raise _fail(src, f"{where} ('{d['name']}') needs a dtype")
    shape = d.get("shape", d.get("dims"))
    if shape is None:
        raise _fail(src, f"{where} ('{d['name']}') needs a shape (without the batch dim when max_batch_size > 0)")
    out = {"name": d["name"], "data_type": _dtype(dt, src, f"{where} ('{d['name']}')"),
           "dims": _list(shape, src, f"{where} ('{d['name']}').shape")}
    if "optional" in d:
        out["optional"] = bool(d["optional"])
    return out


def _queue_policy(d: dict, src: str, where: str) -> dict:
    action = str(d.get("timeout_action", "reject")).upper()
    if action not in ("REJECT", "DELAY"):
        raise _fail(src, f"{where}.timeout_action must be reject or delay, got {d.get('timeout_action')!r}")
    return {"max_queue_size": d.get("max_queue_size", 0),
            "default_timeout_microseconds": _duration_us(d, "default_timeout_us", src, where),
            # unlike Triton's default (false), a YAML request may override the timeout unless told otherwise
            "allow_timeout_override": bool(d.get("allow_timeout_override", True)),
            "timeout_action": action}


def _dynamic_batching(db: Any, src: str) -> dict | None:
    if db is None or db is False:
        return None
    if db is True:
        db = {}
    if not isinstance(db, dict):
        raise _fail(src, "dynamic_batching must be a mapping (or true for the defaults)")
    _check_keys(db, _DB_KEYS, src, "dynamic_batching")
    levels = db.get("priority_queue_policy") or {}
    if not isinstance(levels, dict):
        raise _fail(src, "dynamic_batching.priority_queue_policy must map a priority level to a queue policy")
    for k, v in levels.items():
        if not isinstance(v, dict):
            raise _fail(src, f"dynamic_batching.priority_queue_policy[{k}] must be a mapping, like "
                             "{max_queue_size: 16}")
        _check_keys(v, _QP_KEYS, src, f"dynamic_batching.priority_queue_policy[{k}]")
    return {
        "preferred_batch_size": _list(db.get("preferred_batch_sizes", db.get("preferred_batch_size", [])), src,
                                      "dynamic_batching.preferred_batch_sizes"),
        "max_queue_delay_microseconds": _duration_us(db, "max_queue_delay_us", src, "dynamic_batching"),
        "priority_levels": db.get("priority_levels", 0),
        "default_priority_level": db.get("default_priority_level", 0),
        "default_queue_policy": _queue_policy(db, src, "dynamic_batching"),
        "priority_queue_policy": {str(_int(int(k), src, "a priority_queue_policy level", 1)):
                                  _queue_policy(v, src, f"priority_queue_policy[{k}]") for k, v in levels.items()},
        "preserve_ordering": bool(db.get("preserve_ordering", False)),
    }


def _version_policy(v: Any, src: str) -> dict | None:
    if v is None:
        return None
    if v == "all" or (isinstance(v, dict) and "all" in v):
        return {"all": {}}
    if v == "latest":
        return {"latest": {"num_versions": 1}}
    if isinstance(v, dict) and len(v) == 1 and "latest" in v:
        n = v["latest"]
        n = n.get("num_versions", 1) if isinstance(n, dict) else n
        return {"latest": {"num_versions": _int(n, src, "version_policy.latest", 1)}}
    if isinstance(v, dict) and len(v) == 1 and "specific" in v:
        vs = v["specific"]
        vs = vs.get("versions", []) if isinstance(vs, dict) else vs
        if not isinstance(vs, list) or not vs:
            raise _fail(src, "version_policy.specific must be a non-empty list of version numbers")
        return {"specific": {"versions": [_int(x, src, "version_policy.specific[]", 1) for x in vs]}}
    raise _fail(src, f"version_policy must be 'all', {{latest: N}} or {{specific: [versions]}}, got {v!r}")


def _warmup(w: Any, src: str, i: int) -> dict:
    where = f"warmup[{i}]"
    if not isinstance(w, dict):
        raise _fail(src, f"{where} must be a mapping with name, batch_size, inputs")
    _check_keys(w, _WARMUP_KEYS, src, where)
    raw = w.get("inputs") or {}
    if not isinstance(raw, dict):
        raise _fail(src, f"{where}.inputs must map input names to {{dtype, shape, data}}")
    inputs = {}
    for k, spec in raw.items():
        at = f"{where}.inputs.{k}"
        if not isinstance(spec, dict):
            raise _fail(src, f"{at} must be a mapping with dtype, shape and data")
        _check_keys(spec, _WARMUP_INPUT_KEYS, src, at)
        dt = spec.get("dtype", spec.get("datatype", spec.get("data_type")))
        shape = spec.get("shape", spec.get("dims"))
        if dt is None or shape is None:
            raise _fail(src, f"{at} needs dtype and shape")
        entry: dict[str, Any] = {"data_type": _dtype(dt, src, at), "dims": _list(shape, src, f"{at}.shape")}
        if "file" in spec:
            entry["input_data_file"] = spec["file"]
        else:
            source = str(spec.get("data", "zero"))
            if source not in ("zero", "random"):
                raise _fail(src, f"{at}.data must be zero or random (or give file: path)")
            entry[f"{source}_data"] = True
        inputs[str(k)] = entry
    return {"name": str(w.get("name", f"warmup_{i}")), "batch_size": _int(w.get("batch_size", 1), src,
                                                                           f"{where}.batch_size"),
            "count": _int(w.get("count", 1), src, f"{where}.count", 1), "inputs": inputs}


def yaml_to_triton_json(d: dict, src: str) -> tuple[dict, dict[str, Any]]:
    """config.yaml as a dict -> (Triton's ModelConfig as JSON, ember.build options)."""
    _check_keys(d, TOP_KEYS, src, "config")
    out: dict[str, Any] = {}
    for key in ("name", "platform", "backend", "default_model_filename"):
        if d.get(key) is not None:
            out[key] = d[key]
    if "max_batch_size" in d:
        out["max_batch_size"] = d["max_batch_size"]
    for key, field in (("inputs", "input"), ("input", "input"), ("outputs", "output"), ("output", "output")):
        if key in d:
            out[field] = [_tensor(t, src, f"{key}[{i}]") for i, t in enumerate(_list(d[key], src, key))]
    db = _dynamic_batching(d.get("dynamic_batching"), src)
    if db is not None:
        out["dynamic_batching"] = db
    if "instance_count" in d:
        out["instance_group"] = [{"count": _int(d["instance_count"], src, "instance_count", 1)}]
    vp = _version_policy(d.get("version_policy"), src)
    if vp is not None:
        out["version_policy"] = vp
    warm = d.get("warmup", d.get("model_warmup", []))
    out["model_warmup"] = [_warmup(w, src, i) for i, w in enumerate(_list(warm, src, "warmup"))]
    params = d.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(src, "parameters must be a mapping of strings")
    out["parameters"] = {str(k): {"string_value": str(v)} for k, v in params.items()}
    build = d.get("build") or {}
    if not isinstance(build, dict):
        raise _fail(src, "build must be a mapping of ember.build options, like {precision: fp16}")
    return out, {str(k): v for k, v in build.items()}
