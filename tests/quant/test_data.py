"""Calibration data sources: .npz/.npy folders, one .npz, images with stated preprocessing, text through a
tokenizer, Python iterables; every problem an EmberError naming the file or input."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from ember.quant.data import CalibrationError, ImagePreprocess, InputSpec, open_source

IMG = [InputSpec("x", np.dtype(np.float32), (None, 3, 4, 6))]


def batches(src):
    return list(src.batches())


def test_folder_of_npz_and_npy(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3, 4, 6)).astype(np.float32) for _ in range(3)]
    for i, a in enumerate(arrays):
        np.savez(tmp_path / f"b{i}.npz", x=a)
    got = batches(open_source(tmp_path, IMG, samples=5))
    assert [len(b["x"]) for b in got] == [2, 2, 1] and np.array_equal(got[2]["x"], arrays[2][:1])
    npy = tmp_path / "npy"
    npy.mkdir()
    for i, a in enumerate(arrays):
        np.save(npy / f"{i}.npy", a.astype(np.float64))  # cast to the input's dtype
    got = batches(open_source(npy, IMG))
    assert len(got) == 3 and got[0]["x"].dtype == np.float32


def test_one_npz_is_split_into_batches(tmp_path):
    x = np.arange(10 * 72, dtype=np.float32).reshape(10, 3, 4, 6)
    np.savez(tmp_path / "all.npz", x=x)
    got = batches(open_source(tmp_path / "all.npz", IMG, batch_size=4))
    assert [len(b["x"]) for b in got] == [4, 4, 2] and np.array_equal(np.concatenate([b["x"] for b in got]), x)


def test_iterables_of_dicts_or_arrays():
    x = np.ones((2, 3, 4, 6), np.float32)
    assert len(batches(open_source([{"x": x}, {"x": x}], IMG))) == 2
    assert batches(open_source(iter([x]), IMG))[0]["x"].shape == (2, 3, 4, 6)


@pytest.mark.parametrize("source, words", [
    ([{"y": np.ones((1, 3, 4, 6))}], "no array for input 'x'"),
    ([np.ones((1, 3, 5, 6))], r"input 'x' is \[1, 3, 5, 6\], the model wants \['\?', 3, 4, 6\]"),
    ("{tmp}/missing", "does not exist"),
    ("{tmp}/empty", "holds no .npz"),
    (42, "must be a path or an iterable"),
])
def test_bad_data_is_named(tmp_path, source, words):
    (tmp_path / "empty").mkdir()
    if isinstance(source, str):
        source = source.format(tmp=tmp_path)
    with pytest.raises(CalibrationError, match=words):
        batches(open_source(source, IMG))


def write_png(path, rgb: np.ndarray) -> None:
    """A plain 8-bit RGB PNG (filter 0 on every row): what any image tool writes, without pillow."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_images_with_stated_preprocessing(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    for i, im in enumerate(imgs):
        write_png(tmp_path / f"{i}.png", im)
    pre = ImagePreprocess.parse("resize=4,scale=1/255,mean=0.5/0.4/0.3,std=0.2/0.25/0.3,layout=NCHW")
    got = batches(open_source(tmp_path, IMG, preprocess=pre, batch_size=2))
    assert [b["x"].shape for b in got] == [(2, 3, 4, 6), (1, 3, 4, 6)]  # the shorter side to 4, aspect kept
    same = ImagePreprocess.parse("resize=8x12,scale=1/255,mean=0.5/0.4/0.3,std=0.2/0.25/0.3").apply(imgs[0])
    want = ((imgs[0] / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])).transpose(2, 0, 1)
    assert np.allclose(same, want, atol=1e-5)  # no resampling at its own size: scale, mean/std, layout
    flat = ImagePreprocess.parse("resize=3x5,scale=1").apply(np.full((8, 12, 3), 77, np.uint8))
    assert np.allclose(flat, 77.0, atol=1e-3)  # resampling keeps a constant image constant
    crop = ImagePreprocess.parse("crop=4x6,layout=NHWC").apply(imgs[1])
    assert crop.shape == (4, 6, 3) and np.allclose(crop * 255, imgs[1][2:6, 3:9], atol=1e-3)
    with pytest.raises(CalibrationError, match="state their preprocessing"):
        batches(open_source(tmp_path, IMG))
    with pytest.raises(CalibrationError, match="not understood"):
        ImagePreprocess.parse("rezise=4")


def test_text_through_a_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 2, "cat": 3, "sat": 4}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "s.txt").write_text("the cat sat\nthe dog\n\nsat\n")
    specs = [InputSpec("input_ids", np.dtype(np.int64), (None, None)),
             InputSpec("attention_mask", np.dtype(np.int64), (None, None))]
    got = batches(open_source(tmp_path / "s.txt", specs, tokenizer=str(tmp_path), seq_len=4, batch_size=2))
    assert [b["input_ids"].shape for b in got] == [(2, 4), (1, 4)]
    assert got[0]["input_ids"].tolist() == [[2, 3, 4, 0], [2, 1, 0, 0]]
    assert got[0]["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        batches(open_source(tmp_path / "s.txt", specs))
