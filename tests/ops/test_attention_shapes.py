"""Symbolic shape rules of the sequence-model ops (Attention, RotaryEmbedding, RNN/GRU/LSTM,
LinearAttention, CausalConvWithState) over dims `batch`, `seq`, `past`."""
from __future__ import annotations

from ember.ir.dtypes import DType
from ember.ir.graph import Graph
from ember.ir.shapes import Sym
from ember.ops.infer import infer_shapes

B, S, P = Sym.named("batch"), Sym.named("seq"), Sym.named("past")
F32 = DType.FLOAT32


def _run(op: str, inputs: list, attrs: dict | None = None, n_out: int = 1):
    """inputs: (dtype, shape) per input, None for an absent optional one."""
    g = Graph()
    vals = [None if spec is None else g.add_input(f"in{i}", spec[0], tuple(spec[1]))
            for i, spec in enumerate(inputs)]
    node = g.add_node(op, vals, n_out, attrs or {}, name="n")
    infer_shapes(g)
    return [(o.dtype, o.shape) for o in node.outputs]


def test_attention_4d_gqa_with_cache():
    outs = _run("Attention", [(F32, (B, 8, S, 64)), (F32, (B, 2, S, 64)), (F32, (B, 2, S, 32)), None,
                              (F32, (B, 2, P, 64)), (F32, (B, 2, P, 32))], n_out=4)
    assert outs[0] == (F32, (B, 8, S, 32))
    assert outs[1] == (F32, (B, 2, P + S, 64))
    assert outs[2] == (F32, (B, 2, P + S, 32))
    assert outs[3] == (F32, (B, 8, S, P + S))


def test_attention_3d_packed_heads():
    outs = _run("Attention", [(DType.FLOAT16, (B, S, 512)), (DType.FLOAT16, (B, S, 128)),
                              (DType.FLOAT16, (B, S, 128))],
                {"q_num_heads": 8, "kv_num_heads": 2}, n_out=3)
    assert outs[0] == (DType.FLOAT16, (B, S, 512))
    assert outs[1] == (DType.FLOAT16, (B, 2, S, 64))


def test_rotary_embedding_keeps_shape():
    outs = _run("RotaryEmbedding", [(F32, (B, S, 256)), (F32, (4096, 16)), (F32, (4096, 16)),
                                    (DType.INT64, (B, S))], {"num_heads": 8})
    assert outs[0] == (F32, (B, S, 256))


def test_lstm_sequence_major_and_batch_first():
    x, w, r = (F32, (S, B, 10)), (F32, (2, 64, 10)), (F32, (2, 64, 16))
    outs = _run("LSTM", [x, w, r], {"hidden_size": 16, "direction": "bidirectional"}, n_out=3)
    assert [s for _, s in outs] == [(S, 2, B, 16), (2, B, 16), (2, B, 16)]
    outs = _run("GRU", [(F32, (B, S, 10)), (F32, (1, 48, 10)), (F32, (1, 48, 16))],
                {"hidden_size": 16, "layout": 1}, n_out=2)
    assert [s for _, s in outs] == [(B, S, 1, 16), (B, 1, 16)]
    outs = _run("RNN", [x, (F32, (1, 16, 10)), (F32, (1, 16, 16))], {"hidden_size": 16}, n_out=2)
    assert [s for _, s in outs] == [(S, 1, B, 16), (1, B, 16)]


def test_linear_attention_and_causal_conv_state():
    outs = _run("LinearAttention", [(F32, (B, S, 64)), (F32, (B, S, 32)), (F32, (B, S, 48))],
                {"q_num_heads": 8, "kv_num_heads": 4}, n_out=2)
    assert outs == [(F32, (B, S, 96)), (F32, (B, 4, 8, 12))]
    outs = _run("CausalConvWithState", [(F32, (B, 256, S)), (F32, (256, 1, 4))], n_out=2)
    assert outs == [(F32, (B, 256, S)), (F32, (B, 256, 3))]
