"""Model configuration: config.yaml, Triton's config.pbtxt, and their error messages."""
from __future__ import annotations

from pathlib import Path

import pytest

from ember.serve.config import VersionPolicy, config_from_yaml, load_model_config
from ember.serve.errors import RepositoryError
from ember.serve.pbtxt import PbtxtError, parse_pbtxt

# A config.pbtxt as Triton users write them, with fields ember ignores (optimization, parameters).
TRITON_PBTXT = r'''
# a comment
name: "resnet"
platform: "tensorrt_plan"
max_batch_size: 32
input [
  {
    name: "input__0"
    data_type: TYPE_FP16
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [
  { name: "logits", data_type: TYPE_FP32, dims: [ 1000 ] }
]
instance_group [ { count: 2, kind: KIND_GPU, gpus: [ 0 ] }, { count: 1 kind: KIND_GPU } ]
dynamic_batching {
  preferred_batch_size: [ 8, 16 ]
  max_queue_delay_microseconds: 250
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 100 default_timeout_microseconds: 5000 allow_timeout_override: true }
  priority_queue_policy { key: 1 value: { max_queue_size: 10 timeout_action: DELAY } }
}
version_policy: { specific: { versions: [ 1, 3 ] } }
optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" } ] } }
parameters { key: "note" value: { string_value: "a \"quoted\" value" } }
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    inputs { key: "input__0" value: { data_type: TYPE_FP16 dims: [ 3, 224, 224 ] zero_data: true } }
  }
]
'''


def test_triton_pbtxt_moves_over(tmp_path: Path):
    d = tmp_path / "resnet"
    d.mkdir()
    (d / "config.pbtxt").write_text(TRITON_PBTXT)
    cfg = load_model_config(d)
    assert cfg.name == "resnet" and cfg.max_batch_size == 32
    assert [(t.name, t.datatype, t.dims) for t in cfg.inputs] == [("input__0", "FP16", (3, 224, 224))]
    assert [(t.name, t.datatype, t.dims) for t in cfg.outputs] == [("logits", "FP32", (1000,))]
    assert cfg.instance_count == 3
    db = cfg.dynamic_batching
    assert db.preferred_batch_sizes == (8, 16) and db.max_queue_delay_us == 250
    assert db.priority_levels == 2 and db.default_priority_level == 2
    assert db.default_queue_policy.max_queue_size == 100 and db.default_queue_policy.default_timeout_us == 5000
    assert db.priority_queue_policy[1].max_queue_size == 10 and db.priority_queue_policy[1].timeout_action == "DELAY"
    assert cfg.version_policy == VersionPolicy("specific", versions=(1, 3))
    assert cfg.version_policy.select([1, 2, 3, 4]) == [1, 3]
    assert cfg.parameters == {"note": 'a "quoted" value'}
    w = cfg.warmup[0]
    assert (w.name, w.batch_size, w.inputs["input__0"].datatype, w.inputs["input__0"].source) == \
        ("zeros", 4, "FP16", "zero")
    js = cfg.to_triton_json("ember_engine")
    assert js["input"][0]["data_type"] == "TYPE_FP16" and js["dynamic_batching"]["preferred_batch_size"] == [8, 16]


