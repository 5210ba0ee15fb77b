"""LLM engines: the same file as a model engine (runtime/format.py: a zip of digest, manifest, graph.json
and weights.safetensors, checked member by member, optionally signed), with ``"kind": "llm"`` in the
manifest. graph.json holds a graph without nodes whose metadata carries the model config, the weight
scheme and the tokenizer (its JSON and chat template); the weights are its constants. No code.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from safetensors.torch import load as st_load

from ..errors import EngineFileError
from ..ir.graph import Graph
from ..ops.torch_types import tensor_to_numpy
from ..runtime.format import GRAPH, WEIGHTS, EngineArchive, write_engine
from ..runtime.signing import KeySource, load_key
from .config import ModelConfig
from .loader import DTYPES, LoadedModel
from .quant import SCHEMES
from .tokenizer import TokenizerSpec

KIND = "llm"
LLM_FORMAT = 1  # of the graph metadata's "llm" entry


def save_llm_engine(model: LoadedModel, path: "str | os.PathLike", sign_key: "KeySource | None" = None) -> int:
    """Write the engine; returns its size in bytes."""
    import ember

    graph = Graph(name=f"llm:{model.name}")
    graph.metadata["llm"] = {"format": LLM_FORMAT, "config": model.config.to_json(), "dtype": model.dtype_name,
                             "weights": model.scheme, "name": model.name, "tokenizer": model.tokenizer.to_json()}
    for name, t in model.weights.items():
        graph.add_const(name, tensor_to_numpy(t.contiguous()))
    cfg = model.config
    manifest: dict[str, Any] = {
        "kind": KIND,
        "ember_version": ember.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"file": os.path.basename(str(model.source))},
        "backend": "reference",
        "precision": model.dtype_name,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["tokens"]},
                   {"name": "block_tables", "dtype": "int32", "shape": ["sequences", "blocks"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["sequences", cfg.vocab_size]}],
        "llm": {"architecture": cfg.architecture, "weights": model.scheme, "parameters": cfg.parameter_count(),
                "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                "max_position_embeddings": cfg.max_position_embeddings,
                "chat_template": model.tokenizer.chat_template is not None},
    }
    key = load_key(sign_key) if sign_key is not None else None
    return write_engine(path, graph, manifest, sign_key=key)


def is_llm_manifest(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == KIND


def read_llm_engine(path: "str | os.PathLike", verify_key: "KeySource | None" = None) -> LoadedModel:
    """Load an LLM engine: every member checked as format.py checks it (digest, sizes, SHA-256, signature:
    a signed engine needs its key)."""
    path = os.fspath(path)
    key = load_key(verify_key) if verify_key is not None else None
    with EngineArchive.open(path, key, require_key_if_signed=True) as arc:
        if not is_llm_manifest(arc.manifest):
            raise EngineFileError(f"engine '{path}' is a model engine, not an LLM engine; run it with `ember run`, "
                                  "or build an LLM engine with `ember llm build`")
        graph_bytes, weights_bytes = arc.read(GRAPH), arc.read(WEIGHTS)
    try:
        meta = json.loads(graph_bytes)["metadata"]["llm"]
        if not isinstance(meta, dict) or meta.get("format") != LLM_FORMAT:
            raise EngineFileError(f"engine '{path}': LLM entry format {meta.get('format')!r} is not {LLM_FORMAT}; "
                                  "rebuild it with this ember (`ember llm build`)")
        where = f"engine '{path}'"
        config = ModelConfig.from_json(meta["config"], where)
        tokenizer = TokenizerSpec.from_json(meta["tokenizer"], where)
        dtype, scheme, name = meta["dtype"], meta["weights"], str(meta.get("name", "model"))
    except (ValueError, KeyError, TypeError) as e:
        raise EngineFileError(f"engine '{path}': {GRAPH} has no valid LLM entry ({type(e).__name__}: {e}); rebuild "
                              "it with `ember llm build`") from None
    if dtype not in DTYPES or scheme not in SCHEMES:
        raise EngineFileError(f"engine '{path}': dtype '{dtype}' / weights '{scheme}' are unknown to this ember")
    try:
        tensors = st_load(weights_bytes)
    except Exception as e:  # safetensors reports malformed headers under several types
        raise EngineFileError(f"engine '{path}': {WEIGHTS} cannot be read ({type(e).__name__}: {e})") from None
    del weights_bytes
    weights = {k[len("const/"):]: t for k, t in tensors.items() if k.startswith("const/")}
    return LoadedModel(config, weights, tokenizer, DTYPES[dtype], scheme, name, path)
