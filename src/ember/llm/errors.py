"""Errors of the LLM engine. Each names the file, field, tensor or request parameter and says what to do."""
from __future__ import annotations

from ..errors import EmberError


class CheckpointError(EmberError):
    """A checkpoint folder, GGUF file or LLM engine cannot be read: a file or tensor is missing, malformed,
    or in a form ember does not load (pickled weights)."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint is readable but describes an architecture or option ember does not run."""


class RequestError(EmberError):
    """A generation request is invalid: a sampling parameter out of range, a prompt too long."""


class QueueFullError(EmberError):
    """The engine's waiting queue is at its limit; the client should back off and retry (HTTP 429)."""


class EngineDeadError(EmberError):
    """The engine's step loop stopped (it failed or is shutting down); requests cannot run (HTTP 503)."""
