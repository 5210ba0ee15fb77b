"""Runtime: load and run engines. Never imports the builder."""
from .engine import Engine, TensorSpec

__all__ = ["Engine", "TensorSpec"]
