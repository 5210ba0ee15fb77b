"""`ember build MODEL --rebuild-from ENGINE`: the same build options, from the engine's manifest."""
from __future__ import annotations

import numpy as np
import pytest

import ember
from ember.cli.main import main
from ember.errors import EmberError
from ember.runtime.format import read_manifest
from ember.tools.rebuild import options_from_manifest

from .helpers import h200_engine, onnx_model, rewrite_manifest


def build(*args: str) -> int:
    return main(["build", *args])


def test_static_shapes_precision_and_levels_are_reproduced(tmp_path, capsys):
    model = onnx_model(tmp_path)
    first, again = str(tmp_path / "a.engine"), str(tmp_path / "b.engine")
    assert build(model, "-o", first, "--shapes", "x:3x4", "--opt-level", "1", "--builder-level", "3") == 0
    assert build(model, "--rebuild-from", first, "-o", again) == 0
    err = capsys.readouterr().err
    assert "--opt-level 1 --builder-level 3 --shapes x:3x4" in err
    a, b = read_manifest(first), read_manifest(again)
    for k in ("precision", "opt_level", "builder_level", "static_shapes", "profiles", "device", "source"):
        assert a[k] == b[k], k
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    ea, eb = ember.Engine.load(first, device="cpu"), ember.Engine.load(again, device="cpu")
    np.testing.assert_array_equal(ea.run({"x": x})["y"], eb.run({"x": x})["y"])
    np.testing.assert_allclose(eb.run({"x": x})["y"], (x + np.array([0.5, -1, 2, 3], np.float32)) * x, rtol=1e-6)


def test_several_profiles_are_reproduced(tmp_path):
    model = onnx_model(tmp_path)
    first, again = str(tmp_path / "a.engine"), str(tmp_path / "b.engine")
    assert build(model, "-o", first, "--min-shapes", "x:1x4", "--opt-shapes", "x:4x4", "--max-shapes", "x:8x4",
                 "--min-shapes", "x:9x4", "--opt-shapes", "x:16x4", "--max-shapes", "x:32x4") == 0
    assert build(model, "--rebuild-from", first, "-o", again) == 0
    assert read_manifest(again)["profiles"] == read_manifest(first)["profiles"] == [
        {"x": [[1, 4], [4, 4], [8, 4]]}, {"x": [[9, 4], [16, 4], [32, 4]]}]


def test_another_model_is_refused_with_the_explicit_command(tmp_path, capsys):
    import onnx

    model = onnx_model(tmp_path)
    first = str(tmp_path / "a.engine")
    assert build(model, "-o", first, "--shapes", "x:3x4") == 0
    other = onnx.load(model)
    other.producer_name = "re-exported"
    onnx.save(other, str(tmp_path / "other.onnx"))
    capsys.readouterr()
    assert build(str(tmp_path / "other.onnx"), "--rebuild-from", first) == 1
    err = capsys.readouterr().err
    assert "is not the model engine" in err and "(am.onnx)" in err
    assert f"ember build {tmp_path / 'other.onnx'} --fp32 --device cpu --opt-level 2" in err and "--shapes x:3x4" in err


def test_recorded_options_cannot_also_be_given(tmp_path, capsys):
    model = onnx_model(tmp_path)
    first = str(tmp_path / "a.engine")
    assert build(model, "-o", first) == 0
    capsys.readouterr()
    assert build(model, "--rebuild-from", first, "--fp16", "--shapes", "x:1x4") == 1
    err = capsys.readouterr().err
    assert "drop the precision flag, --shapes" in err


def test_a_cuda_engine_rebuilt_for_the_cpu(tmp_path, capsys):
    import torch

    eng = h200_engine(tmp_path)
    model = str(tmp_path / "am.onnx")
    if not torch.cuda.is_available():  # recorded device cuda: refused here, with the flag to change it
        assert build(model, "--rebuild-from", eng, "-o", str(tmp_path / "x.engine")) == 1
        assert "use --device cpu" in capsys.readouterr().err
    assert build(model, "--rebuild-from", eng, "--device", "cpu", "-o", str(tmp_path / "cpu.engine")) == 0
    m = read_manifest(str(tmp_path / "cpu.engine"))
    assert m["device"] == "cpu" and m["static_shapes"] == {"x": [2, 4]}


def test_missing_fields_are_named(tmp_path):
    m = read_manifest(h200_engine(tmp_path))
    for field in ("precision", "opt_level", "device"):
        broken = {k: v for k, v in m.items() if k != field}
        with pytest.raises(EmberError, match=f"its manifest has no '{field}' field"):
            options_from_manifest(broken, "e.engine")
    old = {k: v for k, v in m.items() if k != "builder_level"}
    opts = options_from_manifest(old)
    assert opts.builder_level is None and "no 'builder_level' field" in opts.notes[0]
    with pytest.raises(EmberError, match="manifest field 'profiles\\[0\\].x' is not"):
        options_from_manifest({**m, "profiles": [{"x": [[1, 4], [2, 4]]}]})


def test_an_engine_this_ember_refuses_can_still_be_rebuilt(tmp_path, capsys):
    """A newer format version: not loadable here, but its recorded options still build it again."""
    eng = rewrite_manifest(h200_engine(tmp_path), str(tmp_path / "future.engine"), format_version=99)
    assert build(str(tmp_path / "am.onnx"), "--rebuild-from", eng, "--device", "cpu",
                 "-o", str(tmp_path / "new.engine")) == 0
    assert read_manifest(str(tmp_path / "new.engine"))["static_shapes"] == {"x": [2, 4]}
