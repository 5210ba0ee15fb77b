"""OpenAI-compatible endpoints on the HTTP port, for the LLM engines of the repository:

    GET  /v1/models             the ready LLM models
    POST /v1/completions        prompt(s) -> text; ``stream`` sends server-sent events ending with [DONE]
    POST /v1/chat/completions   messages -> the assistant's reply, through the model's chat template

The server's guard applies as to every route (bearer token, request size, connection cap). Errors have
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 404 for an
unknown model, 429 when the engine's queue is full (clients back off and retry), 503 when the model is
not ready or its engine stopped. A client that disconnects (streaming or not) aborts its requests, which
frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..llm.errors import EngineDeadError, QueueFullError, RequestError
from ..llm.outputs import RequestOutput
from ..llm.sampling import SamplingParams
from . import openai_protocol as proto
from .errors import ModelNotFoundError, ServeError
from .http_codec import loads_json
from .llm_model import LLMServedModel

log = logging.getLogger("ember.serve")


class _APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: Optional[str] = None, reason: str = "OTHER"):
        super().__init__(message)
        self.status, self.kind, self.code, self.reason = status, kind, code, reason


def _error_response(e: _APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code}},
                        status_code=e.status)


def _as_api_error(e: BaseException) -> _APIError:
    if isinstance(e, _APIError):
        return e
    if isinstance(e, RequestError):
        return _APIError(400, str(e), "invalid_request_error", reason="INVALID_INPUT")
    if isinstance(e, QueueFullError):
        return _APIError(429, str(e), "rate_limit_error", "queue_full", "QUEUE_FULL")
    if isinstance(e, EngineDeadError):
        return _APIError(503, str(e), "service_unavailable", reason="UNAVAILABLE")
    if isinstance(e, ModelNotFoundError):
        return _APIError(404, str(e), "invalid_request_error", "model_not_found", "NOT_FOUND")
    if isinstance(e, ServeError):
        kind = "service_unavailable" if e.http_status == 503 else "invalid_request_error"
        return _APIError(e.http_status, str(e), kind, reason=e.reason)
    log.exception("internal error in an OpenAI endpoint")
    return _APIError(500, f"internal server error: {type(e).__name__}: {e}", "server_error", reason="INTERNAL")


class _EventStream(StreamingResponse):
    """Server-sent events that stop as soon as the client goes away (the body iterator is cancelled, which
    aborts its requests), whatever ASGI spec version the server speaks."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(watch)
        try:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self.on_close()  # the requests, even if the events never started


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work``; if the client disconnects first, cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientDisconnect()
    return task.result()


class _Job:
    """One choice: which prompt, its token ids, its parameters."""

    def __init__(self, index: int, ids: list[int], params: SamplingParams):
        self.index, self.ids, self.params = index, ids, params


def _jobs(prompts: list[list[int]], parsed: proto.Parsed, max_model_len: int, chat: bool) -> list[_Job]:
    jobs = []
    for p, ids in enumerate(prompts):
        room = max_model_len - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens; this model runs at most {max_model_len} tokens per "
                               "sequence, so the prompt must be shorter")
        for k in range(parsed.n):
            params = dataclasses.replace(parsed.params)
            if not parsed.max_tokens_given and chat:
                params.max_tokens = room
            elif params.max_tokens > room:
                raise RequestError(f"max_tokens is {params.max_tokens}, but the prompt of {len(ids)} tokens leaves "
                                   f"room for {room} in this model's {max_model_len}-token context")
            if params.seed is not None and k:
                params.seed = params.seed + k  # n samples of one seeded request differ, reproducibly
            jobs.append(_Job(p * parsed.n + k, ids, params))
    return jobs


