"""The op registry. See registry.py for how an op is defined."""
from .registry import REGISTRY, REQUIRED, OpContext, OpDef, get, known_ops, op, shape_rule

__all__ = ["REGISTRY", "REQUIRED", "OpContext", "OpDef", "get", "known_ops", "op", "shape_rule"]
