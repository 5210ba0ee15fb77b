"""Tiny whole models from `transformers` configs with random weights, exported to ONNX for accuracy tests.

    spec = SPECS["bert"]
    exported = export_model(spec, out_dir, exporter="torchscript", opset=17)
    feeds = exported.feeds(batch=3)            # dict of input name -> np.ndarray

Every model is built from a config with a fixed seed, then its weights are redrawn by `randomize_weights`:
the `transformers` default init (std 0.02, unit BatchNorm statistics) leaves activations vanishing after a
few layers (tiny MobileNetV2 logits ~1e-26) and every attention map uniform, which would hide errors.

Exporters:
  * "torchscript": `torch.onnx.export(dynamo=False)` writes any opset from 7 on; dynamic dims by `dynamic_axes`.
  * "dynamo": `torch.onnx.export(dynamo=True)` implements opset 18 and up only. Asked for 17 it tries to
    convert down *before* its optimizer has folded constants, which fails for ReduceMean (axes not constant,
    falls back to 18 with a warning) and for GPT-2 writes an invalid opset-17 file (Split keeps the opset-18
    `num_outputs` attribute). So we export at 18 and, for 17, convert down ourselves with
    `downgrade_opset_18_to_17`, which rewrites exactly the schemas that changed at 18 and refuses the rest.
Dynamic dims: batch for every input; batch and sequence for text models.
Both exporters fold BatchNormalization into Conv (TorchScript's eval peephole, dynamo's onnxscript optimizer);
opset-11 TorchScript files keep it, see `export_model`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

EXPORTERS = ("torchscript", "dynamo")
DYNAMO_NATIVE_OPSET = 18
EXAMPLE_BATCH = 2  # torch.export specializes dims of size 0 and 1, so the example batch must be >= 2
EXAMPLE_SEQ = 5
TEST_SEQ = 7  # differs from EXAMPLE_SEQ so a sequence length baked in by the exporter shows up
IMAGE_SIZE = 32


# ----------------------------------------------------------------------------------------------------------------
# model specs

@dataclass(frozen=True)
class ModelSpec:
    """How to build one tiny model and what its ONNX interface is."""

    name: str
    build: Callable[[], torch.nn.Module]  # returns the IO wrapper (positional inputs, tuple of outputs), eval mode
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    make_feeds: Callable[[int, int, int], dict[str, np.ndarray]]  # (batch, seq, seed) -> feeds
    text: bool  # inputs are (batch, seq): the sequence dim is dynamic too


class _TextIO(torch.nn.Module):
    """Positional token inputs in, a tuple of named outputs out (exporters want positional tensors)."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], output_keys: tuple[str, ...]):
        super().__init__()
        self.model, self.input_names, self.output_keys = model, input_names, output_keys


class _BertIO(_TextIO):
    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


class _CausalLMIO(_TextIO):
    # attention_mask is passed on purpose: without it transformers 5 probes position_ids for packed sequences
    # with torch.diff, which the TorchScript exporter cannot export (aten::diff)
    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class _ImageIO(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, output_keys: tuple[str, ...]):
        super().__init__()
        self.model, self.output_keys = model, output_keys

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        outputs = tuple(getattr(out, key) for key in self.output_keys)
        return outputs if len(outputs) > 1 else outputs[0]


def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every weight so activations keep unit scale through depth and norms/BN are not identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:  # linear, conv, embedding: variance preserving
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm / BatchNorm scale
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # cls tokens, position embeddings
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model.eval()


