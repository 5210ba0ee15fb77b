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

``samples`` caps how many samples are used; a source with fewer is used whole. A one-shot iterator
(a generator) is read once, no further than ``samples``, and replayed to every later pass (SmoothQuant's
statistics pass and the range pass see the same samples). Every array is checked against the input it
feeds: its rank and static dims, and its values against the input's dtype (float data for an integer
input such as ``input_ids`` must hold whole numbers in range: it is refused, never truncated).
"""
from __future__ import annotations

import hashlib
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
        for key in ("mean", "std"):
            if len(getattr(p, key)) not in (1, p.channels):
                raise CalibrationError(f"image preprocessing: {key} has {len(getattr(p, key))} values for "
                                       f"{p.channels} channel(s); give one value, or one per channel")
        if (p.resize is not None and len(p.resize) not in (1, 2)) or any(d <= 0 for d in (p.resize or ()) + (p.crop or ())):
            raise CalibrationError(f"image preprocessing: resize must be S or HxW and crop HxW, all positive (got "
                                   f"resize={p.resize}, crop={p.crop})")
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
    path: str = "the text"  # the file the sentences came from (named in errors)
    _tok: Any = field(default=None, repr=False)

    def _tokenizer(self) -> Any:
        if self._tok is not None:
            return self._tok
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
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception for a damaged file
            raise CalibrationError(f"tokenizer '{path}' cannot be read ({e}); give the tokenizer.json the model was "
                                   "trained with") from None
        tok.enable_truncation(self.seq_len)
        tok.enable_padding(length=self.seq_len)
        self._tok = tok
        return tok

    def encode(self, texts: Sequence[str], inputs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
        enc = self._tokenizer().encode_batch(list(texts))
        have = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                "token_type_ids": [e.type_ids for e in enc]}
        out = {}
        for spec in inputs:
            if spec.name not in have:
                raise CalibrationError(f"text calibration data gives input_ids, attention_mask and token_type_ids; "
                                       f"the model also needs '{spec.name}': give .npz files instead")
            out[spec.name] = fit(np.asarray(have[spec.name]), spec, self.path,
                                 f"sentences become [batch, --seq-len {self.seq_len}] tokens; set --seq-len to the "
                                 "model's sequence length")
        return out


@dataclass
class CalibrationSource:
    """A resolved source: its kind (for the build report), the batches it yields, and its fingerprint
    (what the calibration cache keys on: the files' names, sizes and modification times, or for a
    Python iterable a digest of its arrays)."""

    kind: str
    description: str
    _batches: Any = field(repr=False)
    _fingerprint: Any = field(default=None, repr=False)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        yield from self._batches()

    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint()
        h = hashlib.sha256()
        for b in self.batches():
            for k in sorted(b):
                a = np.ascontiguousarray(b[k])
                h.update(f"{k}|{a.dtype}|{a.shape}".encode())
                h.update(a.view(np.uint8).reshape(-1).tobytes() if a.size else b"")
        return h.hexdigest()[:32]


def _files_fingerprint(files: Sequence[Path], *extra: Any) -> Any:
    """A fingerprint of files by name, size and modification time (no need to read them again)."""
    def digest() -> str:
        h = hashlib.sha256(repr(extra).encode())
        for f in files:
            try:
                st = f.stat()
            except OSError as e:
                raise CalibrationError(f"calibration file '{f}' cannot be read: {e}") from None
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]
    return digest


class _Replay:
    """A one-shot iterator (a generator) read once and replayed: every pass sees the same items, and
    the iterator is read no further than a pass asks (``samples`` bounds it)."""

    def __init__(self, it: Iterator[Any]) -> None:
        self._it, self._seen, self._done = it, [], False

    def __iter__(self) -> Iterator[Any]:
        i = 0
        while True:
            if i < len(self._seen):
                yield self._seen[i]
                i += 1
                continue
            if self._done:
                return
            try:
                item = next(self._it)
            except StopIteration:
                self._done = True
                return
            self._seen.append(item)


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
                                         lambda: _limited(gen(), samples, batch_size, rebatch=False),
                                         _files_fingerprint(npz or npy))
            if images:
                pre = ImagePreprocess.parse(preprocess) if isinstance(preprocess, str) else preprocess
                if pre is None:
                    raise CalibrationError(f"calibration images in '{path}': state their preprocessing (--calib-"
                                           "preprocess resize=256,crop=224,mean=...,std=...,layout=NCHW)")
                return CalibrationSource("images", f"{len(images)} images in {path} ({pre})",
                                         lambda: _limited(_images(images, pre, inputs), samples, batch_size),
                                         _files_fingerprint(images, pre))
            raise CalibrationError(f"calibration folder '{path}' holds no .npz, .npy or image files "
                                   f"({len(files)} other file(s)); put the samples there as .npz (keys = input "
                                   f"names), .npy or images ({', '.join(IMAGE_SUFFIXES)})")
        if path.suffix == ".npz":
            return CalibrationSource("arrays", f"{path}", lambda: _limited(_one_npz(path, inputs), samples, batch_size),
                                     _files_fingerprint([path]))
        if path.suffix == ".npy":
            return CalibrationSource("arrays", f"{path}", lambda: _limited(
                iter([_single(_load_arrays(path), inputs, path)]), samples, batch_size), _files_fingerprint([path]))
        if path.suffix in (".txt", ".text"):
            if tokenizer is None:
                raise CalibrationError(f"calibration text '{path}' needs a tokenizer (--tokenizer tokenizer.json)")
            try:
                lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise CalibrationError(f"calibration text '{path}' cannot be read as UTF-8 text ({e}); give one "
                                       "sentence per line, UTF-8 encoded") from None
            if not lines:
                raise CalibrationError(f"calibration text '{path}' holds no sentence; give one sentence per line")
            text = TextSource(lines, tokenizer, seq_len, str(path))
            tok = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
            return CalibrationSource("text", f"{len(lines)} sentences in {path}, {seq_len} tokens",
                                     lambda: _limited(_text(text, inputs, batch_size), samples, batch_size),
                                     _files_fingerprint([path] + ([tok] if tok.is_file() else []), seq_len))
        raise CalibrationError(f"calibration data '{path}': give a folder of .npz/.npy files or images, one .npz, "
                               "or a .txt of sentences (with --tokenizer)")
    if isinstance(source, Iterable):
        items = _Replay(iter(source)) if iter(source) is source else source  # a generator: read once
        return CalibrationSource("iterable", type(source).__name__,
                                 lambda: _limited((_single(b, inputs, "the iterable") for b in items), samples,
                                                  batch_size, rebatch=False))
    raise CalibrationError(f"calibration data must be a path or an iterable of feed dicts, not {type(source).__name__}")


def fit(a: Any, spec: InputSpec, where: Any, hint: str = "") -> np.ndarray:
    """``a`` as input ``spec`` wants it: its rank and static dims (but the batch) must match, and its
    values must survive the cast to the input's dtype (no float truncated to an integer, no integer
    wrapped around)."""
    want = f"{spec.dtype}{['?' if d is None else d for d in spec.shape]}"
    try:
        a = np.asarray(a)
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"{where}: the data for input '{spec.name}' is not an array ({e}); the model wants "
                               f"{want}") from None
    if a.dtype.kind not in "biuf":
        raise CalibrationError(f"{where}: input '{spec.name}' holds {a.dtype} data; the model wants {want}")
    if a.ndim != len(spec.shape) or any(d is not None and d != s for d, s in zip(spec.shape[1:], a.shape[1:])):
        raise CalibrationError(f"{where}: input '{spec.name}' is {list(a.shape)}, the model wants "
                               f"{['?' if d is None else d for d in spec.shape]}" + (f" ({hint})" if hint else ""))
    target = np.dtype(spec.dtype)
    if target.kind in "biu" and a.size and a.dtype != target:
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a) | (a != np.round(a))
            if bad.any():
                raise CalibrationError(f"{where}: input '{spec.name}' is {target} and the data holds "
                                       f"{a[bad].reshape(-1)[0].item()!r} ({a.dtype}): give whole numbers (token ids, "
                                       f"indices), ember does not truncate them")
        lo, hi = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
        if a.dtype.kind != "b" and (a.min() < lo or a.max() > hi):
            raise CalibrationError(f"{where}: input '{spec.name}' is {target}, and the data holds values from "
                                   f"{a.min().item()} to {a.max().item()}, outside [{lo}, {hi}]")
    return a.astype(target, copy=False)


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
        out[spec.name] = fit(batch[spec.name], spec, where)
    return out


def _load_arrays(f: Path) -> dict[str, np.ndarray]:
    """A .npz as {key: array}, a .npy as {"": array}; any damage an error naming the file."""
    try:
        loaded = np.load(f, allow_pickle=False)
        if f.suffix == ".npz":
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("it is a single array (.npy), not an .npz archive")
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
        else:
            if not isinstance(loaded, np.ndarray):
                loaded.close()
                raise ValueError("it is an .npz archive, not a single array (.npy)")
            arrays = {"": loaded}
    except CalibrationError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError (pickled objects, bad header), OSError...
        raise CalibrationError(f"calibration file '{f}' cannot be read ({type(e).__name__}: {e}); write it again "
                               "with numpy.save / numpy.savez, or remove it") from None
    if not arrays:
        raise CalibrationError(f"calibration file '{f}' holds no arrays; write one array per model input "
                               "(numpy.savez(f, input_name=array))")
    return arrays


def _arrays_files(files: list[Path], inputs: Sequence[InputSpec]):
    def gen() -> Iterator[dict[str, np.ndarray]]:
        for f in files:
            yield _single(_load_arrays(f), inputs, f)
    return gen


def _one_npz(path: Path, inputs: Sequence[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    arrays = _load_arrays(path)
    yield _single(arrays if len(arrays) > 1 or len(inputs) > 1 else {"": next(iter(arrays.values()))}, inputs, path)


def _images(files: list[Path], pre: ImagePreprocess, inputs: Sequence[InputSpec]) -> Iterator[dict[str, np.ndarray]]:
    if len(inputs) != 1:
        raise CalibrationError(f"image calibration data feeds one input; the model has {len(inputs)}")
    spec = inputs[0]
    hint = (f"--calib-preprocess gives {pre.channels} channel(s), layout {pre.layout}"
            + (f", crop {pre.crop[0]}x{pre.crop[1]}" if pre.crop else "") + "; state the model's")
    for f in files:
        x = pre.apply(read_image(f))[None]
        if np.dtype(spec.dtype).kind in "iu":  # pixels for an integer input: rounded, as image tools do
            x = np.clip(np.rint(x), *(np.iinfo(spec.dtype).min, np.iinfo(spec.dtype).max))
        yield {spec.name: fit(x, spec, f, hint)}


def _text(text: TextSource, inputs: Sequence[InputSpec], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(text.lines), batch_size):
        yield text.encode(text.lines[i:i + batch_size], inputs)


def _limited(batches: Iterator[dict[str, np.ndarray]], samples: Optional[int], batch_size: int,
             rebatch: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """At most ``samples`` samples; with ``rebatch``, in batches of ``batch_size`` along axis 0. The
    source is not read past the last sample needed."""
    left = samples if samples is not None else None
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    it = iter(batches)
    while left is None or left > 0:
        try:
            b = next(it)
        except StopIteration:
            break
        n = len(next(iter(b.values())))
        if left is not None:
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
