"""Model configuration: Triton's config.pbtxt and ember's config.yaml, read into one dataclass.

Both go through Triton's `ModelConfig` protobuf message (model_config.proto), as in Triton:

* config.pbtxt is parsed with protobuf's `text_format`, so any config written for Triton parses
  here exactly as there, and a misspelt field is an error naming its line;
* config.yaml is mapped onto the message's JSON form (config_yaml.py) and read with
  `json_format`, as is the JSON `config` of a repository load request.

One function, `config_from_message`, then checks the message and builds the dataclasses the
server runs on, so every front end validates identically; errors name the file and the field.
`ModelConfig.to_message` goes the other way, for the config endpoints (HTTP JSON and gRPC).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from . import model_config_pb2 as mc
from .config_yaml import yaml_to_triton_json
from .datatypes import config_type_name, normalize_datatype
from .errors import RepositoryError
from .safe_files import read_regular_file

MAX_CONFIG_BYTES = 4 << 20  # a config file is a few kB; a bigger one is a mistake (or /dev/zero)
MAX_INSTANCES = 256  # each instance is a thread and an engine's worth of buffers

# Triton features whose semantics ember does not offer: refused so that a model never silently
# behaves differently than it did under Triton
_UNSUPPORTED = {
    "sequence_batching": "the sequence batcher",
    "ensemble_scheduling": "ensembles",
    "batch_input": "batch inputs",
    "batch_output": "batch outputs",
}


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

    def to_message(self, platform: str) -> mc.ModelConfig:
        """This configuration as Triton's ModelConfig (GET .../config, gRPC ModelConfig)."""
        m = mc.ModelConfig(name=self.name, platform=platform, backend="ember", max_batch_size=self.max_batch_size,
                           default_model_filename=self.default_model_filename or "model.engine")
        vp = self.version_policy
        if vp.kind == "all":
            m.version_policy.all.SetInParent()
        elif vp.kind == "specific":
            m.version_policy.specific.versions.extend(vp.versions)
        else:
            m.version_policy.latest.num_versions = vp.num_versions
        for t in self.inputs:
            m.input.add(name=t.name, data_type=config_type_name(t.datatype), dims=t.dims, optional=t.optional)
        for t in self.outputs:
            m.output.add(name=t.name, data_type=config_type_name(t.datatype), dims=t.dims)
        m.instance_group.add(name=f"{self.name}_0", kind="KIND_MODEL", count=self.instance_count)
        for k, v in self.parameters.items():
            m.parameters[k].string_value = v
        for w in self.warmup:
            mw = m.model_warmup.add(name=w.name, batch_size=w.batch_size, count=w.count)
            for k, i in w.inputs.items():
                wi = mw.inputs[k]
                wi.data_type = config_type_name(i.datatype)
                wi.dims.extend(i.dims)
                if i.source == "file":
                    wi.input_data_file = i.file or ""
                else:
                    setattr(wi, f"{i.source}_data", True)
        db = self.dynamic_batching
        if db is not None:
            mdb = m.dynamic_batching
            mdb.SetInParent()
            mdb.preferred_batch_size.extend(db.preferred_batch_sizes)
            mdb.max_queue_delay_microseconds = db.max_queue_delay_us
            mdb.preserve_ordering = db.preserve_ordering
            mdb.priority_levels = db.priority_levels
            mdb.default_priority_level = db.default_priority_level
            _queue_policy_message(db.default_queue_policy, mdb.default_queue_policy)
            for level, p in db.priority_queue_policy.items():
                _queue_policy_message(p, mdb.priority_queue_policy[level])
        return m

    def to_triton_json(self, platform: str) -> dict[str, Any]:
        """The model configuration as Triton's JSON (GET .../config)."""
        return message_json(self.to_message(platform))


def _queue_policy_message(p: QueuePolicy, out: mc.ModelQueuePolicy) -> None:
    out.timeout_action = p.timeout_action
    out.default_timeout_microseconds = p.default_timeout_us
    out.allow_timeout_override = p.allow_timeout_override
    out.max_queue_size = p.max_queue_size


def message_json(msg: Message) -> dict[str, Any]:
    """A message as Triton writes model configurations in JSON: proto field names, default values
    included, 64-bit integers as numbers (proto3 JSON writes them as strings)."""
    try:
        doc = json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 spells the option differently
        doc = json_format.MessageToDict(msg, preserving_proto_field_name=True,  # type: ignore[call-arg]
                                        including_default_value_fields=True)
    return _int64_as_numbers(doc, msg.DESCRIPTOR)


_INT64_TYPES = {3, 4, 6, 16, 18}  # FieldDescriptor TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64


