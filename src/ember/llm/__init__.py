"""ember's LLM engine: checkpoints (Hugging Face folders, GGUF) of Llama 2/3, Mistral, Qwen2 and Baichuan2-7B,
a paged KV cache, continuous batching, sampling, and an OpenAI-compatible server (serve/openai_app.py).

    from ember.llm import LLMEngine, SamplingParams
    llm = LLMEngine.load("model.engine")                  # or a checkpoint folder, or a .gguf file
    print(llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))[0].text)

Modules: config (one config for every architecture), checkpoint / gguf_file (reading), loader (dtype and
weight scheme), engine_file (the .engine), model (the transformer), attention and kv_cache (paged KV),
scheduler (continuous batching), sampling, outputs (text, stop strings), engine (the step), runner and
graphs (CUDA graphs of decode steps), server (the asyncio front of the engine), kernels (Triton).
"""
from __future__ import annotations

from typing import Any

__all__ = ["EngineOptions", "LLMEngine", "SamplingParams", "load_model"]


def __getattr__(name: str) -> Any:  # lazy: `import ember.llm` stays cheap for the CLI
    if name in ("LLMEngine", "EngineOptions"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name == "load_model":
        from .loader import load_model

        return load_model
    raise AttributeError(name)
