"""ModelInferRequest off the wire without copying its tensors, and ModelInferResponse onto it with
one copy of each.

protobuf copies every `bytes` field twice on the way to numpy: into the parsed message, then into a
Python `bytes` object when the field is read. A ResNet-50 request carries 300 KB in
`raw_input_contents`, so those copies cost more CPU than the rest of the request. The gRPC server
therefore deserializes ModelInfer and ModelStreamInfer requests here: one pass over the message's
top-level fields finds each `raw_input_contents` entry (field 7) and keeps it as a memoryview of the
received bytes; the other fields, which are small, are parsed by protobuf as usual. Anything this
scan does not expect is handed whole to protobuf, which parses it or raises its usual error.

On the way out it is the same in reverse: appending a tensor to `raw_output_contents` copies it into
the message and serializing copies it again, so ModelInfer responses are written here: protobuf
serializes the small fields, and each output's bytes follow as a `raw_output_contents` entry (field
6; protobuf readers accept a message's fields in any order), joined into the reply in one copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import grpc_service_pb2 as pb

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents (grpc_service.proto)
RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents
MAX_FIELDS = 4096  # a scan in Python stops here (a flood of tiny fields): protobuf's C parser takes over


class _Unexpected(Exception):
    pass


@dataclass
class WireInferRequest:
    """A parsed ModelInferRequest without its raw_input_contents, and those contents as views of the
    received message (None: the contents, if any, are in ``message`` as protobuf parsed them)."""

    message: pb.ModelInferRequest
    raw: list[memoryview] | None = None


@dataclass
class WireInferResponse:
    """A ModelInferResponse without its raw_output_contents, and those contents (views of the
    outputs, written after the message by ``write_infer_response``)."""

    message: pb.ModelInferResponse
    raw: list[bytes | memoryview]

    def to_message(self) -> pb.ModelInferResponse:
        """The whole message (for ModelStreamInfer, whose responses protobuf serializes)."""
        out = pb.ModelInferResponse()
        out.CopyFrom(self.message)
        out.raw_output_contents.extend(bytes(r) for r in self.raw)
        return out


_RAW_OUTPUT_TAG = bytes([RAW_OUTPUT_CONTENTS << 3 | 2])


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def write_infer_response(resp: WireInferResponse) -> bytes:
    """The gRPC response serializer of ModelInfer."""
    parts: list[bytes | memoryview] = [resp.message.SerializeToString()]
    for r in resp.raw:
        parts += (_RAW_OUTPUT_TAG, _varint_bytes(len(r)), r)
    return b"".join(parts)


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise _Unexpected
        b = view[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def read_infer_request(data: bytes) -> WireInferRequest:
    """The gRPC request deserializer of ModelInfer / ModelStreamInfer."""
    view = memoryview(data)
    n = len(view)
    raw: list[memoryview] = []
    kept: list[memoryview] = []  # the other fields, in order
    pos = start = fields = 0
    try:
        while pos < n:
            fields += 1
            if fields > MAX_FIELDS:
                raise _Unexpected
            tag, p = _varint(view, pos)
            wire = tag & 7
            if wire == 0:
                _, p = _varint(view, p)
            elif wire == 1:
                p += 8
            elif wire == 2:
                size, p = _varint(view, p)
                if tag >> 3 == RAW_INPUT_CONTENTS:
                    if p + size > n:
                        raise _Unexpected
                    kept.append(view[start:pos])
                    raw.append(view[p:p + size])
                    start = p + size
                p += size
            elif wire == 5:
                p += 4
            else:  # groups (deprecated) or garbage
                raise _Unexpected
            if p > n:
                raise _Unexpected
            pos = p
    except _Unexpected:
        return WireInferRequest(pb.ModelInferRequest.FromString(data))
    if not raw:
        return WireInferRequest(pb.ModelInferRequest.FromString(data))
    kept.append(view[start:])
    return WireInferRequest(pb.ModelInferRequest.FromString(b"".join(kept)), raw)
