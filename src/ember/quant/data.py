"""Calibration data: where the sample inputs of an INT8/FP8 build come from.

``calibration_batches(source, inputs, ...)`` yields feed dicts (input name -> numpy array, a batch
along the first axis) from any of:

- a folder of ``.npz`` files (each one batch, keys = input names) or ``.npy`` files (each one batch
  of the model's only input), read in name order;
- one ``.npz`` file whose arrays hold every sample along the first axis (split into batches);
- a folder of images (``.png``, ``.jpg``, ``.bmp``, ``.ppm``...) with the preprocessing stated in
  :class:`ImagePreprocess` (resize, center crop, scale, mean/std, layout); pillow decodes them when
  installed, else ember's own PNG/BMP/PNM/TIFF decoder does (no JPEG then);
- a text file (one sentence per line) through a tokenizer (``tokenizer.json`` or a folder holding
  one) for encoders: ``input_ids``, ``attention_mask`` and ``token_type_ids`` as the model asks;
- any Python iterable of feed dicts (or of arrays, for a single-input model).

``samples`` caps how many samples are used; a source with fewer is used whole.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import EmberError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp")


class CalibrationError(EmberError):
    """Calibration data that cannot be read, or that does not fit the model's inputs."""


@dataclass(frozen=True)
class InputSpec:
    """What the model wants for one input: name, numpy dtype and shape (None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[Optional[int], ...]


@dataclass(frozen=True)
class ImagePreprocess:
    """How images become a model input: ``resize`` the shorter side (or to HxW), ``crop`` the
    center (HxW), scale pixel values by ``scale`` (1/255: into [0, 1]), subtract ``mean`` and
    divide by ``std`` per channel (RGB order, after scaling), ``layout`` NCHW or NHWC,
    ``channels`` 3 (RGB), or 1 (grayscale)."""

    resize: Optional[tuple[int, ...]] = None
    crop: Optional[tuple[int, int]] = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    channels: int = 3

    @classmethod
    def parse(cls, text: str) -> "ImagePreprocess":
        """``resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW`` (the CLI form)."""
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            try:
                if key in ("resize", "crop"):
                    dims = tuple(int(v) for v in value.lower().split("x"))
                    fields[key] = dims if key == "resize" else (dims * 2 if len(dims) == 1 else dims)
                elif key in ("mean", "std"):
                    fields[key] = tuple(float(v) for v in value.split("/"))
                elif key == "scale":
                    num, _, den = value.partition("/")
                    fields[key] = float(num) / (float(den) if den else 1.0)
                elif key == "layout":
                    fields[key] = value.upper()
                elif key == "channels":
                    fields[key] = int(value)
                else:
                    raise ValueError
            except ValueError:
                raise CalibrationError(
                    f"image preprocessing '{part}' is not understood; write it as resize=256,crop=224,scale=1/255,"
                    "mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW,channels=3") from None
        p = cls(**fields)
        if p.layout not in ("NCHW", "NHWC") or p.channels not in (1, 3):
            raise CalibrationError(f"image preprocessing: layout must be NCHW or NHWC and channels 1 or 3 (got "
                                   f"{p.layout}, {p.channels})")
        return p

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 image -> one sample (CxHxW or HxWxC float32)."""
        img = rgb.astype(np.float32)
        if self.channels == 1:  # ITU-R 601-2 luma
            img = img @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
        if self.resize is not None:
            img = _resize(img, self.resize)
        if self.crop is not None:
            h, w = img.shape[:2]
            ch, cw = self.crop
            if ch > h or cw > w:
                raise CalibrationError(f"image preprocessing: crop {ch}x{cw} is larger than the resized image {h}x{w}")
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img[top:top + ch, left:left + cw]
        img = img * self.scale
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        img = (img - mean) / std
        return np.ascontiguousarray(img.transpose(2, 0, 1) if self.layout == "NCHW" else img).astype(np.float32)