def _token_feeds(vocab: int, names: tuple[str, ...]):
    def make(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        feeds = {"input_ids": rng.integers(1, vocab, (batch, seq), dtype=np.int64)}
        if "attention_mask" in names:
            # ones with 2, 0, 1, 2, ... padding tokens at the end of each row (batch 1 is padded too);
            # right padding never masks a whole attention row, for causal models as well
            mask = np.ones((batch, seq), np.int64)
            for row in range(batch):
                pad = (2 + row) % 3
                if pad:
                    mask[row, -pad:] = 0
            feeds["attention_mask"] = mask
        if "token_type_ids" in names:
            types = np.zeros((batch, seq), np.int64)
            types[:, seq // 2:] = 1
            feeds["token_type_ids"] = types
        return {name: feeds[name] for name in names}
    return make


def _image_feeds_of(size: int):
    def make(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"pixel_values": rng.standard_normal((batch, 3, size, size)).astype(np.float32)}
    return make


_image_feeds = _image_feeds_of(IMAGE_SIZE)


def _seeded(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return make()
    return build


def _bert(**cfg) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64, type_vocab_size=2)
    model = randomize_weights(BertModel(BertConfig(**{**base, **cfg})))
    names = ("input_ids", "attention_mask", "token_type_ids")
    return _BertIO(model, names, ("last_hidden_state", "pooler_output")).eval()


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                        bos_token_id=1, eos_token_id=2)
    model = randomize_weights(GPT2LMHeadModel(config))
    return _CausalLMIO(model, ("input_ids", "attention_mask"), ("logits",)).eval()


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    # grouped-query attention (4 query heads, 2 kv heads) and SwiGLU, like the real family
    config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = randomize_weights(LlamaForCausalLM(config))
    return _CausalLMIO(model, ("input_ids", "attention_mask"), ("logits",)).eval()


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=37)
    return _ImageIO(randomize_weights(ViTModel(config)), ("last_hidden_state", "pooler_output")).eval()


def _resnet(**cfg) -> torch.nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    base = dict(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="bottleneck",
                num_labels=10)
    model = randomize_weights(ResNetForImageClassification(ResNetConfig(**{**base, **cfg})))
    return _ImageIO(model, ("logits",)).eval()


def _mobilenet_v2() -> torch.nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    # HF MobileNetV2 has its 17 inverted-residual blocks fixed; depth_multiplier only narrows them.
    # tf_padding (the default) pads each strided conv by an amount computed from the input size
    config = MobileNetV2Config(depth_multiplier=0.35, image_size=IMAGE_SIZE, num_labels=10)
    return _ImageIO(randomize_weights(MobileNetV2ForImageClassification(config)), ("logits",)).eval()


_BERT_IN = ("input_ids", "attention_mask", "token_type_ids")
_LM_IN = ("input_ids", "attention_mask")
SPECS: dict[str, ModelSpec] = {
    spec.name: spec for spec in (
        ModelSpec("bert", _seeded(_bert), _BERT_IN, ("last_hidden_state", "pooler_output"),
                  _token_feeds(99, _BERT_IN), text=True),
        # the TorchScript exporter has no SDPA before opset 14: opset-11 BERT uses the eager attention (same weights)
        ModelSpec("bert_eager", _seeded(lambda: _bert(attn_implementation="eager")), _BERT_IN,
                  ("last_hidden_state", "pooler_output"), _token_feeds(99, _BERT_IN), text=True),
        ModelSpec("gpt2", _seeded(_gpt2), _LM_IN, ("logits",), _token_feeds(99, _LM_IN), text=True),
        ModelSpec("llama", _seeded(_llama), _LM_IN, ("logits",), _token_feeds(99, _LM_IN), text=True),
        ModelSpec("vit", _seeded(_vit), ("pixel_values",), ("last_hidden_state", "pooler_output"),
                  _image_feeds, text=False),
        ModelSpec("resnet", _seeded(_resnet), ("pixel_values",), ("logits",), _image_feeds, text=False),
        ModelSpec("mobilenet_v2", _seeded(_mobilenet_v2), ("pixel_values",), ("logits",), _image_feeds,
                  text=False),
    )
}


# ----------------------------------------------------------------------------------------------------------------
# export

