"""The `ember` command: build, run, errors as messages with exit code 1."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from ember.cli.main import main

from .helpers import add_mul_model, save

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "examples", "digits")


def test_build_and_run(tmp_path, capsys):
    model = save(add_mul_model(), tmp_path / "m.onnx")
    eng = str(tmp_path / "m.engine")
    assert main(["build", model, "-o", eng]) == 0
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = str(tmp_path / "out.npz")
    assert main(["run", eng, "--input", f"x={tmp_path / 'x.npy'}", "--save", out]) == 0
    y = np.load(out)["y"]
    np.testing.assert_allclose(y, (x + np.array([0.5, -1.0, 2.0, 3.0], np.float32)) * x, rtol=1e-6)
    # random inputs with a chosen shape
    assert main(["run", eng, "--shapes", "x:3x4", "--save", out]) == 0
    assert np.load(out)["y"].shape == (3, 4)


@pytest.mark.parametrize("args, message", [
    (["run", "{tmp}/missing.engine"], "does not exist"),
    (["run", "{eng}", "--input", "nope=random"], "no input 'nope'"),
    (["run", "{eng}", "--input", "x={tmp}/none.npy"], "cannot read"),
    (["build", "{tmp}/garbage.onnx"], "not a valid ONNX model"),
])
def test_errors_are_messages(tmp_path, capsys, args, message):
    model = save(add_mul_model(), tmp_path / "m.onnx")
    eng = str(tmp_path / "m.engine")
    assert main(["build", model, "-o", eng]) == 0
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage")
    args = [a.format(tmp=tmp_path, eng=eng) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_digits_example_matches_labels_and_onnxruntime(tmp_path):
    """The README's main job: the shipped digits CNN, built and run on CPU."""
    eng = str(tmp_path / "digits.engine")
    out = str(tmp_path / "out.npz")
    assert main(["build", os.path.join(DIGITS, "digits_cnn.onnx"), "-o", eng]) == 0
    samples = os.path.join(DIGITS, "samples.npz")
    assert main(["run", eng, "--input", samples, "--save", out]) == 0
    got = np.load(out)
    z = np.load(samples)
    assert (got["digit"] == z["label"]).mean() >= 15 / 16
    sess = ort.InferenceSession(os.path.join(DIGITS, "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    ref_logits, ref_digit = sess.run(None, {"image": z["image"]})
    np.testing.assert_array_equal(got["digit"], ref_digit)
    rel = np.linalg.norm(got["logits"] - ref_logits) / np.linalg.norm(ref_logits)
    assert rel < 1e-5


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "ember.cli.main", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")})
    assert r.returncode == 0 and "build" in r.stdout and "run" in r.stdout
