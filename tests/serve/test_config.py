"""Model configuration: config.yaml, Triton's config.pbtxt, and their error messages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.serve.config import VersionPolicy, config_from_yaml, load_model_config
from ember.serve.errors import RepositoryError

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
    ("max_batch_size: 8 $", "line 1, column 19: Expected identifier or number, got $"),
])
def test_pbtxt_errors(tmp_path: Path, text: str, message: str):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.pbtxt").write_text(text)
    with pytest.raises(RepositoryError, match=None) as e:
        load_model_config(d)
    assert message in str(e.value)


def test_pbtxt_text_format_forms(tmp_path: Path):
    """config.pbtxt is protobuf text format, read by protobuf: repeated fields written one by one or
    as lists, adjacent strings, <> delimiters, ; and , separators, hex numbers, comments."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.pbtxt").write_text(
        'name: "m" "" # the model\nmax_batch_size: 0x10; parameters { key: "a" value { string_value: "x" "y" } }\n'
        'input < name: "x"; data_type: TYPE_FP32, dims: [ 4 ] > input [ { name: "y" data_type: TYPE_INT64 dims: 2 '
        'dims: 3 } ]\ndynamic_batching { preferred_batch_size: 4 preferred_batch_size: [ 8 ] }')
    cfg = load_model_config(d)
    assert cfg.max_batch_size == 16 and cfg.parameters == {"a": "xy"}
    assert [(t.name, t.datatype, t.dims) for t in cfg.inputs] == [("x", "FP32", (4,)), ("y", "INT64", (2, 3))]
    assert cfg.dynamic_batching.preferred_batch_sizes == (4, 8)
    (d / "config.pbtxt").write_text("max_batch_size: 8\ndynamic_batchng { }\n")  # a typo is an error, as in Triton
    with pytest.raises(RepositoryError, match=r'config.pbtxt: line 2, column 1: .*no field named "dynamic_batchng"'):
        load_model_config(d)


def test_yaml_direct_dict():
    cfg = config_from_yaml({"max_batch_size": 4, "dynamic_batching": True}, "m", "test")
    assert cfg.dynamic_batching is not None and cfg.dynamic_batching.max_queue_delay_us == 0


# The same mistake written in config.yaml, config.pbtxt and a load request's JSON gets the same
# message: all three are parsed into Triton's ModelConfig message and checked by one function.
SAME_MISTAKE = [
    ("max_batch_size: -1", "max_batch_size: -1", {"max_batch_size": -1}, "max_batch_size must be an integer >= 0"),
    ("max_batch_size: 4\ndynamic_batching: {preferred_batch_sizes: [8]}",
     "max_batch_size: 4 dynamic_batching { preferred_batch_size: 8 }",
     {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_size": [8]}}, "exceed max_batch_size 4"),
    ("inputs: [{name: x, dtype: float32, shape: [-2]}]", 'input { name: "x" data_type: TYPE_FP32 dims: -2 }',
     {"input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-2]}]},
     "input[0] ('x').dims[0] must be an integer >= -1"),
    ("default_model_filename: /etc/passwd", 'default_model_filename: "/etc/passwd"',
     {"default_model_filename": "/etc/passwd"}, "default_model_filename must be a relative path inside"),
    ("warmup: [{name: w, inputs: {x: {dtype: float32, shape: [4], file: ../../secret}}}]",
     'model_warmup { name: "w" inputs { key: "x" value { data_type: TYPE_FP32 dims: 4 '
     'input_data_file: "../../secret" } } }',
     {"model_warmup": [{"name": "w", "inputs": {"x": {"data_type": "TYPE_FP32", "dims": [4],
                                                       "input_data_file": "../../secret"}}}]},
     "model_warmup[0].inputs['x'].input_data_file must be a relative path inside"),
    ("instance_count: 100000", "instance_group { count: 100000 }", {"instance_group": [{"count": 100000}]},
     "the total instance count must be an integer in 1..256"),
    ("dynamic_batching: {priority_levels: 2, default_priority_level: 3}",
     "dynamic_batching { priority_levels: 2 default_priority_level: 3 }",
     {"dynamic_batching": {"priority_levels": 2, "default_priority_level": 3}},
     "default_priority_level 3 must be in 1..2"),
]


@pytest.mark.parametrize("yaml_text,pbtxt_text,json_doc,message", SAME_MISTAKE)
def test_yaml_pbtxt_and_json_validate_identically(tmp_path: Path, yaml_text, pbtxt_text, json_doc, message):
    from ember.serve.core import load_request_config
    from ember.serve.errors import BadRequestError

    errors = []
    for fname, text in (("config.yaml", yaml_text), ("config.pbtxt", pbtxt_text)):
        d = tmp_path / fname.replace(".", "_") / "m"
        d.mkdir(parents=True)
        (d / fname).write_text(text)
        with pytest.raises(RepositoryError) as e:
            load_model_config(d)
        assert str(e.value).startswith(f"{d / fname}: ")
        errors.append(str(e.value).split(": ", 1)[1])
    with pytest.raises(BadRequestError) as e:
        load_request_config(json.dumps(json_doc), "m")
    assert str(e.value).startswith("load request config for 'm': ")
    errors.append(str(e.value).split(": ", 1)[1])
    assert message in errors[0]
    assert errors[0] == errors[1] == errors[2]


def test_config_json_round_trips_through_the_message(tmp_path: Path):
    """GET .../config returns Triton's JSON; loading that JSON back gives the same configuration."""
    from ember.serve.core import load_request_config

    d = tmp_path / "resnet"
    d.mkdir()
    (d / "config.pbtxt").write_text(TRITON_PBTXT)
    cfg = load_model_config(d)
    doc = cfg.to_triton_json("ember_engine")
    assert doc["max_batch_size"] == 32 and doc["input"][0]["dims"] == [3, 224, 224]  # numbers, not strings
    assert doc["dynamic_batching"]["default_queue_policy"]["default_timeout_microseconds"] == 5000
    again = load_request_config(json.dumps(doc), "resnet")
    for attr in ("max_batch_size", "inputs", "outputs", "dynamic_batching", "instance_count", "version_policy",
                 "warmup", "parameters"):
        assert getattr(again, attr) == getattr(cfg, attr), attr
