"""Calibration data the reviewer of issue 13 found mishandled: a generator read by two passes, a cache
reused for other data or another sample count, raw Python errors for damaged files, float data truncated
into integer inputs, and image/text batches of the wrong shape passed on to the build."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import ember
from ember.errors import EmberError
from ember.quant import cache
from ember.quant.collect import Calibration
from ember.quant.data import CalibrationError, ImagePreprocess, InputSpec, open_source

from .test_data import write_png

IMG = [InputSpec("x", np.dtype(np.float32), (None, 3, 4, 6))]
IDS = [InputSpec("input_ids", np.dtype(np.int64), (None, 4))]


def mlp():
    """x [N, 16] -> MatMul -> Relu -> MatMul: two GEMMs, so SmoothQuant runs its statistics pass."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                          [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w1"),
                           numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def data(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    x[:, 5] *= 30.0
    return [{"x": x[i:i + 8]} for i in range(0, n, 8)]


# -- 1. a generator is read once, and every pass sees the same samples ------------------------------------
def test_a_generator_source_is_read_once_and_replayed():
    pulled = []

    def gen():
        for i, b in enumerate(data(64, 1)):
            pulled.append(i)
            yield b

    src = open_source(gen(), [InputSpec("x", np.dtype(np.float32), (None, 16))], samples=24)
    first, second = list(src.batches()), list(src.batches())
    assert [len(b["x"]) for b in first] == [8, 8, 8]
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, second)) and len(second) == 3
    assert pulled == [0, 1, 2]  # not read past the samples asked for


def test_smoothquant_with_a_generator_calibrates_on_every_sample():
    model = mlp()
    listed = ember.build(model, device="cpu", quantize="int8", calibration=data(64, 1), calib_method="minmax")
    gen = ember.build(model, device="cpu", quantize="int8", calibration=(b for b in data(64, 1)),
                      calib_method="minmax")
    for e in (listed, gen):
        cal = e.manifest["quantization"]["calibration"]
        assert cal["samples"] == 64 and cal["smoothed_layers"] == 2, cal
    x = data(32, 7)[0]["x"]
    assert np.array_equal(listed.run({"x": x})["y"], gen.run({"x": x})["y"])  # the same ranges and factors


# -- 2. the cache holds for one graph and one data source, read with one sample limit ---------------------
def test_the_cache_is_recomputed_for_other_samples_or_other_data(tmp_path, caplog):
    model, path = mlp(), str(tmp_path / "mlp.calib")

    def build(calibration, samples=None):
        e = ember.build(model, device="cpu", quantize="int8", calibration=calibration, calib_samples=samples,
                        calib_cache=path, calib_method="minmax")
        return e.manifest["quantization"]["calibration"]

    assert build(data(64, 1), 8)["cached"] is False
    again = build(data(64, 1), 8)
    assert again["cached"] is True and again["samples"] == 8
    with caplog.at_level(logging.WARNING, logger="ember.quant.cache"):
        more = build(data(64, 1), 64)
    assert more["cached"] is False and more["samples"] == 64  # 64 samples are not the 8 cached
    assert "made for another data" in caplog.text and "calibrating again" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ember.quant.cache"):
        other = build(data(64, 2), 64)  # dataset B, as many samples
    assert other["cached"] is False and "another data" in caplog.text
    assert build(data(64, 2), 64)["cached"] is True
    # a folder of .npz: an edited file is other data
    folder = tmp_path / "npz"
    folder.mkdir()
    for i, b in enumerate(data(32, 3)):
        np.savez(folder / f"{i}.npz", **b)
    assert build(str(folder))["cached"] is False
    assert build(str(folder))["cached"] is True
    np.savez(folder / "0.npz", **data(8, 4)[0])
    assert build(str(folder))["cached"] is False


