"""LLM decode and serving speed (issue 12): ember's LLM engine against HF `generate` and a gpt-fast-style peer
(static KV cache, torch.compile mode="reduce-overhead", i.e. CUDA graphs: the strongest plain-PyTorch peer),
one process, one GPU, the same random fp16 weights of the Llama-2-7B shape.

Metrics (targets from docs/llm.md / BENCHMARKS.md):
  decode b1      output tok/s of one request, 128 prompt tokens, 128 generated (decode time only)  >= 280
  decode b8      output tok/s of 8 such requests together
  first token    ms from submitting a 128-token prompt to its first token, b1                      <= 4 ms
  256 x 128/128  output tok/s of 256 requests submitted at once (prefill included)                >= 14,000
  int8 b1        decode b1 with int8 weight-only linear layers, and its ratio to fp16 b1           >= 1.6x
The bound each is held against (weights read once per step at the measured copy bandwidth) is printed too.

Method: greedy decoding (argmax), end-of-sequence ignored, so every run generates exactly its tokens. ember
runs through LLMEngine.step() (scheduler, decode CUDA graphs per batch bucket, sampling, detokenization:
the serving path minus HTTP); HF through model.generate; the peer through its own compiled step. Medians
of a few runs after a warm-up. Before timing, each candidate's next-token logits on one prompt are
compared with HF's (fp16; relative L2 reported; above 2e-2 the candidate is marked WRONG).

Budget: parts run in this order and each is skipped (and reported) when the time left (--budget,
default 450 s, under the 8 minutes allowed) is less than its estimate: ember fp16 (all metrics), ember
int8 b1, peer b1 + first token, HF (b1, b8, first token, 256), peer b8, peer int8 b1 (``--parts`` picks
some, so a second call can run what the budget skipped; torch.compile's cache makes its recompiles
shorter). The JSON (--out) is written after every part; the table is printed last.

    PYTHONPATH=src python benchmarks/llm_peers.py --out $OUT/llm_peers.json
    PYTHONPATH=src python benchmarks/llm_peers.py --tiny --device cpu --no-compile --out /tmp/llm.json  # dry run
    PYTHONPATH=src python benchmarks/llm_peers.py --budget 200 --parts ember --profile-prefill --out $OUT/p.json

First token is measured through the engine as a user drives it (add_request, step() until the token):
a 128-token prompt runs as the prefill graph of its bucket (printed: [tokens, sequences]); the same
engine with its prefill graphs set aside gives the eager step's time next to it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T0 = time.monotonic()
PROMPT, NEW = 128, 128


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.end = T0 + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate: float, what: str, results: dict) -> bool:
        if self.left() >= estimate:
            return True
        results.setdefault("skipped", []).append(f"{what}: needs ~{estimate:.0f} s, {self.left():.0f} s left")
        log(f"skip {what} (needs ~{estimate:.0f} s, {self.left():.0f} s left)")
        return False


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- the model ---------------------------------------------------------------------------------------------
def hf_config(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def make_hf_model(cfg: Any, dev: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def tokenizer_spec() -> Any:
    """A byte-level tokenizer (the weights are random: text does not matter, the engine's path does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from ember.llm.gguf_file import _bytes_to_unicode
    from ember.llm.tokenizer import TokenizerSpec

    spelling = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={spelling[b]: b for b in range(256)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return TokenizerSpec(tokenizer_json=tk.to_str())


def ember_weights(hf: Any, cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """ember's config and fused weights from the HF model's state dict (the loader's own mapping)."""
    from ember.llm.checkpoint import map_hf_weights
    from ember.llm.config import config_from_hf

    ecfg = config_from_hf({**cfg.to_dict(), "model_type": "llama"}, "benchmark config")
    sd = hf.state_dict()
    return ecfg, map_hf_weights(ecfg, lambda name: sd.get(name), "benchmark")


# ---- ember ---------------------------------------------------------------------------------------------------
def ember_engine(ecfg: Any, weights: dict[str, torch.Tensor], scheme: str, dev: torch.device, dtype: torch.dtype,
                 kv_bytes: int, max_seqs: int, prefill_graph_tokens: int = 2048) -> Any:
    from ember.llm.engine import EngineOptions, LLMEngine
    from ember.llm.loader import LoadedModel
    from ember.llm.quant import LINEAR_SUFFIXES, quantize

    if scheme != "dense":
        out: dict[str, torch.Tensor] = {}
        linear = {f"layers.{i}.{s}" for i in range(ecfg.num_layers) for s in LINEAR_SUFFIXES}
        for name, w in weights.items():
            base = name.rpartition(".")[0]
            if base in linear:
                out.update(quantize(w, scheme, dtype).tensors(base))
            else:
                out[name] = w
        weights = out
    model = LoadedModel(ecfg, weights, tokenizer_spec(), dtype, scheme, "llama-2-7b-shape", "random")
    opts = EngineOptions(max_model_len=PROMPT + NEW + 16, max_num_seqs=max_seqs, kv_cache_bytes=kv_bytes,
                         max_num_batched_tokens=8192 if dev.type == "cuda" else 512, prefix_caching=False,
                         prefill_graph_tokens=prefill_graph_tokens)
    return LLMEngine(model, dev, opts)


def ember_run(engine: Any, prompts: list[list[int]], new: int) -> dict[str, float]:
    """Submit all prompts, step to the end; times of the first token (each) and the wall time."""
    from ember.llm.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    firsts: dict[str, float] = {}
    last = t0
    while engine.has_unfinished():
        for o in engine.step():
            now = time.perf_counter()
            firsts.setdefault(o.request_id, now)
            last = now
    tokens = sum(len(r.output_ids) for r in reqs)
    first_done = max(firsts.values())
    return {"wall": last - t0, "ttft": statistics.median(v - t0 for v in firsts.values()),
            "decode_tps": (tokens - len(reqs)) / max(last - first_done, 1e-9), "tokens": tokens}


def profile_prefill(engine: Any, prompt: list[int], dev: torch.device) -> dict[str, Any]:
    """One first token (a 128-token prefill step and its sampling) through engine.step() under torch.profiler:
    the top 15 kernels by device time, the number of kernel launches and their device time, and the
    host time of the step, so one GPU call says what remains."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    ember_run(engine, [prompt], 1)
    sync(dev)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        ember_run(engine, [prompt], 1)
        sync(dev)
        wall = time.perf_counter() - t0
    device_ops = [e for e in prof.events() if e.device_type.name in ("CUDA", "PrivateUse1")]
    kernels = [e for e in device_ops if not e.name.startswith(("Memcpy", "Memset"))]
    kernel_us = sum(e.device_time_total for e in kernels)
    sort = "device_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    pg = engine.runner.prefill_graphs
    out = {"wall_ms_under_profiler": wall * 1e3, "kernels": len(kernels), "kernel_time_ms": kernel_us / 1e3,
           "copies_and_memsets": len(device_ops) - len(kernels),
           "bucket": list(pg.last) if pg is not None and pg.last else None}
    log(f"prefill profile: {out['kernels']} kernels ({out['copies_and_memsets']} copies and memsets besides), "
        f"{out['kernel_time_ms']:.2f} ms of kernel time, "
        f"{out['wall_ms_under_profiler']:.2f} ms wall under the profiler, graph bucket {out['bucket']}")
    return out


# ---- the gpt-fast-style peer ---------------------------------------------------------------------------------
class PeerLlama(torch.nn.Module):
    """gpt-fast's recipe: plain PyTorch, fused QKV and gate/up projections, static KV caches written with
    index_copy_, SDPA with a boolean mask, one compiled decode step (CUDA graphs via reduce-overhead).
    Weights and caches are registered buffers (sharing the given tensors), as torch.compile's CUDA graphs
    want the state a step mutates or reads to be the module's."""

    def __init__(self, ecfg: Any, w: dict[str, torch.Tensor], int8: bool = False):
        super().__init__()
        from ember.llm.rope import rope_table

        self.cfg, self.int8, self.layers = ecfg, int8, ecfg.num_layers
        for name, t in w.items():
            self.register_buffer(name.replace(".", "_"), t, persistent=False)
        emb = w["tok_embeddings.weight"]
        self.register_buffer("rope", rope_table(ecfg, ecfg.max_position_embeddings, emb.device), persistent=False)
        self.tied = "output.weight" not in w

    def t(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "_"))

    def setup_caches(self, batch: int, max_seq: int) -> None:
        c = self.cfg
        emb = self.t("tok_embeddings.weight")
        shape = (batch, c.num_kv_heads, max_seq, c.head_dim)
        for i in range(self.layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, dtype=emb.dtype, device=emb.device),
                                 persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, dtype=emb.dtype, device=emb.device),
                                 persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=emb.device)),
                             persistent=False)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.int8:  # gpt-fast's WeightOnlyInt8Linear
            return F.linear(x, self.t(f"{name}.weight").to(x.dtype)) * self.t(f"{name}.scale").to(x.dtype)
        return F.linear(x, self.t(f"{name}.weight"))

    @staticmethod
    def norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def rot(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cs = self.rope[pos]
        c = torch.cat((cs[:, 0], cs[:, 0]), -1)[None, None].to(x.dtype)
        s = torch.cat((cs[:, 1], cs[:, 1]), -1)[None, None].to(x.dtype)
        half = x.shape[-1] // 2
        return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

    def forward(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T = idx.shape
        x = self.t("tok_embeddings.weight")[idx]
        mask = self.mask[pos][None, None]
        for i in range(self.layers):
            p = f"layers.{i}"
            h = self.norm(x, self.t(f"{p}.attention_norm.weight"), c.rms_norm_eps)
            q, k, v = self.linear(h, f"{p}.attention.wqkv").split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = self.rot(q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2), pos)
            k = self.rot(k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2), pos)
            v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=c.num_heads != c.num_kv_heads)
            x = x + self.linear(y.transpose(1, 2).reshape(B, T, c.q_size), f"{p}.attention.wo")
            h = self.norm(x, self.t(f"{p}.ffn_norm.weight"), c.rms_norm_eps)
            gate, up = self.linear(h, f"{p}.feed_forward.w13").chunk(2, dim=-1)
            x = x + self.linear(F.silu(gate) * up, f"{p}.feed_forward.w2")
        x = self.norm(x[:, -1:], self.t("norm.weight"), c.rms_norm_eps)
        head = self.t("tok_embeddings.weight") if self.tied else self.t("output.weight")
        return F.linear(x, head)[:, -1].float()


