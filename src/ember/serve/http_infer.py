"""The HTTP inference endpoint as a plain ASGI handler.

`POST /v2/models/{model}[/versions/{version}]/infer` is the one endpoint a server answers thousands
of times a second, and Starlette's per-request machinery (its middleware stack, route matching over
every route, the Request object, the body stream) cost more CPU than the request's own work (see
docs/serve.md, "The server's CPU per request"). The guard in http_app.py hands these requests here
straight away; every other endpoint goes through Starlette. Behaviour is the same as a Starlette
route's: the guard has already checked the token, the size and the request limit; errors are JSON
bodies `{"error": ...}` with the status of their ServeError.
"""
from __future__ import annotations

import asyncio
import logging
import re
import zlib
from typing import Any, Callable

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from ..errors import EmberError
from .core import InferenceService
from .errors import BadRequestError, PayloadTooLargeError, ServeError, UnsupportedError
from .http_codec import HEADER_LENGTH, encode_infer_response, parse_infer_request
from .protocol import InferResponse

log = logging.getLogger("ember.serve")

OFFLOAD_BYTES = 256 << 10  # parse/encode bodies larger than this on a worker thread
# what Starlette's routes "/v2/models/{model}/infer" and ".../versions/{version}/infer" match ({x}: [^/]+)
INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
_HEADER_LENGTH = HEADER_LENGTH.lower().encode("latin-1")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The request body after its Content-Encoding (identity, gzip or deflate), at most ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedError(f"Content-Encoding '{encoding:.30}' is not supported; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequestError(f"the {encoding} request body is corrupt: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLargeError(f"the decompressed request body exceeds the limit of {limit} bytes")
    if not d.eof:
        raise BadRequestError(f"the {encoding} request body is truncated")
    return out


async def read_body(receive: Callable) -> bytes:
    """The whole body from ASGI messages: one join, so binary tensors are views of one buffer."""
    chunks = []
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise ClientDisconnect()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class InferEndpoint:
    """ASGI handler of one inference request; ``match`` is INFER_PATH's match of the request path."""

    def __init__(self, service: InferenceService):
        self.service = service
        self.limit = service.settings.max_request_size

    async def __call__(self, scope: dict, receive: Callable, send: Callable, match: re.Match) -> None:
        try:
            status, body, headers = await self._infer(scope, receive, match["model"], match["version"])
        except ServeError as e:
            if e.http_status >= 500 and not isinstance(e, PayloadTooLargeError):
                log.debug("POST %s -> %d: %s", scope["path"], e.http_status, e)
            return await error_response(e.http_status, str(e))(scope, receive, send)
        except EmberError as e:
            return await error_response(400, str(e))(scope, receive, send)
        except ClientDisconnect:  # the client went away mid-body (or a timeout / shutdown cut it): no one to answer
            self.service.count_error("http", "CANCELED")
            status, body, headers = 499, b"", []
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: log it, answer 500, keep serving
            log.exception("internal error on POST %s", scope["path"])
            self.service.count_error("http", "INTERNAL")
            return await error_response(500, f"internal server error: {type(e).__name__}: {e}")(scope, receive, send)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _infer(self, scope: dict, receive: Callable, model: str, version: str | None
                     ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        service = self.service
        encoding, header_length = "", None
        for k, v in scope["headers"]:  # uvicorn gives lower-case names
            if k == b"content-encoding":
                encoding = v.decode("latin-1")
            elif k == _HEADER_LENGTH:
                header_length = v.decode("latin-1")
        try:
            body = decode_body(await read_body(receive), encoding, self.limit)
            if _parse_work(body, header_length) > OFFLOAD_BYTES:
                req = await asyncio.to_thread(parse_infer_request, body, header_length, model, version)
            else:
                req = parse_infer_request(body, header_length, model, version)
        except ServeError as e:
            service.count_error("http", e.reason)
            raise
        resp = await service.infer(req, "http")
        default_binary = req.parameters.get("binary_data_output") is True
        if _encode_work(resp, default_binary) > OFFLOAD_BYTES:
            data, extra, media = await asyncio.to_thread(encode_infer_response, resp, default_binary)
        else:
            data, extra, media = encode_infer_response(resp, default_binary)
        headers = [(b"content-type", media.encode("latin-1"))]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        return 200, data, headers


# A thread hop costs the loop more than a small parse, so only work that grows with the data in Python
# goes to a thread: JSON text and BYTES elements. Binary numeric tensors are views of the body on the
# way in (parsing reads the JSON header only) and one memcpy on the way out.

def _parse_work(body: bytes, header_length: str | None) -> int:
    if header_length is None or not header_length.isascii() or not header_length.isdigit():
        return len(body)  # all JSON (or a bad header the parser reports)
    n = min(int(header_length), len(body))
    return len(body) if b'"BYTES"' in body[:n] else n


def _encode_work(resp: InferResponse, default_binary: bool) -> int:
    work = 0
    for o in resp.outputs:
        binary = default_binary if o.binary is None else o.binary
        if o.data.dtype == object or not (binary or o.datatype == "BF16"):
            work += o.data.nbytes if o.data.dtype != object else 16 * o.data.size
    return work


def infer_route(path: str, method: str) -> Any:
    """INFER_PATH's match when this request is an inference request, else None."""
    return INFER_PATH.fullmatch(path) if method == "POST" else None
