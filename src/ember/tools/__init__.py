"""The model tools behind `ember inspect`, `check`, `compare` and `simplify`, as Python functions."""
from .check import check_model
from .compare import compare_models
from .inspect import inspect_model
from .simplify import simplify_model

__all__ = ["check_model", "compare_models", "inspect_model", "simplify_model"]
