"""Fixtures for the serve tests: tiny ONNX models built into real ember engines, model
repositories, and servers on free loopback ports that stop themselves."""
from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

# The serve tests need the [serve] extra; without it they are not collected (rather than failing).
_MISSING = [m for m in ("onnx", "starlette", "uvicorn", "grpc", "prometheus_client", "yaml", "httpx")
            if importlib.util.find_spec(m) is None]
if _MISSING:
    collect_ignore_glob = ["test_*.py"]
else:
    import onnx
    from onnx import TensorProto, helper, numpy_helper


def _save(graph: "onnx.GraphProto", path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def make_affine_onnx(path: Path) -> Path:
    """y = x * 2 + 1, x: float32[batch, 4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    consts = [numpy_helper.from_array(np.array(2, np.float32), "two"),
              numpy_helper.from_array(np.array(1, np.float32), "one")]
    nodes = [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])]
    return _save(helper.make_graph(nodes, "affine", [x], [y], consts), path)


def make_addsub_onnx(path: Path) -> Path:
    """sum = a + b, diff = a - b; a, b: float32[batch, 3]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])
    s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3])
    d = helper.make_tensor_value_info("diff", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])]
    return _save(helper.make_graph(nodes, "addsub", [a, b], [s, d]), path)


def make_scale_int_onnx(path: Path) -> Path:
    """out = idx * 3, idx: int64[batch, 2]."""
    i = helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 2])
    o = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", 2])
    three = numpy_helper.from_array(np.array(3, np.int64), "three")
    return _save(helper.make_graph([helper.make_node("Mul", ["idx", "three"], ["out"])], "scale", [i], [o], [three]),
                 path)


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real ember engines, built once per session: {'affine', 'addsub', 'scale'} -> model.engine path."""
    import ember

    d = tmp_path_factory.mktemp("engines")
    out = {}
    for name, make in (("affine", make_affine_onnx), ("addsub", make_addsub_onnx), ("scale", make_scale_int_onnx)):
        onnx_path = make(d / f"{name}.onnx")
        engine_path = d / f"{name}.engine"
        ember.build(str(onnx_path)).save(str(engine_path))
        out[name] = engine_path
    return out


class RepoBuilder:
    """Writes a model repository: add(model, engine, config text, versions)."""

    def __init__(self, root: Path, engines: dict[str, Path]):
        self.root = root
        self.engines = engines
        root.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, engine: str, config: str | None = None, versions: tuple[int, ...] = (1,),
            config_name: str = "config.yaml", onnx: bool = False) -> Path:
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (model_dir / config_name).write_text(config)
        for v in versions:
            self.add_version(name, engine, v, onnx=onnx)
        return model_dir

    def add_version(self, name: str, engine: str, version: int, onnx: bool = False) -> Path:
        vdir = self.root / name / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        src = self.engines[engine]
        if onnx:
            shutil.copy(src.with_suffix(".onnx"), vdir / "model.onnx")
        else:
            shutil.copy(src, vdir / "model.engine")
        return vdir


@pytest.fixture
def repo_builder(tmp_path: Path, engines: dict[str, Path]) -> RepoBuilder:
    return RepoBuilder(tmp_path / "repo", engines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AFFINE_CONFIG = """
max_batch_size: 8
dynamic_batching:
  max_queue_delay_us: 500
instance_count: 2
"""

BATCHING_CONFIG = """
max_batch_size: 16
dynamic_batching:
  max_queue_delay_ms: 100
instance_count: 1
"""

ADDSUB_CONFIG = """
max_batch_size: 4
inputs:
  - {name: a, dtype: float32, shape: [3]}
  - {name: b, dtype: FP32, shape: [3]}
outputs:
  - {name: sum, dtype: float32, shape: [3]}
  - {name: diff, dtype: float32, shape: [3]}
dynamic_batching: {max_queue_delay_us: 200}
warmup:
  - name: zeros
    batch_size: 2
    inputs: {a: {dtype: float32, shape: [3]}, b: {dtype: float32, shape: [3], data: random}}
"""

NOBATCH_CONFIG = """
max_batch_size: 0
"""

PBTXT_CONFIG = """
name: "triton_affine"
platform: "tensorrt_plan"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_GPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 1000
  default_queue_policy { max_queue_size: 32 }
}
version_policy: { latest: { num_versions: 2 } }
model_warmup [
  { name: "w" batch_size: 2 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } }
]
"""


@pytest.fixture(scope="module")
def standard_repo(tmp_path_factory: pytest.TempPathFactory, engines: dict[str, Path]) -> Path:
    """The repository most server tests share."""
    rb = RepoBuilder(tmp_path_factory.mktemp("std") / "repo", engines)
    rb.add("affine", "affine", AFFINE_CONFIG)
    rb.add("batching", "affine", BATCHING_CONFIG)
    rb.add("addsub", "addsub", ADDSUB_CONFIG)
    rb.add("nobatch", "affine", NOBATCH_CONFIG)
    rb.add("scale", "scale", "max_batch_size: 8\ndynamic_batching: true\n")
    rb.add("triton_affine", "affine", PBTXT_CONFIG, versions=(1, 2, 3), config_name="config.pbtxt")
    return rb.root


@pytest.fixture(scope="module")
def server(standard_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server on free loopback ports over the standard repository (explicit model control)."""
    from ember.serve import ServerSettings, ServerThread

    settings = ServerSettings(standard_repo, host="127.0.0.1", http_port=0, grpc_port=0,
                              model_control_mode="explicit", cache_dir=tmp_path_factory.mktemp("cache"),
                              max_request_size=1 << 20, gpu_metrics=False)
    with ServerThread(settings) as srv:
        yield srv


def start_server(repo: Path, **kw) -> "object":
    from ember.serve import ServerSettings, ServerThread

    kw.setdefault("gpu_metrics", False)
    settings = ServerSettings(repo, host="127.0.0.1", http_port=kw.pop("http_port", 0),
                              grpc_port=kw.pop("grpc_port", 0), **kw)
    return ServerThread(settings).start()


@pytest.fixture
def make_server() -> Callable:
    started = []

    def make(repo: Path, **kw):
        srv = start_server(repo, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()

