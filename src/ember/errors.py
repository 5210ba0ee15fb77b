"""Errors ember raises on purpose. Each message names the node, input or file and says what to do."""
from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class ModelLoadError(EmberError):
    """The model file could not be read (corrupt protobuf, missing external data, unknown format)."""


class UnsupportedOpError(EmberError):
    """One or more nodes use ops ember does not implement. Lists every such node."""

    def __init__(self, nodes: list[tuple[str, str, str, int]], path: str | None = None,
                 reasons: "list[str] | None" = None):
        self.nodes = nodes
        self.reasons = reasons or [""] * len(nodes)
        where = f" in {path}" if path else ""
        lines = [f"{len(nodes)} unsupported node(s){where}:"]
        for (name, op, domain, opset), why in zip(nodes, self.reasons):
            extra = f": {why}" if why and why != "op not implemented" else ""
            lines.append(f"  - node '{name}': op {domain or 'ai.onnx'}::{op} (opset {opset}){extra}")
        lines.append("Replace these ops in the exporter, or open an issue naming them.")
        super().__init__("\n".join(lines))


class GraphError(EmberError):
    """The IR graph is malformed (failed verification)."""


class ShapeError(EmberError):
    """Shape or dtype inference found an inconsistency."""


class InputError(EmberError):
    """A run-time input is missing, unknown, or has the wrong rank, shape or dtype."""


class NodeExecutionError(EmberError):
    """A node failed while running."""


class EngineFileError(EmberError):
    """An engine file is truncated, damaged, tampered with or incompatible."""
