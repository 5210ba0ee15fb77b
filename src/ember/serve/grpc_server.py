"""KServe v2 gRPC front end: `inference.GRPCInferenceService` on grpc.aio, same semantics as HTTP."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

import grpc
import numpy as np
from google.protobuf import json_format

from ..errors import EmberError
from . import grpc_service_pb2 as pb
from . import grpc_service_pb2_grpc as pb_grpc
from .core import InferenceService
from .datatypes import KSERVE_TO_NUMPY, element_count, tensor_from_raw, tensor_raw_view
from .errors import BadRequestError, ServeError, UnsupportedError
from .grpc_wire import WireInferRequest, WireInferResponse, read_infer_request, write_infer_response
from .http_codec import MAX_RANK
from .protocol import InferRequest, InferResponse, RequestedOutput, request_parameter_int

log = logging.getLogger("ember.serve")

# datatype -> InferTensorContents field holding it
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_grpc_request(req: pb.ModelInferRequest | WireInferRequest) -> InferRequest:
    """A ModelInferRequest (or one read by grpc_wire, whose raw contents are views of the received
    message) as an InferRequest; binary tensors become numpy views of the contents, checked for size."""
    raw: Any
    if isinstance(req, WireInferRequest):
        req, raw = req.message, req.raw
        if raw is None:
            raw = req.raw_input_contents
    else:
        raw = req.raw_input_contents
    params = {k: _param(v) for k, v in req.parameters.items()} if req.parameters else {}
    priority = request_parameter_int(params, "priority", "request") or 0 if params else 0
    timeout = request_parameter_int(params, "timeout", "request") if params else None
    if raw and len(raw) != len(req.inputs):
        raise BadRequestError(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs; send one "
                              "per input, in the order of 'inputs'")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for i, t in enumerate(req.inputs):
        name, dt = t.name, t.datatype
        if not name:
            raise BadRequestError(f"inputs[{i}] needs a name")
        if name in inputs:
            raise BadRequestError(f"input '{name}' appears twice")
        if dt not in KSERVE_TO_NUMPY:
            raise BadRequestError(f"input '{name}': datatype must be one of {', '.join(KSERVE_TO_NUMPY)}, "
                                  f"got {dt!r:.50}")
        if len(t.shape) > MAX_RANK or any(d < 0 for d in t.shape):
            raise BadRequestError(f"input '{name}': shape {list(t.shape)[:MAX_RANK + 1]} must be at most {MAX_RANK} "
                                  "non-negative dims")
        shape = tuple(t.shape)
        if "shared_memory_region" in t.parameters:
            raise UnsupportedError(f"input '{name}': the shared-memory extension is not supported by ember")
        if raw:
            arr = tensor_from_raw(raw[i], dt, shape, name)
        else:
            arr = _from_contents(t.contents, dt, shape, name)
        inputs[name] = arr
        datatypes[name] = dt
    outputs = None
    if req.outputs:
        outputs = []
        for o in req.outputs:
            k = _param(o.parameters["classification"]) if "classification" in o.parameters else 0
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise BadRequestError(f"output '{o.name}': classification must be a non-negative integer")
            outputs.append(RequestedOutput(o.name, None, k))
    return InferRequest(req.model_name, req.model_version or None, inputs, datatypes, outputs, req.id, priority,
                        timeout, params)


def _from_contents(contents: Any, dt: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(dt)
    if field is None:
        raise BadRequestError(f"input '{name}': {dt} tensors must be sent in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise BadRequestError(f"input '{name}': shape {list(shape)} needs {count} elements, {field} has {len(values)}")
    if dt == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    target = KSERVE_TO_NUMPY[dt]
    wide = np.asarray(values)
    if target.kind in "iu" and count:
        info = np.iinfo(target)
        if wide.min() < info.min or wide.max() > info.max:
            raise BadRequestError(f"input '{name}': a value is outside the {dt} range")
    return wide.astype(target).reshape(shape)


def encode_grpc_response(resp: InferResponse) -> WireInferResponse:
    """The response with each output as a view of its array: write_infer_response copies it once."""
    out = pb.ModelInferResponse(model_name=resp.model, model_version=resp.version, id=resp.id)
    raw = []
    for o in resp.outputs:
        out.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.data.shape))
        raw.append(tensor_raw_view(o.data, o.datatype))
    return WireInferResponse(out, raw)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: InferenceService):
        self.service = service

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args: Any) -> Any:
        try:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except Exception as e:
            await self._abort(context, e, fn)

    async def _abort(self, context: grpc.aio.ServicerContext, e: Exception, fn: Any) -> None:
        """End the call with the status of ``e`` (raised by ``fn``)."""
        if isinstance(e, ServeError):
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), str(e))
        if isinstance(e, EmberError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if isinstance(e, grpc.aio.AbortError):
            raise e
        # a bug of ours: log it, answer INTERNAL, keep serving
        log.error("internal error in gRPC %s", getattr(fn, "__name__", fn), exc_info=e)
        self.service.count_error("grpc", "INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(e).__name__}: {e}")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def ModelMetadata(self, request, context):
        doc = await self._call(context, self.service.model_metadata, request.name, request.version or None)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        config = await self._call(context, self.service.model_config, request.name, request.version or None)
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        doc = await self._call(context, self.service.statistics, request.name or None, request.version or None)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        out = pb.RepositoryIndexResponse()
        for e in self.service.repository_index(request.ready):
            out.models.add(**e)
        return out

    async def RepositoryModelLoad(self, request, context):
        params = {k: _param(v) for k, v in request.parameters.items()}
        await self._call(context, self.service.load_model, request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        params = {k: _param(v) for k, v in request.parameters.items()}
        await self._call(context, self.service.unload_model, request.model_name, params)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest | WireInferRequest) -> WireInferResponse:
        try:
            req = parse_grpc_request(request)
        except ServeError as e:
            self.service.count_error("grpc", e.reason)
            raise
        resp = await self.service.infer(req, "grpc")
        return encode_grpc_response(resp)

    async def ModelInfer(self, request, context):
        try:  # not through _call: this one runs thousands of times a second
            return await self._infer(request)
        except Exception as e:
            await self._abort(context, e, self._infer)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> AsyncIterator:
        """Requests of one stream run concurrently (so they can share batches); responses come back
        as they finish, each carrying its request's id."""
        results: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ModelInferRequest | WireInferRequest) -> None:
            try:
                resp = await self._infer(req)
                await results.put(pb.ModelStreamInferResponse(infer_response=resp.to_message()))
            except ServeError as e:
                await results.put(_stream_error(req, str(e)))
            except EmberError as e:
                await results.put(_stream_error(req, str(e)))
            except Exception as e:
                log.exception("internal error in gRPC ModelStreamInfer")
                await results.put(_stream_error(req, f"internal server error: {type(e).__name__}: {e}"))

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    t = asyncio.get_running_loop().create_task(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await results.put(None)

        read_task = asyncio.get_running_loop().create_task(reader())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()

    async def _unsupported(self, context, what: str):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{what} is not supported by ember serve; send tensors in the request instead")

    async def SystemSharedMemoryStatus(self, request, context):
        await self._unsupported(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request, context):
        await self._unsupported(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request, context):
        await self._unsupported(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request, context):
        await self._unsupported(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request, context):
        await self._unsupported(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._unsupported(context, "CUDA shared memory")

    async def TraceSetting(self, request, context):
        await self._unsupported(context, "tracing")

    async def LogSettings(self, request, context):
        await self._unsupported(context, "log settings")


def _stream_error(req: pb.ModelInferRequest | WireInferRequest, message: str) -> pb.ModelStreamInferResponse:
    if isinstance(req, WireInferRequest):
        req = req.message
    return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
        model_name=req.model_name, model_version=req.model_version, id=req.id))


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: InferenceService):
        self.service = service
        self._public = {"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"}

    async def intercept_service(self, continuation, details):
        if details.method in self._public:
            return await continuation(details)
        auth = dict(details.invocation_metadata or ()).get("authorization")
        try:
            self.service.check_auth(auth)
        except ServeError as e:
            self.service.count_error("grpc", e.reason)
            message = str(e)

            async def deny_unary(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            async def deny_stream(request_iterator, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            handler = await continuation(details)
            if handler is not None and handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(deny_stream)
            return grpc.unary_unary_rpc_method_handler(deny_unary)
        return await continuation(details)


def build_grpc_server(service: InferenceService, reuse_port: bool = False) -> grpc.aio.Server:
    """``reuse_port``: several front-end processes listen on one port (--frontends)."""
    limit = service.settings.max_request_size
    interceptors = [_AuthInterceptor(service)] if service.auth_required else []
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1),
               ("grpc.so_reuseport", 1 if reuse_port else 0),
               # a connection must finish the HTTP/2 handshake as fast as an HTTP client its headers
               ("grpc.server_handshake_timeout_ms", max(1, int(service.settings.header_timeout_s * 1000)))]
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=service.settings.max_connections)
    servicer = InferenceServicer(service)
    # inference requests are read by grpc_wire (tensors stay views of the received bytes); the server
    # asks its handlers in the order they were added, so these come before the generated ones
    zero_copy = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfer, request_deserializer=read_infer_request,
            response_serializer=write_infer_response),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            servicer.ModelStreamInfer, request_deserializer=read_infer_request,
            response_serializer=pb.ModelStreamInferResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                          zero_copy),))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return server
