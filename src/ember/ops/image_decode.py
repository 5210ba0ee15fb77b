"""ImageDecoder for the lossless formats numpy and zlib can decode: PNG, BMP, PNM, uncompressed TIFF.

JPEG, JPEG 2000 and WebP need a codec library ember does not depend on: those streams raise a
clear error. Decoding is host work; the image is moved to the input's device afterwards.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from .registry import op


class _Unsupported(ValueError):
    pass


# -- PNG ------------------------------------------------------------------------------------------
def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 2:  # Up
            cur = (line + prev) & 0xFF
        elif kind == 1:  # Sub: a running sum per channel
            cur = (np.cumsum(line.reshape(-1, bpp), axis=0) & 0xFF).reshape(-1)
        else:  # Average, Paeth: sequential in x
            cur = line.copy()
            for x in range(stride):
                a = int(cur[x - bpp]) if x >= bpp else 0
                b = int(prev[x])
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    c = int(prev[x - bpp]) if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (cur[x] + pred) & 0xFF
        out[y] = cur
        prev = cur.astype(np.int32)
    return out


def _decode_png(data: bytes) -> np.ndarray:
    pos, idat, palette = 8, b"", None
    width = height = depth = color = interlace = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    if depth != 8 or interlace:
        raise _Unsupported("PNG with bit depth other than 8 or interlacing")
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    px = _unfilter(zlib.decompress(idat), height, width * channels, channels).reshape(height, width, channels)
    if color == 3:
        return palette[px[..., 0]]
    if color in (0, 4):
        return np.repeat(px[..., :1], 3, axis=2)
    return px[..., :3]


# -- BMP, PNM, TIFF -------------------------------------------------------------------------------
def _decode_bmp(data: bytes) -> np.ndarray:
    offset = struct.unpack("<I", data[10:14])[0]
    width, height, _, bpp, compression = struct.unpack("<iiHHI", data[18:34])
    if compression not in (0, 3) or bpp not in (24, 32):
        raise _Unsupported(f"BMP with {bpp} bits per pixel / compression {compression}")
    channels = bpp // 8
    stride = (width * channels + 3) // 4 * 4
    rows = np.frombuffer(data, dtype=np.uint8, count=stride * abs(height), offset=offset).reshape(abs(height), stride)
    px = rows[:, :width * channels].reshape(abs(height), width, channels)[..., [2, 1, 0]]
    return px[::-1] if height > 0 else px  # positive height: stored bottom-up


def _decode_pnm(data: bytes) -> np.ndarray:
    fields, pos = [], 2
    while len(fields) < 3:
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while not data[pos:pos + 1].isspace():
            pos += 1
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if maxval > 255 or data[:2] not in (b"P5", b"P6"):
        raise _Unsupported("PNM other than binary 8-bit P5/P6")
    channels = 3 if data[:2] == b"P6" else 1
    px = np.frombuffer(data, dtype=np.uint8, count=width * height * channels, offset=pos + 1)
    px = px.reshape(height, width, channels)
    return px if channels == 3 else np.repeat(px, 3, axis=2)


def _decode_tiff(data: bytes) -> np.ndarray:
    e = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(e + "I", data[4:8])[0]
    tags: dict[int, list[int]] = {}
    sizes = {1: (1, "B"), 3: (2, "H"), 4: (4, "I")}
    for i in range(struct.unpack(e + "H", data[ifd:ifd + 2])[0]):
        tag, typ, count, value = struct.unpack(e + "HHI4s", data[ifd + 2 + 12 * i: ifd + 14 + 12 * i])
        if typ not in sizes:
            continue
        size, fmt = sizes[typ]
        raw = value if size * count <= 4 else data[struct.unpack(e + "I", value)[0]:][: size * count]
        tags[tag] = list(struct.unpack(e + fmt * count, raw[: size * count]))
    width, height = tags[256][0], tags[257][0]
    spp = tags.get(277, [1])[0]
    if tags.get(259, [1])[0] != 1 or tags.get(258, [8])[0] != 8 or tags.get(284, [1])[0] != 1:
        raise _Unsupported("TIFF other than uncompressed, 8-bit, interleaved")
    strips = b"".join(data[o:o + n] for o, n in zip(tags[273], tags[279]))
    px = np.frombuffer(strips, dtype=np.uint8, count=width * height * spp).reshape(height, width, spp)
    return px[..., :3] if spp >= 3 else np.repeat(px[..., :1], 3, axis=2)


def decode_rgb(data: bytes) -> np.ndarray:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _decode_png(data)
    if data[:2] == b"BM":
        return _decode_bmp(data)
    if data[:2] in (b"P5", b"P6"):
        return _decode_pnm(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _decode_tiff(data)
    raise _Unsupported("JPEG, JPEG 2000, WebP and other compressed formats need a codec library")


@op("ImageDecoder", kind="other")
def image_decoder(encoded_stream, *, pixel_format: str = "RGB"):
    data = encoded_stream.detach().cpu().numpy().astype(np.uint8).tobytes()
    try:
        rgb = decode_rgb(data)
    except _Unsupported as e:
        raise ValueError(f"ImageDecoder: {e}; ember decodes PNG, BMP, PNM and uncompressed TIFF") from None
    if pixel_format == "BGR":
        img = rgb[..., ::-1]
    elif pixel_format == "Grayscale":  # ITU-R 601-2 luma, rounded as PIL does
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        img = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]
    else:
        img = rgb
    return torch.from_numpy(np.array(img, copy=True)).to(encoded_stream.device)
