"""The LLM engine: the model, the KV pools it owns, the scheduler, the sampler, and the step that ties them.

    llm = LLMEngine.load("model.engine")          # or a checkpoint folder / .gguf file
    for out in llm.stream("What is the capital of France?", SamplingParams(temperature=0), chat=True):
        print(out.text, end="")

``step()`` runs one scheduled batch (runner.py executes it: CUDA graphs for decode batches on a GPU) and
returns each request's news. The engine is single-threaded; server.py's AsyncLLM drives it from a
thread of its own.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .attention import StepInputs, prefill_tiles
from .errors import RequestError
from .kv_cache import BLOCK_SIZE, BlockManager, KVCache, blocks_needed
from .loader import LoadedModel, load_model
from .model import Transformer
from .outputs import OutputState, RequestOutput, TokenLogprob
from .runner import ModelRunner
from .sampling import SampleRow, Sampler, SamplingParams
from .scheduler import Request, Scheduled, Scheduler
from .tokenizer import Tokenizer

log = logging.getLogger("ember.llm")
Prompt = Union[str, Sequence[int]]


@dataclass
class EngineOptions:
    max_model_len: Optional[int] = None  # default: the model's, capped at 8192
    max_num_seqs: Optional[int] = None  # default: 256 on a GPU, 64 on the CPU
    max_num_batched_tokens: Optional[int] = None  # per step; default 8192 on a GPU, 512 on the CPU
    num_blocks: Optional[int] = None  # KV blocks; default from kv_cache_bytes / the GPU's free memory
    kv_cache_bytes: Optional[int] = None  # default: 1 GiB on the CPU, 90% of the free GPU memory
    prefix_caching: bool = True
    max_waiting: int = 1024  # queued requests before add_request refuses (QueueFullError)
    cuda_graphs: bool = True
    prefill_graph_tokens: int = 2048  # steps that prefill up to this many tokens run as graphs (0: none)
    seed: Optional[int] = None


class LLMEngine:
    def __init__(self, model: LoadedModel, device: "torch.device | str | None" = None,
                 options: Optional[EngineOptions] = None):
        self.options = opt = options or EngineOptions()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.loaded = model
        self.config = cfg = model.config
        self.name = model.name
        self.tokenizer = Tokenizer(model.tokenizer, f"model '{model.name}'")
        self.max_model_len = min(opt.max_model_len or min(cfg.max_position_embeddings, 8192),
                                 cfg.max_position_embeddings)
        self.model = Transformer(cfg, model.weights, model.scheme, self.max_model_len, self.device)
        num_blocks = opt.num_blocks or self._default_blocks(cuda)
        self.kv = KVCache(cfg, num_blocks, self.model.dtype, self.device)
        self.blocks = BlockManager(num_blocks, opt.prefix_caching)
        self.scheduler = Scheduler(self.blocks, opt.max_num_seqs or (256 if cuda else 64),
                                   opt.max_num_batched_tokens or (8192 if cuda else 512), self.max_model_len,
                                   opt.max_waiting)
        self.max_blocks_per_seq = blocks_needed(self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv, self.max_blocks_per_seq, self.scheduler.max_num_seqs,
                                  cuda_graphs=opt.cuda_graphs,
                                  prefill_graph_tokens=min(opt.prefill_graph_tokens,
                                                           self.scheduler.max_num_batched_tokens))
        if cuda:  # at load, not in the first requests' steps
            for graphs in (self.runner.prefill_graphs, self.runner.graphs):
                if graphs is not None:
                    graphs.capture_all()
        self.sampler = Sampler(self.device, opt.seed)
        self.requests: dict[str, Request] = {}
        self.steps = 0

    @classmethod
    def load(cls, src: Any, device: "torch.device | str | None" = None, dtype: "str | None" = None,
             weights: Optional[str] = None, options: Optional[EngineOptions] = None,
             verify_key: "bytes | None" = None) -> "LLMEngine":
        """From an LLM engine file, a Hugging Face checkpoint folder or a GGUF file."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_model(src, dtype, weights, dev, verify_key), dev, options)

    def _default_blocks(self, cuda: bool) -> int:
        per_block = self.config.kv_bytes_per_token(self.model.dtype.itemsize) * BLOCK_SIZE
        budget = self.options.kv_cache_bytes
        if budget is None:
            if cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.9) - (1 << 30)  # leave room for activations and graphs
            else:
                budget = 1 << 30
        return max(budget // per_block, blocks_needed(self.max_model_len) + 1)

    # -- requests ----------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.chat_prompt_ids([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """RequestError when the request cannot run on this engine (changes nothing: callers on other
        threads use it to answer at once)."""
        params.validate()
        vocab = self.config.vocab_size
        for t in params.stop_token_ids:
            if not 0 <= t < vocab:
                raise RequestError(f"stop_token_ids: {t} is not a token id of this model")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        self.scheduler.check(len(prompt_ids))

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: Optional[str] = None) -> Request:
        self.check_request(prompt_ids, params)
        req = Request(list(prompt_ids), params, generator=params.generator(self.device))
        if request_id is not None:
            if request_id in self.requests:
                raise RequestError(f"request id '{request_id}' is in use")
            req.id = request_id
        req.state = OutputState(self.tokenizer, req)
        self.scheduler.add(req)
        self.requests[req.id] = req
        return req

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request and free its KV blocks (a client went away)."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return None
        self.scheduler.finish(req, "abort")
        return self._output(req, [], [], final_text=False)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.steps += 1
        inputs = self._inputs(scheduled)
        sampling = [s.request for s in scheduled if s.samples]
        rows = [SampleRow(r.params, r.prompt_ids, r.output_ids, r.generator) for r in sampling]
        self.runner.prepare(inputs)
        with self.runner.launching():
            logits = self.runner.run(inputs)
            sampled = self.sampler(logits, rows)
        for s in scheduled:
            self.scheduler.computed(s)
        now = time.monotonic()
        outputs = []
        for i, req in enumerate(sampling):
            lp = sampled.logprobs[i] if sampled.logprobs else None
            outputs.append(self._append(req, sampled.tokens[i], lp, now))
        return outputs

    def _inputs(self, scheduled: list[Scheduled]) -> StepInputs:
        """The step's inputs as host tensors (runner.py moves them: into a graph's buffers, or to the device)."""
        tokens: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        starts, q_lens, seq_lens, rows = [0], [], [], []
        for s in scheduled:
            req, n, c = s.request, s.num_tokens, s.request.num_computed
            if n == 1:
                tokens.append(req.token(c))
                positions.append(c)
                slots.append(req.block_ids[c // BLOCK_SIZE] * BLOCK_SIZE + c % BLOCK_SIZE)
            else:
                tokens += req.tokens(c, c + n)
                positions += range(c, c + n)
                p, end = c, c + n
                while p < end:  # a run of slots per block, not a Python step per token
                    first = req.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                    take = min(BLOCK_SIZE - p % BLOCK_SIZE, end - p)
                    slots += range(first, first + take)
                    p += take
            q_lens.append(n)
            seq_lens.append(c + n)
            starts.append(starts[-1] + n)
            if s.samples:
                rows.append(starts[-1] - 1)
        width = max(len(s.request.block_ids) for s in scheduled)
        table = [s.request.block_ids + [0] * (width - len(s.request.block_ids)) for s in scheduled]
        long = torch.long
        decode_only = all(n == 1 for n in q_lens)
        return StepInputs(tokens=torch.tensor(tokens, dtype=long), positions=torch.tensor(positions, dtype=long),
                          slots=torch.tensor(slots, dtype=long), block_tables=torch.tensor(table, dtype=torch.int32),
                          seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                          query_starts=torch.tensor(starts, dtype=torch.int32),
                          logit_rows=torch.tensor(rows, dtype=long), q_lens=q_lens, seq_lens_host=seq_lens,
                          prefill_tiles=None if decode_only else prefill_tiles(q_lens))

    def _append(self, req: Request, token: int, lp: Any, now: float) -> RequestOutput:
        p = req.params
        req.output_ids.append(token)
        if req.first_token is None:
            req.first_token = now
        req.last_token = now
        state: OutputState = req.state
        reason = None
        stop_token = (token in self.tokenizer.stop_token_ids and not p.ignore_eos) or token in p.stop_token_ids
        if stop_token:
            reason = "stop"
        elif state.add(token, p.include_stop_str_in_output):
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            reason = "length"
        logprobs = []
        if lp is not None:
            chosen, top = lp
            text = self.tokenizer.token_text
            logprobs.append(TokenLogprob(token, text(token), chosen, [(t, text(t), v) for t, v in top]))
        if reason is not None:
            self.scheduler.finish(req, reason)
            self.requests.pop(req.id, None)
        return self._output(req, [token], logprobs, final_text=reason is not None)

    def _output(self, req: Request, tokens: list[int], logprobs: list, final_text: bool) -> RequestOutput:
        return RequestOutput(req.id, req.state.take(final_text), tokens, req.finished, req.finish_reason, logprobs,
                             len(req.prompt_ids), len(req.output_ids), req.cached_tokens, req.first_scheduled)

    # -- conveniences ------------------------------------------------------------------------------------------
    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None, chat: bool = False
               ) -> Iterator[RequestOutput]:
        """One request, its outputs as they come (the engine must have no other work)."""
        req = self.add_request(self.prompt_ids(prompt, chat), params or SamplingParams())
        while not req.finished:
            for out in self.step():
                if out.request_id == req.id:
                    yield out

    def generate(self, prompts: Sequence[Prompt], params: "SamplingParams | Sequence[SamplingParams] | None" = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Run prompts to completion together; one RequestOutput each with the whole text and tokens."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add_request(self.prompt_ids(p, chat), sp) for p, sp in zip(prompts, plist)]
        results = {r.id: RequestOutput(r.id, "", [], prompt_tokens=len(r.prompt_ids)) for r in reqs}
        while self.has_unfinished():
            for out in self.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.text += out.text
                res.token_ids += out.token_ids
                res.logprobs += out.logprobs
                res.finished, res.finish_reason = out.finished, out.finish_reason
                res.completion_tokens, res.cached_tokens = out.completion_tokens, out.cached_tokens
        return [results[r.id] for r in reqs]

    def next_token_logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """[vocab] fp32: the logits after one prefill of ``prompt_ids`` (the engine must be idle)."""
        if self.has_unfinished():
            raise RequestError("next_token_logits needs an idle engine")
        ids = self.prompt_ids(prompt_ids)
        req = Request(ids, SamplingParams(max_tokens=1))
        req.block_ids = self.blocks.allocate(blocks_needed(len(ids)))
        try:
            inputs = self._inputs([Scheduled(req, len(ids))])
            self.runner.prepare(inputs)
            with self.runner.launching():
                logits = self.runner.run(inputs)
        finally:
            self.blocks.release(req.block_ids)
        return logits[0].cpu()

    def kv_usage(self) -> float:
        return self.blocks.usage()
