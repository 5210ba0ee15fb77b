"""The inference service both front ends (HTTP and gRPC) call: health, metadata, repository
control, statistics and inference. Protocol-neutral; errors are ServeError subclasses."""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EmberError
from . import model_config_pb2 as mc
from .config import ModelConfig, config_from_json
from .errors import (BadRequestError, ControlDisabledError, ServeError, ServeStartupError, ShuttingDownError,
                     UnauthorizedError)
from .metrics import ServerMetrics
from .model import PLATFORM, ModelSettings, ServedModel
from .protocol import InferRequest, InferResponse
from .repository import ModelRepository

log = logging.getLogger("ember.serve")

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "parameters",
              "schedule_policy", "statistics"]


def ember_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ember")
    except PackageNotFoundError:
        return "0.0.0+dev"


@dataclass
class ServerSettings:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int | None = 8000  # None: no HTTP front end; 0: any free port
    grpc_port: int | None = 8001  # None: no gRPC front end
    metrics_port: int | None = None  # None: /metrics on the HTTP port
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: list[str] | None = None  # models loaded at startup; None: all (explicit mode: see docs)
    poll_interval_s: float = 15.0
    auth_token: str | None = None
    max_request_size: int = 64 << 20
    max_queue_size: int = 1024  # per model and priority level, where the config says 0
    max_connections: int = 2048  # concurrent HTTP requests / gRPC calls before 503 / RESOURCE_EXHAUSTED
    max_connections_per_client: int = 512  # open HTTP connections from one address
    header_timeout_s: float = 10.0  # to send a request's headers (also the gRPC handshake)
    body_timeout_s: float = 30.0  # a request body that makes no progress this long is dropped (408)
    cache_dir: Path | None = None
    strict: bool = True  # exit when a model fails to load at startup
    drain_timeout_s: float = 30.0
    gpu_metrics: bool = True
    insecure: bool = False  # allow binding beyond loopback without a token
    verify_key: bytes | None = field(default=None, repr=False)  # load only engines signed with it (--verify-key)
    frontends: int = 0  # >0: this many front-end processes serve HTTP and gRPC for this (engine) process
    frontend_arena_bytes: int = 32 << 20  # shared memory per front end, for request and for response tensors

    def check_exposure(self) -> None:
        """Binding beyond loopback without a token opens inference, metrics and (in explicit mode) the
        load API to the network: refuse unless the user said --insecure. gRPC's wildcard address
        listens on IPv6 too, so "0.0.0.0" exposes both."""
        if self.auth_token or self.insecure or is_loopback(self.host):
            return
        raise ServeStartupError(
            f"refusing to bind {self.host} without a token: anyone who can reach it could run, load and unload "
            "models. Give a token with --auth-token-file FILE (or EMBER_SERVE_TOKEN), or pass --insecure to serve "
            "without one, or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False


class InferenceService:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics(lambda: self.repository.served(), gpu=settings.gpu_metrics)
        self.repository = ModelRepository(Path(settings.repository),
                                          ModelSettings(settings.cache_dir, settings.max_queue_size,
                                                        settings.verify_key), self.metrics)
        self.started = False
        self.shutting_down = False
        self.version = ember_version()
        self._token = settings.auth_token.encode() if settings.auth_token else None

    # ---- auth -----------------------------------------------------------------------------------------------

    @property
    def auth_required(self) -> bool:
        return self._token is not None

    def check_auth(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise UnauthorizedError("missing or wrong bearer token; send the header 'Authorization: Bearer <token>'")

    # ---- health and metadata ------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.started and not self.shutting_down

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "ember", "version": self.version, "extensions": EXTENSIONS}

    def model(self, name: str, version: str | None) -> ServedModel:
        return self.repository.get(name, version or None)

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        return self.model(name, version).metadata(self.repository.ready_versions(name))

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            return self.model(name, version).state == "READY"
        except ServeError:
            return False

    def model_config(self, name: str, version: str | None) -> mc.ModelConfig:
        return self.model(name, version).config.to_message(PLATFORM)

    def statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        if name:
            if version:
                models = [self.model(name, version)]
            else:
                self.model(name, None)  # 404 / 503 naming the model
                models = [m for m in self.repository.served() if m.name == name and m.state == "READY"]
        else:
            models = [m for m in self.repository.served() if m.state == "READY"]
        models.sort(key=lambda m: (m.name, int(m.version)))
        return {"model_stats": [m.stats.as_dict() for m in models]}

    # ---- repository ----------------------------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.repository.index(ready_only)

    def _check_control(self, what: str) -> None:
        if self.settings.model_control_mode == "none":
            raise ControlDisabledError(f"{what} is disabled: the server runs with --model-control-mode none; "
                                       "restart it with --model-control-mode explicit")
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down")

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self._check_control(f"loading model '{name}'")
        config = None
        params = parameters or {}
        if "config" in params:
            config = load_request_config(params["config"], name)
        unknown = sorted(k for k in params if k != "config")
        if unknown:
            raise BadRequestError(f"load '{name}': unsupported parameter(s) {unknown}; only 'config' is accepted")
        try:
            await self.repository.load(name, config)
        except ServeError:
            raise
        except EmberError as e:
            raise BadRequestError(f"failed to load model '{name}': {e}") from e

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self._check_control(f"unloading model '{name}'")
        await self.repository.unload(name)

    # ---- inference -----------------------------------------------------------------------------------------

    async def infer(self, req: InferRequest, protocol: str) -> InferResponse:
        try:
            if self.shutting_down:
                raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another "
                                        "replica")
            model = self.repository.get(req.model, req.version or None)
        except ServeError as e:
            self.metrics.count_error(protocol, e.reason)
            raise
        return await model.infer(req)

    def count_error(self, protocol: str, reason: str) -> None:
        self.metrics.count_error(protocol, reason)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.repository.poll()
            except Exception:  # keep polling; the next pass may succeed
                log.exception("repository poll failed")


def load_request_config(text: Any, name: str) -> ModelConfig:
    """A load request's `config` parameter: Triton's model configuration as a JSON string, parsed
    into the same ModelConfig message as config.pbtxt and checked the same way."""
    try:
        doc = json.loads(text) if isinstance(text, (str, bytes)) else text
    except (ValueError, RecursionError) as e:
        raise BadRequestError(f"load '{name}': the 'config' parameter is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequestError(f"load '{name}': the 'config' parameter must be a JSON object")
    try:
        return config_from_json(doc, name, f"load request config for '{name}'")
    except EmberError as e:
        raise BadRequestError(str(e)) from None
