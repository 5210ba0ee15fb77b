"""ember: an inference compiler, runtime and server.

    import ember
    engine = ember.build("model.onnx")          # or ember.Engine.load("model.engine")
    outputs = engine.run({"input": array})      # dict of output name -> array
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EmberError  # noqa: E402
from .runtime.engine import Engine, TensorSpec  # noqa: E402


def build(model, config=None, **kwargs):
    """Build an engine from an ONNX model. See :func:`ember.builder.build`."""
    from .builder import build as _build

    return _build(model, config, **kwargs)


__all__ = ["EmberError", "Engine", "TensorSpec", "__version__", "build"]
