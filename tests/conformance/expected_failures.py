"""ONNX node test cases ember is known to fail, grouped by family, each with the reason.

Patterns are fnmatch patterns over the case name (test_...). A case listed here that starts
passing makes the suite fail (strict xfail): remove it from the list.
"""
from __future__ import annotations

_RANDOM = ("the expected outputs are random draws of the ONNX reference's generator; ember implements "
           "the op (seeded runs are reproducible) but cannot reproduce those exact numbers")
_ROUNDING = ("the expected values carry numpy's step-by-step fp16/bf16 rounding of every intermediate "
             "(bf16 sums element by element); ember's basic ops accumulate in fp32 and round once, as "
             "ONNX Runtime does — a 1-2 ulp difference above the case's 1e-3 tolerance")
_CODEC = "needs an image codec library (JPEG, JPEG 2000, WebP) that is not an ember dependency"
_DFT_NOISE = ("the expected values hold ~1.9e-7 of numpy FFT rounding noise at bins that are exactly 0; "
              "ember returns exact zeros and the case's atol is 1e-7")

EXPECTED_FAILURES: dict[str, str] = {
    "test_bernoulli*": _RANDOM,
    "test_attention_4d_causal_bf16_expanded": _ROUNDING,
    "test_attention_4d_causal_fp16_expanded": _ROUNDING,
    "test_attention_4d_padded_kv_bf16_expanded": _ROUNDING,
    "test_attention_4d_causal_padded_kv_bf16_expanded": _ROUNDING,
    "test_attention_4d_attn_mask_causal_bf16_expanded": _ROUNDING,
    "test_attention_3d_causal_bf16_expanded": _ROUNDING,
    "test_image_decoder_decode_jpeg_*": _CODEC,
    "test_image_decoder_decode_jpeg2k_rgb": _CODEC,
    "test_image_decoder_decode_webp_rgb": _CODEC,
    "test_dft_inverse": _DFT_NOISE,
    "test_dft_inverse_opset19": _DFT_NOISE,
}