@dataclass
class ExportedModel:
    spec: ModelSpec
    exporter: str
    opset: int  # the default-domain opset the file actually declares
    path: Path
    module: torch.nn.Module  # the torch model it came from, to check the export itself
    export_seconds: float  # this file's own cost (for a converted file: the conversion only)
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.spec.name}-{self.exporter}-opset{self.opset}"

    def feeds(self, batch: int, seq: int = TEST_SEQ, seed: int | None = None) -> dict[str, np.ndarray]:
        """Random inputs, reproducible per (batch, seq): a different seed per batch size by default."""
        return self.spec.make_feeds(batch, seq, 1000 * batch + seq if seed is None else seed)

    def torch_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(feeds[name]) for name in self.spec.input_names))
        out = out if isinstance(out, tuple) else (out,)
        return {name: t.numpy() for name, t in zip(self.spec.output_names, out)}


def _dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    # inputs only: the exporter derives the output dims (and their symbolic names) itself
    return {name: ({0: "batch", 1: "seq"} if spec.text else {0: "batch"}) for name in spec.input_names}


def _dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, object]]:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    return {name: ({0: batch, 1: seq} if spec.text else {0: batch}) for name in spec.input_names}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress, warnings and TracerWarnings; keep test output readable."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(spec: ModelSpec, out_dir: str | os.PathLike, exporter: str, opset: int,
                 module: torch.nn.Module | None = None) -> ExportedModel:
    """Export `spec` with `exporter` ("torchscript" or "dynamo") at `opset` into `out_dir`."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    module = spec.build() if module is None else module
    path = Path(out_dir) / f"{spec.name}-{exporter}-opset{opset}.onnx"
    example = spec.make_feeds(EXAMPLE_BATCH, EXAMPLE_SEQ, 0)
    args = tuple(torch.from_numpy(example[name]) for name in spec.input_names)
    notes: list[str] = []
    t0 = time.perf_counter()
    with _quiet():
        if exporter == "torchscript":
            # TrainingMode.PRESERVE on an eval-mode module exports inference semantics but skips the peephole
            # that folds BatchNormalization into Conv, so opset-11 files keep their BatchNormalization nodes
            # (as older files in the wild do) and ember's BatchNormalization and BN folding get exercised
            keep_bn = opset < 13
            training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
            torch.onnx.export(module, args, str(path), input_names=list(spec.input_names),
                              output_names=list(spec.output_names), opset_version=opset,
                              dynamic_axes=_dynamic_axes(spec), dynamo=False, training=training)
            proto = onnx.load(str(path))
            if keep_bn and any(node.op_type == "BatchNormalization" for node in proto.graph.node):
                notes.append("BatchNormalization kept (not folded into Conv)")
        else:
            if opset < 17:
                raise ValueError(f"the dynamo exporter writes opset {DYNAMO_NATIVE_OPSET}+ and we convert down to "
                                 f"17 at most; asked for {opset}: use the torchscript exporter")
            program = torch.onnx.export(module, args, None, input_names=list(spec.input_names),
                                        output_names=list(spec.output_names),
                                        opset_version=max(opset, DYNAMO_NATIVE_OPSET),
                                        dynamic_shapes=_dynamic_shapes(spec), dynamo=True, verbose=False)
            proto = program.model_proto
            if opset == 17:
                proto = downgrade_opset_18_to_17(proto)
                notes.append("exported at opset 18 by the dynamo exporter, converted to 17 by zoo")
            onnx.save(proto, str(path))
    return _checked(ExportedModel(spec, exporter, opset, path, module, time.perf_counter() - t0, notes), proto)


def downgrade_export(exported: ExportedModel, out_dir: str | os.PathLike) -> ExportedModel:
    """The opset-17 sibling of an opset-18 export, without exporting again."""
    t0 = time.perf_counter()
    proto = downgrade_opset_18_to_17(onnx.load(str(exported.path)))
    path = Path(out_dir) / f"{exported.spec.name}-{exported.exporter}-opset17.onnx"
    onnx.save(proto, str(path))
    notes = [*exported.notes, f"exported at opset 18 by the {exported.exporter} exporter, converted to 17 by zoo"]
    seconds = time.perf_counter() - t0
    return _checked(ExportedModel(exported.spec, exported.exporter, 17, path, exported.module, seconds, notes), proto)


def _checked(exported: ExportedModel, proto: onnx.ModelProto) -> ExportedModel:
    written = _default_opset(proto)
    if written != exported.opset:
        raise RuntimeError(f"{exported.path.name}: asked the {exported.exporter} exporter for opset "
                           f"{exported.opset}, the file declares {written}")
    onnx.checker.check_model(proto, full_check=True)
    batch_dims = [i.type.tensor_type.shape.dim[0] for i in proto.graph.input]
    if any(d.HasField("dim_value") for d in batch_dims):
        raise RuntimeError(f"{exported.path.name}: the batch dim of an input is static: {batch_dims}")
    return exported


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------------------------------------------
# opset 18 -> 17

_REDUCE_AXES_BECAME_INPUT_AT_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                    "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def downgrade_opset_18_to_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite the nodes whose schema changed at opset 18 into their opset-13 form; refuse what has none.

    onnx.version_converter cannot do this (no Split 18->17 adapter; it keeps ReduceMean's
    noop_with_empty_axes), and onnxscript's converter only converts up.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    if _default_opset(model) != 18:
        raise ValueError(f"expected an opset-18 model, got {_default_opset(model)}")
    if model.functions:
        raise ValueError("model has local functions; inline them first")
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    changed_at_18 = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == "" and s.since_version == 18}

    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name} ({node.op_type}) has subgraphs; not handled")
        attrs = {a.name: a for a in node.attribute}
        if node.op_type in _REDUCE_AXES_BECAME_INPUT_AT_18:
            noop = attrs.get("noop_with_empty_axes")
            if noop is not None:
                node.attribute.remove(noop)
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in constants:
                    raise ValueError(f"{node.op_type} {node.name}: axes are not a constant")
                axes = constants[node.input[1]].astype(np.int64).tolist()
                if not axes and noop is not None and noop.i:
                    raise ValueError(f"{node.op_type} {node.name}: empty axes with noop_with_empty_axes=1")
                del node.input[1:]
                if axes:
                    node.attribute.append(helper.make_attribute("axes", axes))
        elif node.op_type == "Split" and "num_outputs" in attrs:
            axis = attrs["axis"].i if "axis" in attrs else 0
            dims = shapes.get(node.input[0])
            if dims is None or dims[axis] is None:
                raise ValueError(f"Split {node.name}: the split axis has no static size")
            n, size = attrs["num_outputs"].i, dims[axis]
            chunk = math.ceil(size / n)  # Split-18: equal chunks of ceil(size / n), the last one smaller
            sizes = [chunk] * (n - 1) + [size - chunk * (n - 1)]
            if sizes[-1] < 0:
                raise ValueError(f"Split {node.name}: {size} does not split into {n} chunks of {chunk}")
            name = f"{node.name or node.output[0]}_split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
            node.attribute.remove(attrs["num_outputs"])
            del node.input[1:]
            node.input.append(name)
        elif node.op_type == "Pad":
            if len(node.input) > 3 and node.input[3]:
                raise ValueError(f"Pad {node.name}: the opset-18 axes input has no opset-13 form")
        elif node.op_type == "Resize":
            defaults = {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}
            for key in ("antialias", "keep_aspect_ratio_policy", "axes"):
                if key in attrs and (key == "axes" or helper.get_attribute_value(attrs[key]) != defaults[key]):
                    raise ValueError(f"Resize {node.name}: attribute {key} is new at opset 18")
                if key in attrs:
                    node.attribute.remove(attrs[key])
        elif node.op_type in ("ScatterElements", "ScatterND"):
            if "reduction" in attrs and attrs["reduction"].s in (b"max", b"min"):
                raise ValueError(f"{node.op_type} {node.name}: reduction max/min is new at opset 18")
        elif node.op_type in changed_at_18:
            raise ValueError(f"{node.op_type} {node.name}: changed or new at opset 18, no conversion written")
    used = {name for node in graph.node for name in node.input}
    unused = [init for init in graph.initializer if init.name not in used and init.name not in constants_kept(graph)]
    for init in unused:  # the axes inputs folded into attributes above
        graph.initializer.remove(init)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 17
    return model


def constants_kept(graph: onnx.GraphProto) -> set[str]:
    """Initializers that must stay even if no node reads them: graph outputs and (old-style) graph inputs."""
    return {v.name for v in (*graph.output, *graph.input)}


# ----------------------------------------------------------------------------------------------------------------
# session cache (used by tests/models/conftest.py)

# Process-wide, so the several test directories that use the zoo pay for each export once per pytest run
# (a dynamo export costs seconds); files stay in the directory of the Zoo that first asked for them.
_MODULES: dict[str, torch.nn.Module] = {}
_EXPORTS: dict[tuple[str, str, int], ExportedModel] = {}
BUILD_SECONDS: dict[str, float] = {}


class Zoo:
    """Exports lazily, once per (model, exporter, opset) per process; builds each torch model once."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)

    @staticmethod
    def exported() -> list[ExportedModel]:
        """Every export made in this process so far, by any Zoo."""
        return list(_EXPORTS.values())

    def get(self, name: str, exporter: str, opset: int) -> ExportedModel:
        key = (name, exporter, opset)
        if key not in _EXPORTS or not _EXPORTS[key].path.exists():
            spec = SPECS[name]
            if name not in _MODULES:
                t0 = time.perf_counter()
                _MODULES[name] = spec.build()
                BUILD_SECONDS[name] = time.perf_counter() - t0
            if exporter == "dynamo" and opset == 17:  # one dynamo export serves opsets 18 and 17
                _EXPORTS[key] = downgrade_export(self.get(name, exporter, DYNAMO_NATIVE_OPSET), self.out_dir)
            else:
                _EXPORTS[key] = export_model(spec, self.out_dir, exporter, opset, module=_MODULES[name])
        return _EXPORTS[key]


