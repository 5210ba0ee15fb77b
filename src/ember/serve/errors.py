"""Errors the server answers with. Each carries its HTTP status, gRPC status code and a
Prometheus failure reason, so the HTTP and gRPC front ends map them the same way."""
from __future__ import annotations

from ..errors import EmberError


class ServeError(EmberError):
    """Base of the errors a request can get back. The message is sent to the client as is."""

    http_status: int = 400
    grpc_code: str = "INVALID_ARGUMENT"  # name of a grpc.StatusCode member
    reason: str = "OTHER"  # `reason` label of nv_inference_request_failure


class BadRequestError(ServeError):
    """Malformed request: bad JSON, wrong input name, dtype, shape, truncated binary data."""

    reason = "INVALID_INPUT"


class ModelNotFoundError(ServeError):
    """No such model or version in the repository, or it is not loaded."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "NOT_FOUND"


class ModelNotReadyError(ServeError):
    """The model exists but is loading, unloading or failed to load."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class QueueFullError(ServeError):
    """The model's request queue is at its size limit; the client should back off and retry."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "QUEUE_FULL"


class RequestTimeoutError(ServeError):
    """The request waited in the queue longer than its timeout and was not run."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    reason = "TIMEOUT"


class PayloadTooLargeError(ServeError):
    """The request body is larger than --max-request-size."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "TOO_LARGE"


class UnauthorizedError(ServeError):
    """Missing or wrong bearer token."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class ControlDisabledError(ServeError):
    """Repository load/unload was asked for but the server runs with --model-control-mode none."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    reason = "CONTROL_DISABLED"


class UnsupportedError(ServeError):
    """A protocol extension ember does not implement (shared memory, tracing, ...)."""

    http_status = 400
    grpc_code = "UNIMPLEMENTED"
    reason = "UNSUPPORTED"


class ShuttingDownError(ServeError):
    """The server is draining after SIGTERM and accepts no new requests."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class InferenceFailedError(ServeError):
    """The engine raised while running the request: a server-side fault, not the client's."""

    http_status = 500
    grpc_code = "INTERNAL"
    reason = "BACKEND"


class RepositoryError(EmberError):
    """The model repository or a model's configuration is invalid. Raised at load time."""


class ServeStartupError(RepositoryError):
    """The server could not start: a port is busy, the bind address is exposed without a token, or a
    model failed to load with --strict."""