def openai_routes(service: Any) -> list[Route]:
    """The routes, for build_http_app to add to the HTTP port."""

    def find(name: str) -> LLMServedModel:
        m = service.repository.get(name, None)
        if not isinstance(m, LLMServedModel):
            raise ModelNotFoundError(f"model '{name}' is not an LLM (it serves KServe v2 only); GET /v1/models lists "
                                     "the LLM models")
        return m

    def llm_models() -> list[LLMServedModel]:
        newest: dict[str, LLMServedModel] = {}
        for m in service.repository.served():
            if isinstance(m, LLMServedModel) and m.state == "READY":
                if m.name not in newest or int(m.version) > int(newest[m.name].version):
                    newest[m.name] = m
        return [newest[k] for k in sorted(newest)]

    def handler(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            try:
                if service.shutting_down:
                    raise EngineDeadError("the server is shutting down and takes no new requests")
                return await fn(request)
            except ClientDisconnect:
                service.count_error("http", "CANCELED")
                return Response(status_code=499)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = _as_api_error(e)
                service.count_error("http", err.reason)
                return _error_response(err)
        return run

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        return loads_json(raw, "the request body") if raw.strip() else {}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "ember",
             "max_model_len": m.engine.max_model_len if m.engine is not None else None} for m in llm_models()]})

    async def completions(request: Request) -> Response:
        body = await body_of(request)
        parsed = proto.parse_common(body, chat=False)
        model = find(parsed.model)
        llm = model.running()
        prompts = [llm.engine.prompt_ids(p) for p in proto.parse_prompts(body)]
        jobs = _jobs(prompts, parsed, llm.engine.max_model_len, chat=False)
        return await _serve(request, model, parsed, jobs, chat=False, prompts=len(prompts))

    async def chat(request: Request) -> Response:
        body = await body_of(request)
        parsed = proto.parse_common(body, chat=True)
        model = find(parsed.model)
        llm = model.running()
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RequestError("'chat_template_kwargs' must be an object")
        ids = llm.engine.tokenizer.chat_prompt_ids(proto.chat_messages(body), **kwargs)
        jobs = _jobs([ids], parsed, llm.engine.max_model_len, chat=True)
        return await _serve(request, model, parsed, jobs, chat=True, prompts=1)

    async def _serve(request: Request, model: LLMServedModel, parsed: proto.Parsed, jobs: list[_Job], chat: bool,
                     prompts: int) -> Response:
        rid = proto.new_id("chatcmpl" if chat else "cmpl")
        want_lp = parsed.params.logprobs is not None
        if parsed.stream:
            # admitted before the response starts: a full queue is a 429, not a broken stream
            llm = model.running()
            streams: list[Any] = []
            try:
                for j in jobs:
                    streams.append(llm.submit(j.ids, j.params))
            except BaseException:
                for st in streams:
                    llm.abort(st.id)
                raise
            return _EventStream(_events(model, parsed, jobs, streams, rid, chat, want_lp, prompts),
                                lambda: [llm.abort(s.id) for s in streams])
        start = time.monotonic_ns()
        model.inflight += 1
        try:
            choices = await _unless_disconnected(request, _collect(model, jobs))
        except ClientDisconnect:
            model.record(False, start, "CANCELED")
            raise
        except BaseException as e:
            model.record(False, start, _as_api_error(e).reason if isinstance(e, Exception) else "CANCELED")
            raise
        finally:
            model.inflight -= 1
        model.record(True, start)
        out = proto.chat_body(rid, parsed.model, choices, want_lp) if chat else \
            proto.completion_body(rid, parsed.model, choices, want_lp, prompts)
        return JSONResponse(out)

    async def _collect(model: LLMServedModel, jobs: list[_Job]) -> list[proto.Choice]:
        llm = model.running()

        async def one(job: _Job) -> proto.Choice:
            c = proto.Choice(job.index)
            async for out in llm.generate(job.ids, job.params):
                c.add(out)
            return c

        return list(await asyncio.gather(*(one(j) for j in jobs)))

    async def _events(model: LLMServedModel, parsed: proto.Parsed, jobs: list[_Job], streams: list[Any], rid: str,
                      chat: bool, want_lp: bool, prompts: int) -> AsyncIterator[str]:
        llm = model.llm
        created = int(time.time())
        name = parsed.model
        merged: asyncio.Queue = asyncio.Queue()
        choices = {j.index: proto.Choice(j.index) for j in jobs}
        offsets = {j.index: 0 for j in jobs}
        start = time.monotonic_ns()
        model.inflight += 1

        async def pump(job: _Job, stream: Any) -> None:
            try:
                async for out in llm.consume(stream):
                    await merged.put((job.index, out))
            except Exception as e:
                await merged.put((job.index, e))

        tasks = [asyncio.ensure_future(pump(j, s)) for j, s in zip(jobs, streams)]
        ok = False
        try:
            if chat:
                for j in jobs:
                    yield _sse(proto.chat_chunk(rid, name, created, j.index, {"role": "assistant", "content": ""},
                                                None))
            left = len(jobs)
            while left:
                index, item = await merged.get()
                if isinstance(item, Exception):
                    err = _as_api_error(item)
                    yield _sse({"error": {"message": str(err), "type": err.kind, "param": None, "code": err.code}})
                    break
                out: RequestOutput = item
                choices[index].add(out)
                if chat:
                    if out.text or out.logprobs and want_lp:
                        yield _sse(proto.chat_chunk(rid, name, created, index, {"content": out.text}, None,
                                                    out.logprobs if want_lp else None))
                    if out.finished:
                        yield _sse(proto.chat_chunk(rid, name, created, index, {}, choices[index].finish_reason))
                else:
                    yield _sse(proto.completion_chunk(rid, name, created, index, out, want_lp, offsets[index]))
                    offsets[index] += len(out.text)
                if out.finished:
                    left -= 1
            else:
                ok = True
                if parsed.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse(proto.usage_chunk(rid, name, created, obj, list(choices.values()), prompts))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            model.inflight -= 1
            model.record(ok, start, "OTHER" if ok else "CANCELED")

    return [Route("/v1/models", handler(models), methods=["GET"]),
            Route("/v1/completions", handler(completions), methods=["POST"]),
            Route("/v1/chat/completions", handler(chat), methods=["POST"])]