def test_a_cache_without_a_range_for_a_layer_is_recomputed(tmp_path):
    model, path = mlp(), tmp_path / "mlp.calib"
    kw = dict(device="cpu", quantize="int8", calibration=data(16, 1), calib_cache=str(path), calib_method="minmax")
    ember.build(model, **kw)
    path.write_text("\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("amax"))[:-1] + "\n")
    assert ember.build(model, **kw).manifest["quantization"]["calibration"]["cached"] is False
    assert path.read_text().count("\namax ") == 2


# -- 3. damaged files are errors naming the file ----------------------------------------------------------
GOOD = ("# c\nformat ember-calibration 2\ngraph g\ndata d\ntype int8\nmethod mse\nsamples 8\nsmooth_alpha none\n"
        'amax "x" 2.5\n')


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00garbage", "cannot be read"),
    (GOOD.replace("samples 8", "samples eight").encode(), "line 7 is malformed"),
    (GOOD.replace('amax "x" 2.5', "amax [1] 2.5").encode(), "line 9 is malformed.*not a string"),
    (GOOD.replace('amax "x" 2.5', 'amax "x" nan').encode(), "line 9 is malformed.*finite"),
    (GOOD.replace('amax "x" 2.5', 'amax "x').encode(), "line 9 is malformed"),
    (GOOD.encode() + b'smooth "g" 1.0,0,2\n', "line 10 is malformed.*smoothing factor"),
    (None, "is a folder"),
])
def test_a_damaged_calibration_cache_names_the_file(tmp_path, content, words):
    path = tmp_path / "model.calib"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=words) as e:
        cache.load(path, "g", "int8", "mse", None, data="d")
    assert str(path) in str(e.value)
    if content is None:
        return
    with pytest.raises(CalibrationError, match="delete the file"):
        cache.load(path, "g", "int8", "mse", None, data="d")


def test_a_cache_that_cannot_be_written_names_the_file(tmp_path):
    (tmp_path / "file").write_text("")
    cal = Calibration("int8", "mse", 8, "g", {"x": 1.0})
    with pytest.raises(CalibrationError, match="cannot be written"):
        cache.save(cal, tmp_path / "file" / "sub.calib")


