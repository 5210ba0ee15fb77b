"""`ember llm build` (a checkpoint into an LLM engine) and `ember generate` (stream a completion)."""
from __future__ import annotations

import sys
import time
from typing import Optional

import click

from .common import make_console

SOURCE = "Hugging Face checkpoint folder, .gguf file"


@click.group("llm")
def llm_group() -> None:
    """LLM engines: build one from a checkpoint (then `ember generate` or `ember serve` it)."""


@llm_group.command("build")
@click.argument("src", type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The engine file to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
              help="Activations, KV cache and unquantized weights.")
@click.option("--weights", type=click.Choice(["dense", "int8", "fp8", "q4"]), default="dense", show_default=True,
              help="Linear layers: dense (in --dtype), int8 / fp8 weight-only (per-channel scales), or 4-bit groups "
                   "(a GGUF's Q4_0/Q4_1 blocks kept as they are).")
@click.option("--sign-key", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Sign the engine (HMAC-SHA256); loads must then give the same key (--verify-key).")
def build_cmd(src: str, out: str, dtype: str, weights: str, sign_key: Optional[str]) -> None:
    """Build an LLM engine from SRC (a Hugging Face checkpoint folder or a .gguf file): config, weights,
    tokenizer and chat template in one file, no code."""
    from ..llm.engine_file import save_llm_engine
    from ..llm.loader import load_model
    from ..runtime.signing import load_key

    key = load_key(sign_key) if sign_key else None  # a bad key file fails before the work, not after it
    console = make_console()
    t0 = time.perf_counter()
    model = load_model(src, dtype=dtype, weights=weights)
    size = save_llm_engine(model, out, sign_key=key)
    cfg = model.config
    console.print(f"built {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s", markup=False)
    console.print(f"  {cfg.architecture}: {cfg.parameter_count() / 1e6:.1f} M parameters, {cfg.num_layers} layers, "
                  f"hidden {cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}; "
                  f"{dtype}, weights {weights}; chat template: "
                  f"{'yes' if model.tokenizer.chat_template else 'no'}", markup=False)
    if key is not None:
        console.print(f"  signed with the key in {sign_key}: load it with --verify-key {sign_key}", markup=False)


@click.command("generate")
@click.argument("model", type=click.Path(exists=True))
@click.argument("prompt")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@click.option("--system", default=None, help="A system message (with --chat).")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 is off.")
@click.option("--min-p", default=0.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--presence-penalty", default=0.0, show_default=True, type=float)
@click.option("--frequency-penalty", default=0.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed of the sampler (reproducible samples).")
@click.option("--stop", multiple=True, help="Stop at this text (several allowed); it is not printed.")
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-sequence token.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="For a checkpoint: fp32 on the CPU, fp16 on a GPU unless given (an engine keeps its own).")
@click.option("--weights", type=click.Choice(["dense", "int8", "fp8", "q4"]), default=None,
              help="For a checkpoint: the linear layers' scheme (an engine keeps its own).")
@click.option("--verify-key", type=click.Path(dir_okay=False), metavar="KEYFILE",
              help="Run only an engine signed with this key.")
@click.option("--stats", is_flag=True, help="Print token counts and speed to stderr.")
def generate_cmd(model: str, prompt: str, chat: bool, system: Optional[str], max_tokens: int, temperature: float,
                 top_p: float, top_k: int, min_p: float, repetition_penalty: float, presence_penalty: float,
                 frequency_penalty: float, seed: Optional[int], stop: tuple[str, ...], ignore_eos: bool, device: str,
                 dtype: Optional[str], weights: Optional[str], verify_key: Optional[str], stats: bool) -> None:
    """Stream a completion of PROMPT from MODEL (an LLM engine, a Hugging Face checkpoint folder or a .gguf
    file) to the terminal."""
    from ..errors import EmberError
    from ..llm.engine import EngineOptions, LLMEngine
    from ..llm.loader import is_engine_file
    from ..llm.sampling import SamplingParams
    from ..runtime.engine import resolve_device

    if is_engine_file(model) and (dtype or weights):
        raise EmberError(f"{model} is an engine: its dtype and weights were fixed when it was built; drop --dtype "
                         "and --weights, or give the checkpoint")
    if system and not chat:
        raise EmberError("--system needs --chat")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, seed=seed, stop=list(stop), ignore_eos=ignore_eos)
    t0 = time.perf_counter()
    llm = LLMEngine.load(model, device=resolve_device(device), dtype=dtype, weights=weights,
                         options=EngineOptions(max_num_seqs=1, seed=seed), verify_key=verify_key)
    loaded = time.perf_counter()
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = llm.tokenizer.chat_prompt_ids(messages)
    else:
        ids = llm.prompt_ids(prompt)
    req = llm.add_request(ids, params)
    first: Optional[float] = None
    tokens = 0
    reason = None
    out = sys.stdout
    while llm.has_unfinished():
        for o in llm.step():
            if o.request_id != req.id:
                continue
            if first is None:
                first = time.perf_counter()
            tokens += len(o.token_ids)
            out.write(o.text)
            out.flush()
            reason = o.finish_reason
    out.write("\n")
    out.flush()
    if stats:
        end = time.perf_counter()
        decode = (tokens - 1) / (end - first) if first is not None and tokens > 1 and end > first else 0.0
        err = make_console(stderr=True)
        err.print(f"{len(ids)} prompt tokens, {tokens} generated ({reason}); load {loaded - t0:.2f} s, first token "
                  f"{((first or end) - loaded) * 1e3:.0f} ms, {decode:.1f} tok/s after it, on {llm.device}",
                  markup=False)