def test_yaml_config_full(tmp_path: Path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.yaml").write_text("""
max_batch_size: 8
inputs: [{name: x, dtype: float32, shape: [4]}]
outputs: [{name: y, datatype: FP32, dims: [4]}]
dynamic_batching:
  preferred_batch_sizes: [4, 8]
  max_queue_delay_ms: 1.5
  max_queue_size: 10
  default_timeout_ms: 20
  priority_levels: 3
  default_priority_level: 2
instance_count: 2
version_policy: {latest: 2}
warmup:
  - {name: w, batch_size: 2, count: 3, inputs: {x: {dtype: float32, shape: [4], data: random}}}
""")
    cfg = load_model_config(d)
    assert cfg.max_batch_size == 8 and cfg.instance_count == 2
    assert cfg.dynamic_batching.max_queue_delay_us == 1500
    assert cfg.dynamic_batching.default_queue_policy.default_timeout_us == 20_000
    assert cfg.version_policy.select([1, 2, 5]) == [2, 5]
    assert cfg.warmup[0].count == 3 and cfg.warmup[0].inputs["x"].source == "random"


def test_missing_config_defaults(tmp_path: Path):
    d = tmp_path / "bare"
    d.mkdir()
    cfg = load_model_config(d)
    assert cfg.name == "bare" and cfg.max_batch_size == 0 and cfg.dynamic_batching is None
    assert cfg.version_policy.select([3, 1, 2]) == [3]


@pytest.mark.parametrize("text,message", [
    ("max_batch: 8", "unknown key(s) ['max_batch']"),
    ("max_batch_size: -1", "max_batch_size must be an integer >= 0"),
    ("max_batch_size: 4\ndynamic_batching: {preferred_batch_sizes: [8]}", "exceed max_batch_size 4"),
    ("inputs: [{name: x, dtype: float33, shape: [1]}]", "unknown datatype 'float33'"),
    ("inputs: [{name: x, dtype: float32}]", "needs a shape"),
    ("inputs: [{name: x, dtype: float32, shape: [1]}, {name: x, dtype: float32, shape: [1]}]", "duplicate name"),
    ("version_policy: newest", "version_policy must be"),
    ("dynamic_batching: {priority_levels: 2, default_priority_level: 3}", "default_priority_level 3 must be in 1..2"),
    ("dynamic_batching: {timeout_action: drop}", "timeout_action must be reject or delay"),
    ("name: other", "differs from the model directory"),
    ("[1, 2]", "top level must be a mapping"),
    ("max_batch_size: [", "not valid YAML"),
    ("warmup: [{name: w, inputs: {x: {dtype: float32, shape: [1], data: ones}}}]", "must be zero or random"),
])
def test_yaml_errors_name_the_problem_and_file(tmp_path: Path, text: str, message: str):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.yaml").write_text(text)
    with pytest.raises(RepositoryError) as e:
        load_model_config(d)
    assert message in str(e.value) and "config.yaml" in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("sequence_batching { }", "does not support the sequence batcher"),
    ("ensemble_scheduling { step [ ] }", "does not support ensembles"),
    ('input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] reshape: { shape: [ 2, 2 ] } } ]', "reshape"),
    ('input [ { name: "x" data_type: TYPE_WHAT dims: [ 4 ] } ]', "unknown datatype 'TYPE_WHAT'"),
    ('max_batch_size: 8\ninput [ { name: "x" ', "line 2: unexpected end of file"),
    ("max_batch_size: 8 $", "line 1: unexpected character '$'"),
])
def test_pbtxt_errors(tmp_path: Path, text: str, message: str):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.pbtxt").write_text(text)
    with pytest.raises(RepositoryError, match=None) as e:
        load_model_config(d)
    assert message in str(e.value)


def test_pbtxt_parser_forms():
    msg = parse_pbtxt('a: 1 a: 2 b { c: "x" "y" } d [ 1.5, -2, 0x10 ] e: true f < g: ENUM_V >; h: [ { i: 1 } ]')
    assert msg["a"] == [1, 2]
    assert msg["b"] == [{"c": ["xy"]}]
    assert msg["d"] == [1.5, -2, 16]
    assert msg["e"] == [True] and msg["f"] == [{"g": ["ENUM_V"]}] and msg["h"] == [{"i": [1]}]
    with pytest.raises(PbtxtError, match="expected a field name"):
        parse_pbtxt("{ a: 1 }")


def test_yaml_direct_dict():
    cfg = config_from_yaml({"max_batch_size": 4, "dynamic_batching": True}, "m", "test")
    assert cfg.dynamic_batching is not None and cfg.dynamic_batching.max_queue_delay_us == 0