def write_bad(tmp_path, kind):
    folder = tmp_path / "d"
    folder.mkdir()
    x = np.ones((2, 3, 4, 6), np.float32)
    if kind == "garbage.npz":
        (folder / "a.npz").write_bytes(b"PK\x03\x04 not really a zip")
        return folder, "a.npz' cannot be read"
    if kind == "truncated.npz":
        np.savez(folder / "a.npz", x=x)
        raw = (folder / "a.npz").read_bytes()
        (folder / "a.npz").write_bytes(raw[:len(raw) // 2])
        return folder, "a.npz' cannot be read"
    if kind == "empty.npz":
        np.savez(folder / "a.npz")
        return folder, "a.npz' holds no arrays"
    if kind == "npy-in-npz":
        np.save(folder / "a.npy", x)
        (folder / "a.npy").rename(folder / "a.npz")
        return folder, "not an .npz archive"
    if kind == "garbage.npy":
        (folder / "a.npy").write_bytes(b"\x93NUMPY garbage")
        return folder, "a.npy' cannot be read"
    if kind == "object.npy":
        np.save(folder / "a.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return folder, "a.npy' cannot be read"
    if kind == "one garbage .npy":
        (folder / "a.npy").write_bytes(b"nope")
        return folder / "a.npy", "a.npy' cannot be read"
    if kind == "one empty .npz":
        np.savez(folder / "a.npz")
        return folder / "a.npz", "holds no arrays"
    if kind == "strings.npz":
        np.savez(folder / "a.npz", x=np.array(["a", "b"]))
        return folder, "holds <U1 data"
    if kind == "no usable files":
        (folder / "notes.md").write_text("hi")
        (folder / "sub").mkdir()
        return folder, "holds no .npz, .npy or image files.*put the samples there"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["garbage.npz", "truncated.npz", "empty.npz", "npy-in-npz", "garbage.npy",
                                  "object.npy", "one garbage .npy", "one empty .npz", "strings.npz",
                                  "no usable files"])
def test_damaged_array_files_name_the_file(tmp_path, kind):
    source, words = write_bad(tmp_path, kind)
    with pytest.raises(CalibrationError, match=words):
        list(open_source(source, IMG).batches())


def tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = tokenizers.Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "the": 2, "cat": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


def test_bad_text_files_name_the_file(tmp_path):
    tok = tokenizer(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match="latin1.txt' cannot be read as UTF-8"):
        open_source(tmp_path / "latin1.txt", IDS, tokenizer=tok, seq_len=4)
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(CalibrationError, match="blank.txt' holds no sentence"):
        open_source(tmp_path / "blank.txt", IDS, tokenizer=tok, seq_len=4)
    (tmp_path / "s.txt").write_text("the cat\n")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json' cannot be read"):
        list(open_source(tmp_path / "s.txt", IDS, tokenizer=str(tmp_path / "bad.json"), seq_len=4).batches())


# -- 4. values and shapes that do not fit the input --------------------------------------------------------
def test_float_data_for_an_integer_input_is_refused_not_truncated(tmp_path):
    with pytest.raises(CalibrationError, match=r"input 'input_ids' is int64 and the data holds 1\.7.*truncate"):
        list(open_source([{"input_ids": np.array([[1.7, 2, 3, 4]])}], IDS).batches())
    np.savez(tmp_path / "ids.npz", input_ids=np.array([[1, 2, np.nan, 4]]))
    with pytest.raises(CalibrationError, match=r"ids.npz: input 'input_ids' is int64 and the data holds nan"):
        list(open_source(tmp_path / "ids.npz", IDS).batches())
    whole = list(open_source([{"input_ids": np.array([[1.0, 2, 3, 4]])}], IDS).batches())[0]["input_ids"]
    assert whole.dtype == np.int64 and whole.tolist() == [[1, 2, 3, 4]]  # whole numbers stored as floats are fine
    small = [InputSpec("ids", np.dtype(np.int8), (None, 4))]
    with pytest.raises(CalibrationError, match=r"input 'ids' is int8, and the data holds values from 1 to 300, "
                                               r"outside \[-128, 127\]"):
        list(open_source([np.array([[1, 2, 3, 300]])], small).batches())


@pytest.mark.parametrize("pre, words", [
    ("scale=1/255,channels=1", r"input 'x' is \[1, 1, 4, 6\], the model wants \['\?', 3, 4, 6\].*1 channel"),
    ("scale=1/255,layout=NHWC", r"input 'x' is \[1, 4, 6, 3\].*layout NHWC"),
    ("crop=4x4", r"input 'x' is \[1, 3, 4, 4\].*crop 4x4"),
])
def test_images_of_the_wrong_shape_name_the_file_and_the_preprocessing(tmp_path, pre, words):
    write_png(tmp_path / "img.png", np.full((4, 6, 3), 100, np.uint8))
    with pytest.raises(CalibrationError, match="img.png: " + words):
        list(open_source(tmp_path, IMG, preprocess=pre).batches())
    with pytest.raises(CalibrationError, match="mean has 2 values for 3 channel"):
        ImagePreprocess.parse("mean=0.5/0.5")


def test_images_for_an_integer_input_are_rounded_pixels(tmp_path):
    write_png(tmp_path / "img.png", np.full((4, 6, 3), 100, np.uint8))
    spec = [InputSpec("x", np.dtype(np.uint8), (None, 4, 6, 3))]
    got = list(open_source(tmp_path, spec, preprocess="scale=1,layout=NHWC").batches())[0]["x"]
    assert got.dtype == np.uint8 and (got == 100).all()


def test_text_of_another_sequence_length_names_the_file_and_seq_len(tmp_path):
    tok = tokenizer(tmp_path)
    (tmp_path / "s.txt").write_text("the cat\nthe\n")
    with pytest.raises(CalibrationError, match=r"s.txt: input 'input_ids' is \[2, 8\], the model wants "
                                               r"\['\?', 4\].*--seq-len 8"):
        list(open_source(tmp_path / "s.txt", IDS, tokenizer=tok, seq_len=8).batches())


def test_a_build_refuses_truncating_calibration_data():
    g = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["e"]),
                           helper.make_node("MatMul", ["e", "w"], ["y"])], "emb",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8])],
                          [numpy_helper.from_array(np.ones((10, 16), np.float32), "emb"),
                           numpy_helper.from_array(np.ones((16, 8), np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(EmberError, match="input 'ids' is int64 and the data holds 1.5"):
        ember.build(model, device="cpu", quantize="int8", calibration=[{"ids": np.array([[1.5, 2, 3, 4]])}])