def _int64_as_numbers(doc: Any, desc: Any) -> Any:
    if not isinstance(doc, dict):
        return doc
    for f in desc.fields:
        if f.name not in doc:
            continue
        value = doc[f.name]
        sub = f.message_type
        if sub is not None and sub.GetOptions().map_entry:
            vf = sub.fields_by_name["value"]
            doc[f.name] = {k: (_int64_as_numbers(v, vf.message_type) if vf.message_type is not None
                               else int(v) if vf.type in _INT64_TYPES else v) for k, v in value.items()}
        elif sub is not None:
            doc[f.name] = ([_int64_as_numbers(v, sub) for v in value] if isinstance(value, list)
                           else _int64_as_numbers(value, sub))
        elif f.type in _INT64_TYPES:
            doc[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return doc


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
                data = yaml.safe_load(_read_config(path)) or {}
            except yaml.YAMLError as e:
                raise RepositoryError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(data, dict):
                raise RepositoryError(f"{path}: the top level must be a mapping of settings")
            return config_from_yaml(data, name, str(path))
    path = model_dir / "config.pbtxt"
    if path.is_file():
        return config_from_pbtxt(_read_config(path), name, str(path))
    return ModelConfig(name=name, source=str(model_dir))


def _read_config(path: Path) -> str:
    data = read_regular_file(path, MAX_CONFIG_BYTES, "the model configuration")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RepositoryError(f"{path}: not UTF-8 text ({e})") from None


def config_from_pbtxt(text: str, name: str, src: str) -> ModelConfig:
    """Triton's config.pbtxt (protobuf text format)."""
    msg = mc.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise _fail(src, _text_format_error(e, text)) from None
    return config_from_message(msg, name, src)


def config_from_json(doc: Any, name: str, src: str, build: dict[str, Any] | None = None) -> ModelConfig:
    """Triton's model configuration in JSON (a load request's `config`, or mapped config.yaml)."""
    msg = mc.ModelConfig()
    try:
        json_format.ParseDict(doc, msg)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as e:
        raise _fail(src, _json_format_error(e)) from None
    return config_from_message(msg, name, src, build)


def config_from_yaml(d: dict, name: str, src: str) -> ModelConfig:
    """ember's config.yaml, already loaded into a dict."""
    try:
        doc, build = yaml_to_triton_json(d, src)
    except RepositoryError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError) as e:  # a value of the wrong form deep inside
        raise _fail(src, f"a setting has the wrong form ({type(e).__name__}: {e}); see docs/serve.md for the "
                         "schema") from None
    return config_from_json(doc, name, src, build)


_LOCATION = re.compile(r"^\d+:\d+ : (?:'[^\n]*?': )?")
_BAD_ENUM = re.compile(r'Enum type "inference\.(\w+)" has no value named (\w+)')


def _text_format_error(e: text_format.ParseError, text: str) -> str:
    line, column = e.GetLine(), e.GetColumn()
    what = _LOCATION.sub("", str(e)).rstrip(".")
    bad = _BAD_ENUM.search(what)
    if bad:  # name the allowed values, not just the one that is wrong
        enum = mc.DESCRIPTOR.enum_types_by_name.get(bad.group(1))
        allowed = ", ".join(v.name for v in enum.values) if enum is not None else "see model_config.proto"
        what = f"unknown {bad.group(1).lower()} '{bad.group(2)}'; use one of {allowed}"
    if line is None:
        return what
    lines = text.split("\n")
    offset = sum(len(x) + 1 for x in lines[:line - 1]) + max((column or 1) - 1, 0)
    # protobuf points at the last token it read; nothing after it means the file ended too early
    if len(text[offset:].split()) <= 1 and "got " not in what:
        return f"line {line}: unexpected end of file: {what}"
    return f"line {line}, column {column}: {what}"


def _json_format_error(e: Exception) -> str:
    what = str(e).split("\n Available Fields")[0]
    return what if isinstance(e, json_format.ParseError) else f"not a valid model configuration: {what}"


# ---- checking ------------------------------------------------------------------------------------------


def _fail(src: str, what: str) -> RepositoryError:
    return RepositoryError(f"{src}: {what}")


