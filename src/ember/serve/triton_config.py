"""Triton's config.pbtxt (and the JSON form of a load request's `config`) read into ModelConfig.

Fields ember uses are read; fields that do not change serving semantics are ignored; fields whose
semantics ember does not offer are errors naming the field.
"""
from __future__ import annotations

from typing import Any

from .config import (DynamicBatching, ModelConfig, QueuePolicy, TensorConfig, VersionPolicy, Warmup, WarmupInput,
                     _dims, _dtype, _fail, _guarded, _int, validate_config)
from .pbtxt import PbMessage

_UNSUPPORTED_PBTXT = {
    "sequence_batching": "the sequence batcher",
    "ensemble_scheduling": "ensembles",
    "batch_input": "batch inputs",
    "batch_output": "batch outputs",
}


def _one(msg: PbMessage, key: str, default: Any = None) -> Any:
    vals = msg.get(key)
    return vals[-1] if vals else default


def _pb_tensor(m: PbMessage, src: str, where: str) -> TensorConfig:
    name = _one(m, "name")
    if not isinstance(name, str) or not name:
        raise _fail(src, f"{where} needs a name")
    dims = m.get("dims", [])
    if _one(m, "reshape") is not None:
        raise _fail(src, f"{where} ('{name}'): reshape is not supported; export the model with the shape you serve")
    return TensorConfig(name, _dtype(_one(m, "data_type", "TYPE_INVALID"), src, f"{where} ('{name}')"),
                        _dims(dims, src, f"{where} ('{name}').dims"), bool(_one(m, "optional", False)))


def _pb_queue_policy(m: PbMessage | None, src: str, where: str) -> QueuePolicy:
    if not m:
        return QueuePolicy()
    action = str(_one(m, "timeout_action", "REJECT")).upper()
    if action not in ("REJECT", "DELAY"):
        raise _fail(src, f"{where}.timeout_action must be REJECT or DELAY")
    return QueuePolicy(_int(_one(m, "max_queue_size", 0), src, f"{where}.max_queue_size"),
                       _int(_one(m, "default_timeout_microseconds", 0), src, f"{where}.default_timeout_microseconds"),
                       bool(_one(m, "allow_timeout_override", False)), action)


@_guarded
def config_from_pbtxt(msg: PbMessage, name: str, src: str) -> ModelConfig:
    for key, what in _UNSUPPORTED_PBTXT.items():
        if key in msg:
            raise _fail(src, f"{key}: ember serve does not support {what}; remove it to serve this model")
    pb_name = _one(msg, "name")
    if pb_name is not None and pb_name != name:
        raise _fail(src, f"name '{pb_name}' differs from the model directory '{name}'; make them equal")
    cfg = ModelConfig(name=name, source=src)
    cfg.max_batch_size = _int(_one(msg, "max_batch_size", 0), src, "max_batch_size")
    cfg.inputs = [_pb_tensor(m, src, f"input[{i}]") for i, m in enumerate(msg.get("input", []))]
    cfg.outputs = [_pb_tensor(m, src, f"output[{i}]") for i, m in enumerate(msg.get("output", []))]
    db = _one(msg, "dynamic_batching")
    if db is not None:
        ppol = {}
        for entry in db.get("priority_queue_policy", []):
            level = _int(_one(entry, "key", 0), src, "priority_queue_policy.key", 1)
            ppol[level] = _pb_queue_policy(_one(entry, "value"), src, f"priority_queue_policy[{level}]")
        cfg.dynamic_batching = DynamicBatching(
            preferred_batch_sizes=tuple(_int(p, src, "preferred_batch_size", 1)
                                        for p in db.get("preferred_batch_size", [])),
            max_queue_delay_us=_int(_one(db, "max_queue_delay_microseconds", 0), src, "max_queue_delay_microseconds"),
            priority_levels=_int(_one(db, "priority_levels", 0), src, "priority_levels"),
            default_priority_level=_int(_one(db, "default_priority_level", 0), src, "default_priority_level"),
            default_queue_policy=_pb_queue_policy(_one(db, "default_queue_policy"), src, "default_queue_policy"),
            priority_queue_policy=ppol,
            preserve_ordering=bool(_one(db, "preserve_ordering", False)),
        )
    groups = msg.get("instance_group", [])
    cfg.instance_count = sum(_int(_one(g, "count", 1), src, "instance_group.count", 1) for g in groups) or 1
    vp = _one(msg, "version_policy")
    if vp is None or "latest" in vp:
        n = _one(_one(vp or {}, "latest", {}) or {}, "num_versions", 1)
        cfg.version_policy = VersionPolicy("latest", _int(n, src, "version_policy.latest.num_versions", 1))
    elif "all" in vp:
        cfg.version_policy = VersionPolicy("all")
    elif "specific" in vp:
        vs = (_one(vp, "specific") or {}).get("versions", [])
        versions = tuple(_int(v, src, "version_policy.specific", 1) for v in vs)
        cfg.version_policy = VersionPolicy("specific", versions=versions)
    for i, w in enumerate(msg.get("model_warmup", [])):
        inputs = {}
        for entry in w.get("inputs", []):
            k, spec = _one(entry, "key"), _one(entry, "value") or {}
            source = ("random" if _one(spec, "random_data") else "file" if _one(spec, "input_data_file") else "zero")
            inputs[str(k)] = WarmupInput(_dtype(_one(spec, "data_type", "TYPE_INVALID"), src, f"model_warmup[{i}].{k}"),
                                         _dims(spec.get("dims", []), src, f"model_warmup[{i}].{k}.dims"), source,
                                         _one(spec, "input_data_file"))
        cfg.warmup.append(Warmup(str(_one(w, "name", f"warmup_{i}")), _int(_one(w, "batch_size", 1), src, "batch_size"),
                                 inputs, max(1, _int(_one(w, "count", 1), src, "count"))))
    cfg.default_model_filename = _one(msg, "default_model_filename")
    cfg.parameters = {str(_one(p, "key")): str(_one(_one(p, "value") or {}, "string_value", ""))
                      for p in msg.get("parameters", [])}
    validate_config(cfg)
    return cfg
