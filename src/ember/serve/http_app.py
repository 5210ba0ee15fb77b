"""KServe v2 HTTP/REST front end (with Triton's extensions), as a Starlette ASGI app.

Every error is a JSON body `{"error": "..."}` with a 4xx/5xx status; a handler never lets an
exception escape, so a bad request cannot take the server down.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import EmberError
from .config import message_json
from .core import InferenceService
from .errors import BadRequestError, PayloadTooLargeError, ServeError, UnsupportedError
from .http_codec import loads_json
from .http_infer import INFER_PATH, InferEndpoint, decode_body, error_response, infer_route
from .openai_app import openai_routes

log = logging.getLogger("ember.serve")

PUBLIC_PATHS = ("/v2/health/live", "/v2/health/ready")
Handler = Callable[[Request], Awaitable[Response]]


_error = error_response


class _Guard:
    """ASGI middleware: bearer-token auth, the request-size limit and the limit on requests being
    handled, before any handler runs. Inference requests then go to their own handler
    (http_infer.py), everything else to Starlette."""

    def __init__(self, app: Any, service: InferenceService, metrics_public: bool,
                 infer: InferEndpoint | None = None):
        self.app = app
        self.service = service
        self.infer = infer
        self.limit = service.settings.max_request_size
        self.max_active = service.settings.max_connections
        self.active = 0
        self.public = PUBLIC_PATHS + (("/metrics",) if metrics_public else ())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        authorization = length = None
        for k, v in scope.get("headers", ()):  # the two this guard reads (ASGI servers give lower-case names)
            if k == b"authorization":
                authorization = v.decode("latin-1")
            elif k == b"content-length":
                length = v.decode("latin-1")
        if self.service.auth_required and scope["path"] not in self.public:
            try:
                self.service.check_auth(authorization)
            except ServeError as e:
                self.service.count_error("http", e.reason)
                resp = _error(e.http_status, str(e), {"WWW-Authenticate": 'Bearer realm="ember"'})
                return await resp(scope, receive, send)
        if length is not None and length.isascii() and length.isdigit() and int(length) > self.limit:
            self.service.count_error("http", PayloadTooLargeError.reason)
            resp = _error(413, f"request body of {length} bytes exceeds the limit of {self.limit} bytes "
                               "(--max-request-size)")
            return await resp(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLargeError(f"request body exceeds the limit of {self.limit} bytes "
                                               "(--max-request-size)")
            return message

        if self.active >= self.max_active and scope["path"] not in PUBLIC_PATHS:
            self.service.count_error("http", "OVERLOADED")
            resp = _error(503, f"the server is handling {self.active} requests, its limit (--max-connections); "
                               "retry with backoff")
            return await resp(scope, receive, send)
        self.active += 1
        try:
            match = infer_route(scope["path"], scope["method"]) if self.infer is not None else None
            if match is not None:
                await self.infer(scope, limited_receive, send, match)
            else:
                await self.app(scope, limited_receive, send)
        finally:
            self.active -= 1


def _route(service: InferenceService, fn: Handler) -> Handler:
    async def handler(request: Request) -> Response:
        try:
            return await fn(request)
        except ServeError as e:
            if e.http_status >= 500 and not isinstance(e, (PayloadTooLargeError,)):
                log.debug("%s %s -> %d: %s", request.method, request.url.path, e.http_status, e)
            return _error(e.http_status, str(e))
        except EmberError as e:
            return _error(400, str(e))
        except ClientDisconnect:  # the client went away mid-body (or a timeout / shutdown cut it): no one to answer
            service.count_error("http", "CANCELED")
            return Response(status_code=499)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug of ours: log it, answer 500, keep serving
            log.exception("internal error on %s %s", request.method, request.url.path)
            service.count_error("http", "INTERNAL")
            return _error(500, f"internal server error: {type(e).__name__}: {e}")

    return handler


async def _body(request: Request, limit: int) -> bytes:
    return decode_body(await request.body(), request.headers.get("content-encoding", "identity"), limit)


async def _json_body(request: Request, limit: int) -> dict:
    body = await _body(request, limit)
    if not body.strip():
        return {}
    doc = loads_json(body, "the request body")
    if not isinstance(doc, dict):
        raise BadRequestError("the request body must be a JSON object")
    return doc


def build_http_app(service: InferenceService, metrics_here: bool = True) -> Any:
    """The ASGI app of the HTTP port. `metrics_here`: serve /metrics on it too."""
    limit = service.settings.max_request_size
    infer = InferEndpoint(service)

    def version_of(request: Request) -> str | None:
        return request.path_params.get("version")

    # KServe v2: health answers are the status code alone, 200 for true and 4xx for false
    async def live(request: Request) -> Response:
        return Response(status_code=200 if service.live() else 400)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if service.ready() else 400)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(service.server_metadata())

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(service.model_metadata(request.path_params["model"], version_of(request)))

    async def model_ready(request: Request) -> Response:
        ok = service.model_ready(request.path_params["model"], version_of(request))
        return Response(status_code=200 if ok else 400)

    async def model_config(request: Request) -> Response:
        return JSONResponse(message_json(service.model_config(request.path_params["model"], version_of(request))))

    async def model_stats(request: Request) -> Response:
        return JSONResponse(service.statistics(request.path_params.get("model"), version_of(request)))

    async def repo_index(request: Request) -> Response:
        doc = await _json_body(request, limit)
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequestError("'ready' must be true or false")
        return JSONResponse(service.repository_index(ready_only))

    async def repo_load(request: Request) -> Response:
        doc = await _json_body(request, limit)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError("'parameters' must be a JSON object")
        await service.load_model(request.path_params["model"], params)
        return Response(status_code=200)

    async def repo_unload(request: Request) -> Response:
        doc = await _json_body(request, limit)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError("'parameters' must be a JSON object")
        await service.unload_model(request.path_params["model"], params)
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        # on the loop thread: the collectors read model state the loop owns (and it takes ~1 ms)
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def unsupported(request: Request) -> Response:
        raise UnsupportedError(f"{request.url.path} is not supported by ember serve (shared memory, tracing and "
                               "log settings are Triton extensions ember does not implement)")

    def r(path: str, fn: Handler, methods: list[str]) -> Route:
        return Route(path, _route(service, fn), methods=methods)

    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    routes = [
        r("/v2/health/live", live, ["GET"]),
        r("/v2/health/ready", ready, ["GET"]),
        r("/v2", server_metadata, ["GET"]),
        r("/v2/models/stats", model_stats, ["GET"]),
        r("/v2/repository/index", repo_index, ["POST"]),
        r("/v2/repository/models/{model}/load", repo_load, ["POST"]),
        r("/v2/repository/models/{model}/unload", repo_unload, ["POST"]),
    ]
    for base in (m, mv):
        routes += [
            r(base, model_metadata, ["GET"]),
            r(base + "/ready", model_ready, ["GET"]),
            r(base + "/config", model_config, ["GET"]),
            r(base + "/stats", model_stats, ["GET"]),
            # answered by the guard (http_infer.py); here so that other methods get 405 like any route
            Route(base + "/infer", lambda scope, receive, send: infer(scope, receive, send,
                                                                       INFER_PATH.fullmatch(scope["path"])),
                  methods=["POST"]),
        ]
    for prefix in ("/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/trace", "/v2/logging"):
        routes += [r(prefix, unsupported, ["GET", "POST"]), r(prefix + "/{rest:path}", unsupported, ["GET", "POST"])]
    routes += openai_routes(service)  # /v1/...: the LLM engines of the repository (openai_app.py)
    if metrics_here:
        routes.append(r("/metrics", metrics, ["GET"]))

    app = Starlette(routes=routes)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(status, f"no endpoint {request.url.path}; see the KServe v2 protocol "
                              "(e.g. /v2/models/<name>/infer)")

    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_found)
    return _Guard(app, service, metrics_public=False, infer=infer)


def build_metrics_app(service: InferenceService) -> Any:
    """The app of a separate --metrics-port: /metrics only."""
    async def metrics(request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app = Starlette(routes=[Route("/metrics", metrics, methods=["GET"])])
    return _Guard(app, service, metrics_public=False)
