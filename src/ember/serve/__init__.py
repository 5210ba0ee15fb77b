"""ember serve: a KServe v2 / Triton-compatible inference server for ember engines.

    from ember.serve import ServerSettings, InferenceServer, ServerThread
"""
from __future__ import annotations

from .core import InferenceService, ServerSettings
from .errors import ServeError
from .server import InferenceServer, ServerThread, ServeStartupError

__all__ = ["InferenceServer", "InferenceService", "ServeError", "ServeStartupError", "ServerSettings", "ServerThread"]
