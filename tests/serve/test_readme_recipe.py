"""The README's serving recipe, run as written, and what it relies on: a version folder's model
file under any name, and `ember perf` taking shapes from the model's config or warm-up."""
from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from ember.cli.main import cli
from ember.serve.engine import find_model_file
from ember.serve.errors import RepositoryError
from ember.serve.perf import PerfError, PerfTarget, request_shape

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--duration", "0.3", "--warmup", "0.1", "--concurrency-range", "1:2:1"]  # click keeps the last value


def readme_serving_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serving"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Serving section lost its bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def setup_as_readme_says(workdir: Path, lines: list[str]) -> None:
    """Run the README's file commands (mkdir, cp, printf...) in ``workdir``, beside the examples."""
    (workdir / "examples").symlink_to(ROOT / "examples")
    for line in lines:
        if not line.startswith("ember "):
            subprocess.run(["bash", "-c", line], cwd=workdir, check=True)


def infer(port: int, model: str, images: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                        "data": images.reshape(-1).tolist()}]}
    r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    return np.asarray(out["digit"]["data"]).reshape(out["digit"]["shape"])


def test_readme_serving_recipe_as_written(tmp_path, make_server):
    lines = readme_serving_block()
    serve = next(line for line in lines if line.startswith("ember serve "))
    perf = next(line for line in lines if line.startswith("ember perf "))
    setup_as_readme_says(tmp_path, lines)
    repo = tmp_path / serve.split()[2].rstrip("/")
    model = perf.split()[2]
    assert [p.name for p in (repo / model / "1").iterdir()] == ["digits_cnn.onnx"]  # the example's own name
    srv = make_server(repo, cache_dir=tmp_path / "cache")
    samples = np.load(ROOT / "examples" / "digits" / "samples.npz")
    assert (infer(srv.http_port, model, samples["image"]) == samples["label"]).mean() >= 15 / 16
    args = perf.split()[1:] + ["-u", f"127.0.0.1:{srv.http_port}"] + QUICK
    args = [a if a != "perf.csv" else str(tmp_path / "perf.csv") for a in args]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output + str(r.exception)
    rows = list(csv.DictReader(open(tmp_path / "perf.csv")))
    assert [row["concurrency"] for row in rows] == ["1", "2"]
    assert all(int(row["requests"]) > 0 and int(row["failures"]) == 0 for row in rows)


def test_recipe_without_the_optional_config(tmp_path, make_server):
    """No config: the model serves, and perf names the input and a --shape of its rank."""
    lines = [line for line in readme_serving_block() if "config" not in line]
    setup_as_readme_says(tmp_path, lines)
    srv = make_server(tmp_path / "models", cache_dir=tmp_path / "cache")
    samples = np.load(ROOT / "examples" / "digits" / "samples.npz")
    assert (infer(srv.http_port, "digits", samples["image"][:3]) == samples["label"][:3]).mean() >= 2 / 3
    url = ["-u", f"127.0.0.1:{srv.http_port}"]
    r = CliRunner().invoke(cli, ["perf", "digits", *url, *QUICK])
    assert r.exit_code != 0
    message = str(r.exception)
    assert "input 'image' has variable dims [-1, 1, 8, 8]" in message and "--shape image:1,1,8,8" in message
    r = CliRunner().invoke(cli, ["perf", "digits", *url, *QUICK, "--shape", "image:4,1,8,8"])
    assert r.exit_code == 0, r.output + str(r.exception)


