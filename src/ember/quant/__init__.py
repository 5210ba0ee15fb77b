"""INT8/FP8 quantization: calibration data, range collectors, calibrators, the calibration cache, and
the accuracy budget. The graph rewrites live in passes (quantize.py inserts Q/DQ, qdq.py folds them
into quantized anchors); the builder drives them (builder/quantize.py)."""
from .accuracy import parse_budget
from .calibrators import METHODS, quantize_weight
from .collect import Calibration, Layer, calibrate, quantizable_layers
from .data import CalibrationError, ImagePreprocess, InputSpec, open_source

__all__ = ["METHODS", "Calibration", "CalibrationError", "ImagePreprocess", "InputSpec", "Layer", "calibrate",
           "open_source", "parse_budget", "quantizable_layers", "quantize_weight"]
