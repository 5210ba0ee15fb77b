"""Symbolic shape rules of the math family (pointwise, matmul, softmax, reductions, casts, Q/DQ)
over dims `batch` and `seq`."""
from __future__ import annotations

import numpy as np
import onnx

from ember.ir.dtypes import DType
from ember.ir.graph import Graph
from ember.ir.shapes import Sym
from ember.ops.infer import infer_shapes

B, S = Sym.named("batch"), Sym.named("seq")
F32, F16, I64, BOOL = DType.FLOAT32, DType.FLOAT16, DType.INT64, DType.BOOL


class In:
    """A symbolic graph input of the node under test."""

    def __init__(self, shape, dtype: DType = F32):
        self.shape, self.dtype = tuple(shape), dtype


def infer(op: str, inputs: list, attrs: dict | None = None, n_out: int = 1):
    g = Graph()
    vals = []
    for i, x in enumerate(inputs):
        if x is None:
            vals.append(None)
        elif isinstance(x, In):
            vals.append(g.add_input(f"x{i}", x.dtype, x.shape))
        else:
            vals.append(g.add_const(f"c{i}", np.asarray(x)))
    node = g.add_node(op, vals, n_out, attrs or {}, name="n")
    infer_shapes(g)
    return [(o.dtype, o.shape) for o in node.outputs]


def one(op: str, inputs: list, attrs: dict | None = None):
    return infer(op, inputs, attrs)[0]


def test_pointwise_unary_keeps_type_and_shape():
    for op in ("Exp", "Tanh", "Relu", "Gelu", "Sigmoid", "Neg", "Round", "Softplus", "Erf"):
        assert one(op, [In((B, S, 64))]) == (F32, (B, S, 64)), op
    assert one("Abs", [In((B, S), I64)]) == (I64, (B, S))
    assert one("IsNaN", [In((B, S), F16)]) == (BOOL, (B, S))
    assert one("IsInf", [In((B, S))]) == (BOOL, (B, S))
    assert one("Clip", [In((B, S)), np.float32(0), np.float32(6)]) == (F32, (B, S))


def test_binary_broadcast_over_symbols():
    assert one("Add", [In((B, S, 64)), In((64,))]) == (F32, (B, S, 64))
    assert one("Mul", [In((B, 1, S)), In((1, 8, 1))]) == (F32, (B, 8, S))
    assert one("Pow", [In((B, S)), In((), I64)]) == (F32, (B, S))
    assert one("Max", [In((B, S)), In((S,)), In((1, 1))]) == (F32, (B, S))
    assert one("PRelu", [In((B, 16, S)), In((16, 1))]) == (F32, (B, 16, S))


def test_comparisons_and_logic_give_bool():
    assert one("Less", [In((B, S)), In((1, S))]) == (BOOL, (B, S))
    assert one("Equal", [In((B, 1), I64), In((S,), I64)]) == (BOOL, (B, S))
    assert one("And", [In((B, S), BOOL), In((S,), BOOL)]) == (BOOL, (B, S))
    assert one("Where", [In((1, S), BOOL), In((B, S)), In(())]) == (F32, (B, S))


def test_matmul_and_gemm():
    assert one("MatMul", [In((B, S, 64)), np.zeros((64, 128), np.float32)]) == (F32, (B, S, 128))
    assert one("MatMul", [In((B, 8, S, 64)), In((B, 8, 64, S))]) == (F32, (B, 8, S, S))
    assert one("MatMul", [In((64,)), In((B, 64, 32))]) == (F32, (B, 32))
    assert one("MatMul", [In((B, S, 64)), In((64,))]) == (F32, (B, S))
    assert one("MatMulInteger", [In((B, 64), DType.UINT8), In((64, 32), DType.INT8)]) == (DType.INT32, (B, 32))
    w = np.zeros((128, 64), np.float32)
    assert one("Gemm", [In((B, 64)), w, np.zeros(128, np.float32)], {"transB": 1}) == (F32, (B, 128))
    assert one("Gemm", [In((64, B)), np.zeros((64, 10), np.float32)], {"transA": 1}) == (F32, (B, 10))


def test_einsum():
    assert one("Einsum", [In((B, S, 64)), In((B, 64, S))], {"equation": "bij,bjk->bik"}) == (F32, (B, S, S))
    assert one("Einsum", [In((B, S))], {"equation": "ij->ji"}) == (F32, (S, B))


def test_softmax_family_keeps_shape():
    for op in ("Softmax", "LogSoftmax", "Hardmax"):
        assert one(op, [In((B, 8, S, S), F16)], {"axis": -1}) == (F16, (B, 8, S, S))


def test_reductions():
    axes = np.array([-1], np.int64)
    assert one("ReduceMean", [In((B, S, 64)), axes]) == (F32, (B, S, 1))
    assert one("ReduceSum", [In((B, S, 64)), np.array([1], np.int64)], {"keepdims": 0}) == (F32, (B, 64))
    assert one("ReduceMax", [In((B, S, 64))], {"keepdims": 0}) == (F32, ())
    assert one("ReduceL2", [In((B, S))]) == (F32, (1, 1))
    assert one("ReduceSum", [In((B, S)), np.array([], np.int64)], {"noop_with_empty_axes": 1}) == (F32, (B, S))
    assert one("ArgMax", [In((B, S, 10))], {"axis": -1, "keepdims": 0}) == (I64, (B, S))
    assert one("ArgMin", [In((B, S, 10))], {"axis": 1}) == (I64, (B, 1, 10))
    assert one("CumSum", [In((B, S)), np.array(1, np.int64)]) == (F32, (B, S))


def test_casts_and_quantization():
    assert one("Cast", [In((B, S))], {"to": onnx.TensorProto.FLOAT16}) == (F16, (B, S))
    assert one("Cast", [In((B, S))], {"to": "int64"}) == (I64, (B, S))
    assert one("CastLike", [In((B, S)), In((), DType.BFLOAT16)]) == (DType.BFLOAT16, (B, S))
    scale = np.float32(0.1)
    assert one("QuantizeLinear", [In((B, S)), scale, np.int8(0)]) == (DType.INT8, (B, S))
    assert one("QuantizeLinear", [In((B, S)), scale]) == (DType.UINT8, (B, S))
    assert one("DequantizeLinear", [In((B, S), DType.INT8), scale]) == (F32, (B, S))
    assert infer("DynamicQuantizeLinear", [In((B, S))], n_out=3) == [(DType.UINT8, (B, S)), (F32, ()),
                                                                      (DType.UINT8, ())]
    u8, zp = np.uint8(128), np.uint8(128)
    assert one("QLinearMatMul", [In((B, S, 64), DType.UINT8), scale, u8, np.zeros((64, 32), np.uint8), scale, zp,
                                 scale, zp]) == (DType.UINT8, (B, S, 32))


def test_losses():
    scores, labels = In((B, 10, S)), In((B, S), I64)
    assert one("NegativeLogLikelihoodLoss", [scores, labels]) == (F32, ())
    assert one("NegativeLogLikelihoodLoss", [scores, labels], {"reduction": "none"}) == (F32, (B, S))
    assert infer("SoftmaxCrossEntropyLoss", [scores, labels], n_out=2) == [(F32, ()), (F32, (B, 10, S))]
