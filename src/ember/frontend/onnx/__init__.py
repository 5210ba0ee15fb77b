"""ONNX frontend."""
from .importer import import_onnx, load_model, model_opset

__all__ = ["import_onnx", "load_model", "model_opset"]