# ----------------------------------------------------------------------------------------------------------------
# full-depth models for optimizer work (not used by the default tests)

def resnet50_shaped(width_divisor: int = 8, image_size: int = 64) -> ModelSpec:
    """ResNet-50's layout (stem, bottleneck stages 3-4-6-3, 1000 classes) with channels divided by
    `width_divisor` (1 = the real ResNet-50, 25.6M parameters); feeds are `image_size` square (224 = real)."""
    hidden = [256 // width_divisor, 512 // width_divisor, 1024 // width_divisor, 2048 // width_divisor]
    build = _seeded(lambda: _resnet(embedding_size=64 // width_divisor, hidden_sizes=hidden, depths=[3, 4, 6, 3],
                                    num_labels=1000))
    return ModelSpec(f"resnet50_div{width_divisor}", build, ("pixel_values",), ("logits",),
                     _image_feeds_of(image_size), text=False)


def bert_base_shaped(width_divisor: int = 8) -> ModelSpec:
    """BERT-base's layout (12 layers, 12 heads, FFN 4x hidden, 30522-token vocab, 512 positions) with the
    hidden size divided by `width_divisor` (1 = the real BERT-base, 110M parameters)."""
    hidden = 768 // width_divisor
    if hidden % 12:
        raise ValueError(f"768 / {width_divisor} is not a multiple of 12 heads")
    build = _seeded(lambda: _bert(vocab_size=30522, hidden_size=hidden, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=4 * hidden, max_position_embeddings=512))
    return ModelSpec(f"bert_base_div{width_divisor}", build, _BERT_IN, ("last_hidden_state", "pooler_output"),
                     _token_feeds(30522, _BERT_IN), text=True)


def export_full_depth(which: str, out_dir: str | os.PathLike, exporter: str = "torchscript", opset: int = 17,
                      width_divisor: int = 8) -> ExportedModel:
    """Export "resnet50" or "bert_base" (see `resnet50_shaped`, `bert_base_shaped`), e.g.

        python -c "from tests.models import zoo; print(zoo.export_full_depth('bert_base', '/tmp', width_divisor=1).path)"
    """
    specs = {"resnet50": resnet50_shaped, "bert_base": bert_base_shaped}
    return export_model(specs[which](width_divisor), out_dir, exporter, opset)