def _int(v: int, src: str, where: str, minimum: int = 0, maximum: int | None = None) -> int:
    if v < minimum or (maximum is not None and v > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise _fail(src, f"{where} must be an integer {bound}, got {v!r}")
    return int(v)


def _dims(values: Any, src: str, where: str) -> tuple[int, ...]:
    return tuple(_int(d, src, f"{where}[{i}]", minimum=-1) for i, d in enumerate(values))


def _dtype(enum_value: int, src: str, where: str) -> str:
    name = mc.DataType.Name(enum_value)
    if name == "TYPE_INVALID":
        raise _fail(src, f"{where} needs a data_type, like TYPE_FP32")
    try:
        return normalize_datatype(name, where)
    except ValueError as e:
        raise _fail(src, str(e)) from None


def relative_path(value: str, src: str, where: str) -> str:
    """A path a config names inside the model's folder: relative, no '..', no drive. (Where it leads
    after symlinks is checked when it is opened: safe_files.resolve_inside.)"""
    pure = PurePosixPath(value)
    if (not value or "\0" in value or "\\" in value or pure.is_absolute() or ".." in pure.parts
            or PureWindowsPath(value).drive):
        raise _fail(src, f"{where} must be a relative path inside the model's folder, without '..', got {value!r}")
    return value


def _tensor(t: Any, src: str, where: str) -> TensorConfig:
    if not t.name:
        raise _fail(src, f"{where} needs a name")
    if t.HasField("reshape"):
        raise _fail(src, f"{where} ('{t.name}'): reshape is not supported; export the model with the shape you serve")
    if getattr(t, "allow_ragged_batch", False):
        raise _fail(src, f"{where} ('{t.name}'): allow_ragged_batch is not supported; pad inputs to one shape")
    return TensorConfig(t.name, _dtype(t.data_type, src, f"{where} ('{t.name}')"),
                        _dims(t.dims, src, f"{where} ('{t.name}').dims"), bool(getattr(t, "optional", False)))


def _queue_policy(p: mc.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(p.max_queue_size, p.default_timeout_microseconds, p.allow_timeout_override,
                       mc.ModelQueuePolicy.TimeoutAction.Name(p.timeout_action))


def config_from_message(msg: mc.ModelConfig, name: str, src: str, build: dict[str, Any] | None = None) -> ModelConfig:
    """Check Triton's ModelConfig message and turn it into the ModelConfig the server runs on."""
    for key, what in _UNSUPPORTED.items():
        present = len(getattr(msg, key)) > 0 if key.startswith("batch_") else msg.HasField(key)
        if present:
            raise _fail(src, f"{key}: ember serve does not support {what}; remove it to serve this model")
    if msg.model_transaction_policy.decoupled:
        raise _fail(src, "model_transaction_policy.decoupled: ember serve does not support decoupled models")
    if msg.name and msg.name != name:
        raise _fail(src, f"name '{msg.name}' differs from the model directory '{name}'; make them equal")
    cfg = ModelConfig(name=name, source=src, build=dict(build or {}))
    cfg.max_batch_size = _int(msg.max_batch_size, src, "max_batch_size")
    cfg.inputs = [_tensor(t, src, f"input[{i}]") for i, t in enumerate(msg.input)]
    cfg.outputs = [_tensor(t, src, f"output[{i}]") for i, t in enumerate(msg.output)]
    if msg.HasField("dynamic_batching"):
        db = msg.dynamic_batching
        cfg.dynamic_batching = DynamicBatching(
            preferred_batch_sizes=tuple(_int(p, src, "dynamic_batching.preferred_batch_size", 1)
                                        for p in db.preferred_batch_size),
            max_queue_delay_us=db.max_queue_delay_microseconds,
            priority_levels=db.priority_levels,
            default_priority_level=db.default_priority_level,
            default_queue_policy=_queue_policy(db.default_queue_policy),
            priority_queue_policy={_int(k, src, "dynamic_batching.priority_queue_policy key", 1): _queue_policy(v)
                                   for k, v in sorted(db.priority_queue_policy.items())},
            preserve_ordering=db.preserve_ordering,
        )
    # a group's count defaults to 1 in Triton; kind and gpus do not apply (instances run on the engine's device)
    counts = [_int(g.count, src, f"instance_group[{i}].count") or 1 for i, g in enumerate(msg.instance_group)]
    cfg.instance_count = _int(sum(counts) or 1, src, "the total instance count", 1, MAX_INSTANCES)
    which = msg.version_policy.WhichOneof("policy_choice")
    if which == "all":
        cfg.version_policy = VersionPolicy("all")
    elif which == "specific":
        cfg.version_policy = VersionPolicy("specific", versions=tuple(
            _int(v, src, "version_policy.specific.versions", 1) for v in msg.version_policy.specific.versions))
    else:
        cfg.version_policy = VersionPolicy("latest", max(1, msg.version_policy.latest.num_versions))
    for i, w in enumerate(msg.model_warmup):
        inputs = {}
        for k, spec in sorted(w.inputs.items()):
            at = f"model_warmup[{i}].inputs['{k}']"
            which = spec.WhichOneof("input_data_type")
            source = {"random_data": "random", "input_data_file": "file"}.get(which, "zero")
            file = relative_path(spec.input_data_file, src, f"{at}.input_data_file") if source == "file" else None
            inputs[k] = WarmupInput(_dtype(spec.data_type, src, at), _dims(spec.dims, src, f"{at}.dims"), source, file)
        cfg.warmup.append(Warmup(w.name or f"warmup_{i}", max(1, w.batch_size), inputs, max(1, w.count)))
    if msg.default_model_filename:
        cfg.default_model_filename = relative_path(msg.default_model_filename, src, "default_model_filename")
    cfg.parameters = {k: v.string_value for k, v in sorted(msg.parameters.items())}
    validate_config(cfg)
    return cfg


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
