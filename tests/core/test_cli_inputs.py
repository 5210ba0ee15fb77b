"""--input files for `ember run`, `bench` and `compare`: a bare .npy, .npz keys that match no input,
and the command line around them (tables in full off a terminal, `python -m ember`)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ember.cli.common import read_inputs
from ember.cli.main import main
from ember.errors import InputError

from .helpers import save

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits")
FAST_BENCH = ["--warmup", "0", "--duration", "0", "--iterations", "1"]


def two_input_model() -> onnx.ModelProto:
    """out = a * b + a, with a and b float32[batch, 3]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "a"], ["out"])]
    return helper.make_model(helper.make_graph(nodes, "two", [a, b], [out]),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def digits_files(tmp_path):
    z = np.load(os.path.join(DIGITS, "samples.npz"))
    files = {"model": os.path.join(DIGITS, "digits_cnn.onnx"), "samples": os.path.join(DIGITS, "samples.npz"),
             "npy": str(tmp_path / "images.npy"), "typo": str(tmp_path / "typo.npz"), "image": z["image"],
             "label": z["label"]}
    np.save(files["npy"], z["image"])
    np.savez(files["typo"], imgae=z["image"], label=z["label"])  # 'image' mistyped
    return files


def _run_outputs(tmp_path, args: list[str]) -> dict[str, np.ndarray]:
    out = str(tmp_path / "out.npz")
    assert main(["run", *args, "--save", out]) == 0
    return dict(np.load(out))


# -- a bare .npy ---------------------------------------------------------------------------------------
def test_bare_npy_binds_the_only_input_of_run(tmp_path, digits_files):
    got = _run_outputs(tmp_path, [digits_files["model"], "--input", digits_files["npy"]])
    ref = ort.InferenceSession(digits_files["model"], providers=["CPUExecutionProvider"])
    ref_logits, ref_digit = ref.run(None, {"image": digits_files["image"]})
    np.testing.assert_array_equal(got["digit"], ref_digit)
    assert np.linalg.norm(got["logits"] - ref_logits) / np.linalg.norm(ref_logits) < 1e-5


def test_bare_npy_in_bench_and_compare(tmp_path, digits_files, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", digits_files["model"], "--input", digits_files["npy"], *FAST_BENCH,
                 "--export-json", str(report)]) == 0
    import json

    assert json.loads(report.read_text())["inputs"]["image"]["shape"] == [16, 1, 8, 8]  # the file, not random
    assert main(["compare", digits_files["model"], "--input", digits_files["npy"], "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["inputs"]["image"] == [16, 1, 8, 8]


@pytest.mark.parametrize("command", ["run", "bench", "compare"])
def test_bare_npy_for_a_model_of_two_inputs_names_them(tmp_path, capsys, command):
    model = save(two_input_model(), tmp_path / "two.onnx")
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    extra = FAST_BENCH if command == "bench" else []
    assert main([command, model, "--input", str(tmp_path / "a.npy"), *extra]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "a: float32[batch,3]" in err and "b: float32[batch,3]" in err
    assert f"--input a={tmp_path / 'a.npy'}" in err  # the NAME=FILE.npy form, spelled out


# -- .npz keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "bench", "compare"])
def test_mistyped_npz_key_is_an_error_naming_both_names(digits_files, capsys, command):
    extra = FAST_BENCH if command == "bench" else []
    assert main([command, digits_files["model"], "--input", digits_files["typo"], *extra]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "'imgae'" in err and "'image'" in err
    assert "did you mean 'imgae' for input 'image'" in err
    assert "--input image=random" in err or "NAME=random" in err


def test_npz_with_labels_beside_the_inputs_still_runs(tmp_path, digits_files, capsys):
    """The README's main job: samples.npz carries 'image' (the input) and 'label' (not an input)."""
    got = _run_outputs(tmp_path, [digits_files["model"], "--input", digits_files["samples"]])
    assert (got["digit"] == digits_files["label"]).mean() >= 15 / 16
    assert "ignoring 'label'" in capsys.readouterr().err


def test_mistyped_key_with_the_input_asked_random_runs(tmp_path, digits_files, capsys):
    got = _run_outputs(tmp_path, [digits_files["model"], "--input", digits_files["typo"], "--input",
                                  "image=random", "--shapes", "image:2x1x8x8"])
    assert got["logits"].shape == (2, 10)


def test_read_inputs_rules(tmp_path):
    inputs = {"a": "a: float32[batch,3]", "b": "b: float32[batch,3]"}
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "only_a.npz", a=a)  # the other input left random on purpose: no stray key
    assert list(read_inputs([str(tmp_path / "only_a.npz")], inputs)) == ["a"]
    np.savez(tmp_path / "both.npz", a=a, b=a + 1, label=np.zeros(2))
    got = read_inputs([str(tmp_path / "both.npz")], inputs)
    assert sorted(got) == ["a", "b"] and np.array_equal(got["b"], a + 1)
    np.savez(tmp_path / "typo.npz", a=a, bb=a)
    with pytest.raises(InputError, match="did you mean 'bb' for input 'b'"):
        read_inputs([str(tmp_path / "typo.npz")], inputs)
    # the stray key is forgiven once b is given another way
    np.save(tmp_path / "b.npy", a * 2)
    got = read_inputs([str(tmp_path / "typo.npz"), f"b={tmp_path / 'b.npy'}"], inputs)
    assert np.array_equal(got["b"], a * 2)
    with pytest.raises(InputError, match="no input 'c'"):
        read_inputs([f"c={tmp_path / 'b.npy'}"], inputs)
    np.savez(tmp_path / "one.npz", whatever=a)  # NAME=FILE.npz with one array: that array
    assert np.array_equal(read_inputs([f"a={tmp_path / 'one.npz'}"], inputs)["a"], a)
    with pytest.raises(InputError, match="3 arrays"):
        read_inputs([f"a={tmp_path / 'both.npz'}"], inputs)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read"):
        read_inputs([str(tmp_path / "junk.npy")], {"a": "a"})


# -- the command line ------------------------------------------------------------------------------
def test_tables_print_in_full_when_stdout_is_not_a_terminal(tmp_path, digits_files, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["run", digits_files["model"], "--input", digits_files["samples"]]) == 0
    out = capsys.readouterr().out
    assert "5, 7, 4, 5, 9, 5, 5, 8, 7, 7, 8, 9, 0, 0, 1, 5" in out  # the digit row, not wrapped
    assert max(len(line) for line in out.splitlines()) > 80
    assert main(["inspect", digits_files["model"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("/features/features.2/Relu" in line and "ember.Conv" in line for line in lines)


def test_every_command_with_a_table_prints_through_make_console():
    """A table printed through a Console created anywhere else would be cut at 80 columns again."""
    cli_dir = os.path.join(ROOT, "src", "ember", "cli")
    sources = {name: open(os.path.join(cli_dir, name)).read() for name in sorted(os.listdir(cli_dir))
               if name.endswith(".py") and name != "common.py"}
    assert sum("Table(" in text for text in sources.values()) >= 4
    offenders = [name for name, text in sources.items() if "Table(" in text and "Console(" in text]
    assert offenders == []


def test_python_dash_m_ember(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    r = subprocess.run([sys.executable, "-m", "ember", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "build" in r.stdout and "python -m ember" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ember", "run", os.path.join(DIGITS, "missing.engine")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
