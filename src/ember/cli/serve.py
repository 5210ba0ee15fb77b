"""`ember serve REPO`: serve a model repository over KServe v2 HTTP and gRPC."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import click


def _token(token_file: "str | None") -> "str | None":
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise click.BadParameter(f"cannot read {token_file}: {e.strerror}",
                                     param_hint="--auth-token-file") from None
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--auth-token-file")
        return token
    return os.environ.get("EMBER_SERVE_TOKEN") or None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a size like 64M or 1048576",
                                 param_hint="--max-request-size") from None


def _verify_key(key_file: "str | None") -> "bytes | None":
    if not key_file:
        return None
    from ember.runtime.signing import SigningKeyError, load_key

    try:
        return load_key(key_file)
    except SigningKeyError as e:
        raise click.BadParameter(str(e), param_hint="--verify-key (or EMBER_VERIFY_KEY_FILE)") from None


def _frontends(text: str) -> int:
    if text.strip().lower() == "auto":
        from ember.serve.frontends import auto_frontends

        return auto_frontends()
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"'{text}' is not a number of processes (0, 1, 2, ...) or 'auto'",
                                 param_hint="--frontends")
    return n


@click.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Use 0.0.0.0 to accept connections from other machines.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="HTTP/REST port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics on this port instead of the HTTP port.")
@click.option("--no-http", is_flag=True, help="Do not start the HTTP front end.")
@click.option("--no-grpc", is_flag=True, help="Do not start the gRPC front end.")
@click.option("--model-control-mode", type=click.Choice(["none", "explicit", "poll"]), default="none",
              show_default=True, help="none: load every model at start, refuse load/unload requests. "
              "explicit: allow load/unload through the API. poll: also reload models that change on disk.")
@click.option("--load-model", "load_models", multiple=True,
              help="Load only these models at startup (repeatable; default: every model).")
@click.option("--repository-poll-secs", type=float, default=15.0, show_default=True, help="Poll interval (poll mode).")
@click.option("--auth-token-file", type=click.Path(dir_okay=False),
              help="Require 'Authorization: Bearer <token>' (token read from this file; or set EMBER_SERVE_TOKEN).")
@click.option("--insecure", is_flag=True,
              help="Allow binding beyond loopback (--host 0.0.0.0) without a token: anyone who can reach the port "
              "can run, load and unload models.")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEYFILE", envvar="EMBER_VERIFY_KEY_FILE",
              help="Load only engines signed with the key in KEYFILE (ember build --sign-key); engines built here "
              "from model.onnx are cached signed with it. Or set EMBER_VERIFY_KEY_FILE.")
@click.option("--max-request-size", default="64M", show_default=True, help="Largest request body accepted.")
@click.option("--max-queue-size", type=click.IntRange(1), default=1024, show_default=True,
              help="Queue limit per model (and priority level) where the config does not set one.")
@click.option("--max-connections", type=click.IntRange(1), default=2048, show_default=True,
              help="Concurrent HTTP requests (and gRPC calls) before the server answers 503 (RESOURCE_EXHAUSTED).")
@click.option("--max-connections-per-client", type=click.IntRange(1), default=512, show_default=True,
              help="Open HTTP connections one client address may hold.")
@click.option("--header-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds a connection has to send a request's headers (and gRPC's handshake).")
@click.option("--body-timeout", type=click.FloatRange(0.1), default=30.0, show_default=True,
              help="Seconds a request body may stall before the connection is dropped (408).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where engines built from model.onnx are cached [default: ~/.cache/ember/serve].")
@click.option("--strict/--no-strict", default=True, show_default=True,
              help="Exit if a model fails to load at startup (--no-strict serves the others).")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to let in-flight requests finish after SIGTERM.")
@click.option("--frontends", default="0", show_default=True, metavar="N|auto",
              help="Serve HTTP and gRPC from N front-end processes on the same ports (SO_REUSEPORT), which hand "
              "requests to this process's models through shared memory; 0: one process. auto: min(4, cores/2).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve_cmd(repo: str, host: str, http_port: int, grpc_port: int, metrics_port: "int | None", no_http: bool,
              no_grpc: bool, model_control_mode: str, load_models: "tuple[str, ...]", repository_poll_secs: float,
              auth_token_file: "str | None", insecure: bool, max_request_size: str, max_queue_size: int,
              max_connections: int, max_connections_per_client: int, header_timeout: float, body_timeout: float,
              cache_dir: "str | None", strict: bool, drain_timeout: float, log_level: str,
              verify_key: "str | None", frontends: str) -> None:
    """Serve the model repository REPO over HTTP and gRPC (KServe v2, Triton compatible).

    REPO holds one folder per model: <model>/config.yaml (or Triton's config.pbtxt) and numeric
    version folders with model.engine or model.onnx. Metrics are at /metrics on the HTTP port.
    """
    from ember.serve import InferenceServer, ServerSettings, ServeStartupError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if no_http and metrics_port is None:
        raise click.UsageError("--no-http needs --metrics-port, or /metrics would have nowhere to live")
    settings = ServerSettings(
        repository=Path(repo), host=host, http_port=None if no_http else http_port,
        grpc_port=None if no_grpc else grpc_port, metrics_port=metrics_port, model_control_mode=model_control_mode,
        load_models=list(load_models) or None, poll_interval_s=repository_poll_secs, auth_token=_token(auth_token_file),
        max_request_size=_size(max_request_size), max_queue_size=max_queue_size,
        cache_dir=Path(cache_dir) if cache_dir else Path.home() / ".cache" / "ember" / "serve",
        strict=strict, drain_timeout_s=drain_timeout, max_connections=max_connections, insecure=insecure,
        max_connections_per_client=max_connections_per_client, header_timeout_s=header_timeout,
        body_timeout_s=body_timeout, verify_key=_verify_key(verify_key), frontends=_frontends(frontends))
    try:
        settings.check_exposure()
    except ServeStartupError as e:
        raise click.UsageError(str(e)) from None
    asyncio.run(InferenceServer(settings).run())