def peer_steps(model: PeerLlama, compile_: bool, compile_prefill: bool = True) -> tuple[Callable, Callable]:
    """The compiled steps; prefill is compiled only where its time is measured (first token at b1)."""
    def prefill(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(idx, pos).argmax(-1)

    def decode(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(idx, pos).argmax(-1)

    if compile_:
        decode = torch.compile(decode, mode="reduce-overhead", fullgraph=True)
        if compile_prefill:
            prefill = torch.compile(prefill, fullgraph=True, dynamic=False)
    return prefill, decode


def peer_generate(model: PeerLlama, prefill: Callable, decode: Callable, prompts: torch.Tensor, new: int,
                  dev: torch.device) -> dict[str, float]:
    B, T = prompts.shape
    sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        tok = prefill(prompts, torch.arange(T, device=dev))
        sync(dev)
        t_first = time.perf_counter()
        pos = torch.tensor([T], device=dev)
        for _ in range(new - 1):
            tok = decode(tok.view(B, 1).clone(), pos)
            pos += 1
    sync(dev)
    end = time.perf_counter()
    return {"ttft": t_first - t0, "decode_tps": B * (new - 1) / (end - t_first), "wall": end - t0}


# ---- HF ------------------------------------------------------------------------------------------------------
def hf_generate(model: Any, prompts: torch.Tensor, new: int, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    sync(dev)
    return time.perf_counter() - t0


# ---- the run -------------------------------------------------------------------------------------------------
def copy_bandwidth(dev: torch.device) -> Optional[float]:
    if dev.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    return 2 * (1 << 30) / statistics.median(times)  # read + write bytes per second


def host() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton
        import transformers

        info.update(triton=triton.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama config (dry runs)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run")
    ap.add_argument("--no-compile", action="store_true", help="the peer without torch.compile")
    ap.add_argument("--concurrent", type=int, default=256)
    ap.add_argument("--kv-gib", type=float, default=40.0, help="ember's KV cache")
    ap.add_argument("--prefill-graph-tokens", type=int, default=2048,
                    help="ember: steps that prefill up to this many tokens run as CUDA graphs (0: eagerly)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="ember: print a torch.profiler table of one 128-token first token (top 15 kernels)")
    ap.add_argument("--parts", default="ember,ember-int8,peer-b1,hf,peer-b8,peer-int8",
                    help="which parts, in this order (a second call can run what the budget skipped)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    budget = Budget(args.budget)
    res: dict[str, Any] = {"args": vars(args), "host": host(), "ember": {}, "hf": {}, "peer": {}, "checks": {}}
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))

    def part(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # a failed part is reported; the others still run
            res.setdefault("failed", []).append(f"{name}: {type(e).__name__}: {e}")
            log(f"FAILED {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        save()

    cfg = hf_config(args.tiny)
    hf = make_hf_model(cfg, dev, dtype)
    ecfg, weights = ember_weights(hf, cfg)
    nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    bw = copy_bandwidth(dev)
    res["model"] = {"parameters": sum(p.numel() for p in hf.parameters()), "weight_bytes": nbytes,
                    "copy_bandwidth_Bps": bw}
    bound = bw / nbytes if bw else None
    log(f"model ready: {res['model']['parameters'] / 1e9:.2f} B parameters, {nbytes / 1e9:.1f} GB"
        + (f"; copy bandwidth {bw / 1e12:.2f} TB/s: decode b1 bound {bound:.0f} tok/s" if bw else ""))
    g = torch.Generator().manual_seed(1)
    vocab = cfg.vocab_size
    prompt = torch.randint(0, vocab, (PROMPT,), generator=g).tolist()
    many = [torch.randint(0, vocab, (PROMPT,), generator=g).tolist() for _ in range(args.concurrent)]
    with torch.inference_mode():
        ref_logits = hf(torch.tensor([prompt], device=dev)).logits[0, -1].float()
    conc = args.concurrent if dev.type == "cuda" else min(args.concurrent, 16)
    engines: dict[str, Any] = {}

    def ember_fp16() -> None:
        t = time.perf_counter()
        kv_bytes = int((args.kv_gib if dev.type == "cuda" else 0.25) * 2**30)
        eng = engines["fp16"] = ember_engine(ecfg, weights, "dense", dev, dtype, kv_bytes, 256,
                                             args.prefill_graph_tokens)
        r = res["ember"]
        r["load_and_capture_s"] = time.perf_counter() - t
        r["logits_rel_l2"] = rel_l2(eng.next_token_logits(prompt), ref_logits)
        log(f"ember fp16: ready in {r['load_and_capture_s']:.1f} s, logits rel L2 {r['logits_rel_l2']:.2e}")
        ember_run(eng, [prompt], 8)  # warm-up
        b1 = [ember_run(eng, [prompt], NEW) for _ in range(3)]
        r["decode_b1_tps"] = statistics.median(x["decode_tps"] for x in b1)
        pg = eng.runner.prefill_graphs
        replays = pg.replays if pg is not None else 0
        ttft = [ember_run(eng, [prompt], 1)["ttft"] for _ in range(10)]
        r["ttft_128_ms"] = statistics.median(ttft) * 1e3
        r["ttft_128_ms_p90"] = sorted(ttft)[8] * 1e3
        # the bucket (tokens, sequences) of the prefill graph that ran, or "eager"
        graphed = pg is not None and pg.replays - replays == 10
        r["ttft_128_path"] = f"graph bucket {list(pg.last)}" if graphed else "eager"
        if pg is not None:  # the same engine with its prefill graphs set aside: the eager step, for comparison
            eng.runner.prefill_graphs = None
            try:
                r["ttft_128_ms_eager"] = statistics.median(ember_run(eng, [prompt], 1)["ttft"] for _ in range(5)) * 1e3
            finally:
                eng.runner.prefill_graphs = pg
        log(f"ember fp16: first token {r['ttft_128_ms']:.2f} ms ({r['ttft_128_path']}); eager prefill "
            f"{r.get('ttft_128_ms_eager', float('nan')):.2f} ms")
        if args.profile_prefill:
            r["prefill_profile"] = profile_prefill(eng, prompt, dev)
        b8 = [ember_run(eng, many[:8], NEW) for _ in range(2)]
        r["decode_b8_tps"] = statistics.median(x["decode_tps"] for x in b8)
        log(f"ember fp16: b1 {r['decode_b1_tps']:.0f} tok/s, b8 {r['decode_b8_tps']:.0f} tok/s, first token "
            f"{r['ttft_128_ms']:.2f} ms")
        save()
        runs = [ember_run(eng, many[:conc], NEW) for _ in range(2)]
        best = min(runs, key=lambda x: x["wall"])
        r[f"concurrent_{conc}_tps"] = best["tokens"] / best["wall"]
        r[f"concurrent_{conc}_wall_s"] = best["wall"]
        r["preemptions"] = eng.scheduler.preemptions
        log(f"ember fp16: {conc} x {PROMPT}/{NEW}: {r[f'concurrent_{conc}_tps']:.0f} output tok/s "
            f"({best['wall']:.2f} s, {eng.scheduler.preemptions} preemptions)")

    def ember_int8() -> None:
        engines.pop("fp16", None)
        t = time.perf_counter()
        eng = ember_engine(ecfg, weights, "int8", dev, dtype, (4 << 30) if dev.type == "cuda" else (1 << 27), 16)
        r = res["ember"]
        r["int8_load_and_capture_s"] = time.perf_counter() - t
        r["int8_logits_rel_l2"] = rel_l2(eng.next_token_logits(prompt), ref_logits)
        ember_run(eng, [prompt], 8)
        r["int8_decode_b1_tps"] = statistics.median(ember_run(eng, [prompt], NEW)["decode_tps"] for _ in range(3))
        if r.get("decode_b1_tps"):
            r["int8_over_fp16_b1"] = r["int8_decode_b1_tps"] / r["decode_b1_tps"]
        log(f"ember int8: b1 {r['int8_decode_b1_tps']:.0f} tok/s (logits rel L2 vs fp16 HF "
            f"{r['int8_logits_rel_l2']:.2e})")
        del eng

    def hf_parts() -> None:
        r = res["hf"]
        p1 = torch.tensor([prompt], device=dev)
        hf_generate(hf, p1, 8, dev)
        t = statistics.median(hf_generate(hf, p1, NEW, dev) - hf_generate(hf, p1, 1, dev) for _ in range(2))
        r["decode_b1_tps"] = (NEW - 1) / t
        r["ttft_128_ms"] = statistics.median(hf_generate(hf, p1, 1, dev) for _ in range(5)) * 1e3
        p8 = torch.tensor(many[:8], device=dev)
        r["decode_b8_tps"] = 8 * (NEW - 1) / (hf_generate(hf, p8, NEW, dev) - hf_generate(hf, p8, 1, dev))
        log(f"HF: b1 {r['decode_b1_tps']:.0f} tok/s, b8 {r['decode_b8_tps']:.0f} tok/s, first token "
            f"{r['ttft_128_ms']:.1f} ms")
        save()
        if budget.allows(40 if dev.type == "cuda" else 5, f"HF {conc} concurrent", res):
            wall = hf_generate(hf, torch.tensor(many[:conc], device=dev), NEW, dev)
            r[f"concurrent_{conc}_tps"] = conc * NEW / wall
            log(f"HF: {conc} x {PROMPT}/{NEW}: {r[f'concurrent_{conc}_tps']:.0f} output tok/s")

    peer_w: dict[str, Any] = {}

    def peer(batch: int, int8: bool) -> None:
        key = "int8_" if int8 else ""
        if int8 and "int8" not in peer_w:
            from ember.llm.quant import LINEAR_SUFFIXES, quantize_int8

            q = dict(weights)
            for i in range(ecfg.num_layers):
                for s in LINEAR_SUFFIXES:
                    name = f"layers.{i}.{s}"
                    q[f"{name}.weight"], q[f"{name}.scale"] = quantize_int8(weights[f"{name}.weight"])
            peer_w["int8"] = q
        model = PeerLlama(ecfg, peer_w["int8"] if int8 else weights, int8)
        model.setup_caches(batch, PROMPT + NEW)
        if batch == 1 and not int8:
            with torch.inference_mode():
                logits = model(torch.tensor([prompt], device=dev), torch.arange(PROMPT, device=dev))[0]
            res["peer"]["logits_rel_l2"] = rel_l2(logits, ref_logits)
        prefill, decode = peer_steps(model, not args.no_compile and dev.type == "cuda", compile_prefill=batch == 1
                                     and not int8)
        prompts = torch.tensor([prompt] if batch == 1 else many[:batch], device=dev)
        t = time.perf_counter()
        peer_generate(model, prefill, decode, prompts, 8, dev)  # compiles
        peer_generate(model, prefill, decode, prompts, NEW, dev)
        res["peer"][f"{key}compile_and_warmup_b{batch}_s"] = time.perf_counter() - t
        runs = [peer_generate(model, prefill, decode, prompts, NEW, dev) for _ in range(3)]
        res["peer"][f"{key}decode_b{batch}_tps"] = statistics.median(x["decode_tps"] for x in runs)
        if batch == 1 and not int8:
            ttft = [peer_generate(model, prefill, decode, prompts, 1, dev)["ttft"] for _ in range(10)]
            res["peer"]["ttft_128_ms"] = statistics.median(ttft) * 1e3
        log(f"peer{' int8' if int8 else ''} b{batch}: {res['peer'][f'{key}decode_b{batch}_tps']:.0f} tok/s")

    cuda = dev.type == "cuda"
    compile_s = 0 if args.no_compile or not cuda else 120
    plan = {"ember": (120 if cuda else 10, ember_fp16), "ember-int8": (60 if cuda else 10, ember_int8),
            "peer-b1": (30 + compile_s, lambda: peer(1, False)), "hf": (60 if cuda else 10, hf_parts),
            "peer-b8": (20 + compile_s // 2, lambda: peer(8, False)),
            "peer-int8": (30 + compile_s // 2, lambda: peer(1, True))}
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in plan]
    if unknown:
        ap.error(f"unknown parts {unknown}; parts: {', '.join(plan)}")
    for name in wanted:
        estimate, fn = plan[name]
        if budget.allows(estimate, name, res):
            part(name, fn)
            if cuda:
                torch.cuda.empty_cache()
    print_table(res, conc, bound)
    save()
    return 0


def print_table(res: dict, conc: int, bound: Optional[float]) -> None:
    e, h, p = res["ember"], res["hf"], res["peer"]

    def fmt(v: Any, spec: str = ".0f") -> str:
        return "-" if v is None else format(v, spec)

    def check(rel: Any) -> str:
        return "" if rel is None else (" WRONG" if rel > 2e-2 else "")

    rows = [
        ("decode b1 (tok/s)", fmt(e.get("decode_b1_tps")), fmt(h.get("decode_b1_tps")), fmt(p.get("decode_b1_tps")),
         ">= 280", fmt(bound)),
        ("decode b8 (tok/s)", fmt(e.get("decode_b8_tps")), fmt(h.get("decode_b8_tps")), fmt(p.get("decode_b8_tps")),
         "", ""),
        ("first token, 128 in (ms)", fmt(e.get("ttft_128_ms"), ".2f") + (f" ({e['ttft_128_path']}; eager "
                                                                       f"{fmt(e.get('ttft_128_ms_eager'), '.2f')})"
                                                                       if e.get("ttft_128_path") else ""),
         fmt(h.get("ttft_128_ms"), ".2f"),
         fmt(p.get("ttft_128_ms"), ".2f"), "<= 4", fmt(1e3 / bound if bound else None, ".2f")),
        (f"{conc} x 128/128 (output tok/s)", fmt(e.get(f"concurrent_{conc}_tps")), fmt(h.get(f"concurrent_{conc}_tps")),
         "-", ">= 14000", ""),
        ("int8 decode b1 (tok/s)", fmt(e.get("int8_decode_b1_tps")), "-", fmt(p.get("int8_decode_b1_tps")),
         ">= 1.6x fp16", fmt(2 * bound if bound else None)),
        ("int8 / fp16 at b1", fmt(e.get("int8_over_fp16_b1"), ".2f"), "-",
         fmt(p.get("int8_decode_b1_tps") / p["decode_b1_tps"] if p.get("int8_decode_b1_tps") and p.get("decode_b1_tps")
             else None, ".2f"), ">= 1.6", ""),
        ("logits rel L2 vs HF", fmt(e.get("logits_rel_l2"), ".1e") + check(e.get("logits_rel_l2")), "0",
         fmt(p.get("logits_rel_l2"), ".1e") + check(p.get("logits_rel_l2")), "", ""),
    ]
    head = ("metric", "ember", "HF generate", "gpt-fast peer", "target", "bound")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for key in ("skipped", "failed"):
        for line in res.get(key, []):
            print(f"{key}: {line}")


if __name__ == "__main__":
    sys.exit(main())
