"""Converters that normalize ONNX ops across opsets, one module per op family."""