# -- the version folder's model file ------------------------------------------------------------------------
def test_find_model_file_names(tmp_path):
    v = tmp_path / "1"
    v.mkdir()
    with pytest.raises(RepositoryError, match=r"no model file \(found: nothing\)"):
        find_model_file(v, None)
    (v / "notes.txt").write_text("x")
    (v / ".digits.onnx.swp").write_text("x")  # hidden files are not candidates
    with pytest.raises(RepositoryError, match=r"found: notes.txt\)"):
        find_model_file(v, None)
    (v / "digits_cnn.onnx").write_bytes(b"onnx")
    assert find_model_file(v, None) == v / "digits_cnn.onnx"
    (v / "digits.engine").write_bytes(b"engine")
    with pytest.raises(RepositoryError) as e:
        find_model_file(v, None)
    assert "digits.engine, digits_cnn.onnx" in str(e.value) and "default_model_filename" in str(e.value)
    assert find_model_file(v, "digits.engine") == v / "digits.engine"  # the config decides
    (v / "model.onnx").write_bytes(b"onnx")
    assert find_model_file(v, None) == v / "model.onnx"
    (v / "model.engine").write_bytes(b"engine")
    assert find_model_file(v, None) == v / "model.engine"


def test_two_model_files_fail_the_load_with_what_to_do(tmp_path, make_server):
    v = tmp_path / "models" / "digits" / "1"
    v.mkdir(parents=True)
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(ROOT / "examples" / "digits" / "digits_cnn.onnx", v / name)
    from ember.serve import ServerSettings, ServerThread

    settings = ServerSettings(tmp_path / "models", host="127.0.0.1", http_port=0, grpc_port=0, gpu_metrics=False,
                              cache_dir=tmp_path / "cache")
    with pytest.raises(Exception, match=r"2 model files \(a.onnx, b.onnx\)"):
        ServerThread(settings).start().stop()


# -- perf's shapes: the config, then the warm-up, then --shape ------------------------------------------------
def seq_model(path: Path) -> Path:
    """y = x * 2, x: float32[batch, n]: a variable dim besides the batch dim."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    m = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "seq", [x], [y], [two]),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_takes_variable_dims_from_the_warmup(tmp_path, make_server, protocol):
    v = tmp_path / "models" / "seq" / "1"
    v.mkdir(parents=True)
    seq_model(v / "seq.onnx")
    (v.parent / "config.yaml").write_text(
        "max_batch_size: 4\nwarmup:\n  - {name: w, batch_size: 2, inputs: {x: {dtype: float32, shape: [6]}}}\n")
    srv = make_server(tmp_path / "models", cache_dir=tmp_path / "cache")
    port = srv.http_port if protocol == "http" else srv.grpc_port
    r = CliRunner().invoke(cli, ["perf", "seq", "-u", f"127.0.0.1:{port}", "-i", protocol, "-b", "3", *QUICK])
    assert r.exit_code == 0, r.output + str(r.exception)
    from ember.serve.perf import fetch_metadata, make_inputs

    target = PerfTarget(f"127.0.0.1:{port}", "seq", protocol=protocol, batch_size=3)
    meta, config = fetch_metadata(target)
    assert make_inputs(target, meta, config)["x"][1].shape == (3, 6)


def test_request_shape_rules():
    t = PerfTarget("127.0.0.1:1", "m", batch_size=2)
    x = {"name": "x", "shape": [-1, -1, 8]}
    batched = {"max_batch_size": 8, "input": [{"name": "x", "dims": [-1, 8]}]}
    with pytest.raises(PerfError, match=r"--shape x:2,1,8 \(the whole request shape, or without the batch dim\)"):
        request_shape(t, x, batched)
    assert request_shape(t, x, {**batched, "input": [{"name": "x", "dims": ["5", "8"]}]}) == [2, 5, 8]
    assert request_shape(t, x, {**batched, "model_warmup": [{"inputs": {"x": {"dims": [7, 8]}}}]}) == [2, 7, 8]
    t.shapes = {"x": [9, 8]}  # without the batch dim, as perf_analyzer takes it
    assert request_shape(t, x, batched) == [2, 9, 8]
    t.shapes = {"x": [1, 9, 8]}  # the whole request
    assert request_shape(t, x, batched) == [1, 9, 8]
    t.shapes = {"x": [9]}
    with pytest.raises(PerfError, match="has 1 dims; input 'x' has 3"):
        request_shape(t, x, batched)
    t.shapes = {}
    with pytest.raises(PerfError, match=r"--shape x:1,1,8 \(the whole request shape\)"):
        request_shape(t, x, {"max_batch_size": 0})