def _resize(img: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, as PIL and torchvision do) of HxWxC float pixels."""
    import torch

    h, w = img.shape[:2]
    if len(size) == 1:  # the shorter side to size[0], keeping the aspect ratio
        s = size[0] / min(h, w)
        size = (max(1, round(h * s)), max(1, round(w * s)))
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy().transpose(1, 2, 0)


def read_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB."""
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:  # pillow raises several kinds
            raise CalibrationError(f"calibration image '{path}' cannot be read: {e}") from None
    from ..ops.image_decode import _Unsupported, decode_rgb

    try:
        rgb = decode_rgb(path.read_bytes())
    except _Unsupported as e:
        raise CalibrationError(f"calibration image '{path}': {e}; install pillow (pip install pillow) to read it") \
            from None
    return rgb if rgb.shape[-1] == 3 else np.repeat(rgb[..., :1], 3, axis=-1)


@dataclass
class TextSource:
    """Sentences through a tokenizer, padded or cut to ``seq_len`` tokens."""

    lines: list[str]
    tokenizer: str
    seq_len: int = 128

    def encode(self, texts: Sequence[str], inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CalibrationError("text calibration data needs the tokenizers package (pip install tokenizers)") \
                from None
        path = Path(self.tokenizer)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CalibrationError(f"tokenizer '{self.tokenizer}' not found; give a tokenizer.json or the folder "
                                   "holding one")
        tok = Tokenizer.from_file(str(path))
        tok.enable_truncation(self.seq_len)
        tok.enable_padding(length=self.seq_len)
        enc = tok.encode_batch(list(texts))
        have = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        out = {}
        for spec in inputs:
            if spec.name not in have:
                raise CalibrationError(f"text calibration data gives input_ids, attention_mask and token_type_ids; "
                                       f"the model also needs '{spec.name}': give .npz files instead")
            out[spec.name] = np.asarray(have[spec.name], dtype=spec.dtype)
        return out


@dataclass
class CalibrationSource:
    """A resolved source: its kind (for the build report) and the batches it yields."""

    kind: str
    description: str
    _batches: Any = field(repr=False)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        yield from self._batches()


def open_source(source: Any, inputs: Sequence[InputSpec], *, batch_size: int = 8, samples: Optional[int] = None,
                preprocess: "ImagePreprocess | str | None" = None, tokenizer: Optional[str] = None,
                seq_len: int = 128) -> CalibrationSource:
    """The batches of ``source`` (a path or an iterable), at most ``samples`` samples in all."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration data '{path}' does not exist")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            npz = [p for p in files if p.suffix == ".npz"]
            npy = [p for p in files if p.suffix == ".npy"]
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if npz or npy:
                gen = _arrays_files(npz or npy, inputs)
                return CalibrationSource("arrays", f"{len(npz or npy)} {'.npz' if npz else '.npy'} files in {path}",
                                         lambda: _limited(gen(), samples, batch_size, rebatch=False))
            if images:
                pre = ImagePreprocess.parse(preprocess) if isinstance(preprocess, str) else preprocess
                if pre is None:
                    raise CalibrationError(f"calibration images in '{path}': state their preprocessing (--calib-"
                                           "preprocess resize=256,crop=224,mean=...,std=...,layout=NCHW)")
                return CalibrationSource("images", f"{len(images)} images in {path} ({pre})",
                                         lambda: _limited(_images(images, pre, inputs), samples, batch_size))
            raise CalibrationError(f"calibration folder '{path}' holds no .npz, .npy or image files")
        if path.suffix == ".npz":
            return CalibrationSource("arrays", f"{path}", lambda: _limited(_one_npz(path, inputs), samples, batch_size))
        if path.suffix == ".npy":
            return CalibrationSource("arrays", f"{path}", lambda: _limited(
                iter([_single({"": np.load(path)}, inputs, path)]), samples, batch_size))
        if path.suffix in (".txt", ".text"):
            if tokenizer is None:
                raise CalibrationError(f"calibration text '{path}' needs a tokenizer (--tokenizer tokenizer.json)")
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            text = TextSource(lines, tokenizer, seq_len)
            return CalibrationSource("text", f"{len(lines)} sentences in {path}, {seq_len} tokens",
                                     lambda: _limited(_text(text, inputs, batch_size), samples, batch_size))
        raise CalibrationError(f"calibration data '{path}': give a folder of .npz/.npy files or images, one .npz, "
                               "or a .txt of sentences (with --tokenizer)")
    if isinstance(source, Iterable):
        return CalibrationSource("iterable", type(source).__name__,
                                 lambda: _limited((_single(b, inputs, "the iterable") for b in source), samples,
                                                  batch_size, rebatch=False))
    raise CalibrationError(f"calibration data must be a path or an iterable of feed dicts, not {type(source).__name__}")


def _single(batch: Any, inputs: Sequence[InputSpec], where: Any) -> dict[str, np.ndarray]:
    """A batch as {input: array}: a dict by input name, or one array for a single-input model."""
    if not isinstance(batch, dict) or set(batch) == {""}:
        arr = batch[""] if isinstance(batch, dict) else batch
        if len(inputs) != 1:
            raise CalibrationError(f"{where}: a bare array, but the model has {len(inputs)} inputs "
                                   f"({', '.join(i.name for i in inputs)}); give dicts (or .npz) keyed by input name")
        batch = {inputs[0].name: arr}
    out = {}
    for spec in inputs:
        if spec.name not in batch:
            raise CalibrationError(f"{where}: no array for input '{spec.name}' (it has {sorted(batch)})")
        a = np.asarray(batch[spec.name])
        if a.ndim != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape[1:], a.shape[1:])):
            raise CalibrationError(f"{where}: input '{spec.name}' is {list(a.shape)}, the model wants "
                                   f"{['?' if d is None else d for d in spec.shape]}")
        out[spec.name] = a.astype(spec.dtype, copy=False)
    return out


def _arrays_files(files: list[Path], inputs: Sequence[InputSpec]):
    def gen() -> Iterator[dict[str, np.ndarray]]:
        for f in files:
            try:
                loaded = np.load(f)
                batch = dict(loaded) if f.suffix == ".npz" else {"": loaded}
            except (OSError, ValueError) as e:
                raise CalibrationError(f"calibration file '{f}' cannot be read: {e}") from None
            yield _single(batch, inputs, f)
    return gen


def _one_npz(path: Path, inputs: Sequence[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    try:
        arrays = dict(np.load(path))
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file '{path}' cannot be read: {e}") from None
    yield _single(arrays if len(arrays) > 1 or len(inputs) > 1 else {"": next(iter(arrays.values()))}, inputs, path)


def _images(files: list[Path], pre: ImagePreprocess, inputs: Sequence[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    if len(inputs) != 1:
        raise CalibrationError(f"image calibration data feeds one input; the model has {len(inputs)}")
    for f in files:
        yield {inputs[0].name: pre.apply(read_image(f))[None].astype(inputs[0].dtype)}


def _text(text: TextSource, inputs: Sequence[InputSpec], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(text.lines), batch_size):
        yield text.encode(text.lines[i:i + batch_size], inputs)


def _limited(batches: Iterator[dict[str, np.ndarray]], samples: Optional[int], batch_size: int,
             rebatch: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """At most ``samples`` samples; with ``rebatch``, in batches of ``batch_size`` along axis 0."""
    left = samples if samples is not None else None
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for b in batches:
        n = len(next(iter(b.values())))
        if left is not None:
            if left <= 0:
                break
            if n > left:
                b = {k: v[:left] for k, v in b.items()}
                n = left
            left -= n
        if not rebatch:
            yield b
            continue
        pending.append(b)
        count += n
        while count >= batch_size:
            merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            count -= batch_size
            pending = [rest] if count else []
    if rebatch and count:
        yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
