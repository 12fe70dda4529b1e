"""The engine: requests in, tokens out, one `step()` at a time (schedule -> run -> postprocess).

Not thread-safe: one thread owns it (the server's engine loop, or `LLM.generate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block_pool import BlockPool
from .config import CacheConfig, SchedulerConfig
from .kv_cache_manager import KVCacheManager
from .model import MTATransformer
from .model_runner import ModelRunner, StepLogits, num_cache_blocks
from .request import Request, RequestStatus, TokenLogprob
from .sampler import Sampler, logprob_record
from .sampling_params import SamplingParams
from .scheduler import Scheduler, ScheduledRequest
from .tokenizer import IncrementalDetokenizer


class RequestError(ValueError):
    """A request the engine cannot take (too long, out-of-vocabulary ids, duplicate id, ...)."""


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step. `new_token_ids` / `new_text` are what this step added."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_reported: int = 0  # output tokens already returned
    num_cached_tokens: int = field(default=-1)


class LLMEngine:
    def __init__(self, model: MTATransformer, tokenizer=None, cache: CacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache_config = cache or CacheConfig()
        self.scheduler_config = scheduler or SchedulerConfig()
        warmup_tokens = min(self.scheduler_config.max_num_batched_tokens, model.cfg.max_seq_len)
        self.num_blocks = num_cache_blocks(model, self.cache_config, warmup_tokens)
        self.pool = BlockPool(self.num_blocks, self.cache_config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, self.cache_config.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        self.runner = ModelRunner(model, self.kv, self.num_blocks)
        self.sampler = Sampler(seed)
        self.requests: dict[str, _Tracked] = {}

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self._prompt_ids(prompt)
        request = Request(request_id, ids, params, eos_token_id=getattr(self.tokenizer, "eos_id", None))
        self._check_fits(request)
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        self.requests[request_id] = _Tracked(request, detok)
        self.scheduler.add(request)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt, add_bos=True)
        else:
            ids = list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is out of range [0, {vocab})")
        return ids

    def _check_fits(self, request: Request) -> None:
        max_len = self.model.cfg.max_seq_len
        if request.max_num_tokens > max_len:
            raise RequestError(f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                               f"({request.params.max_tokens}) = {request.max_num_tokens} exceeds the context "
                               f"length {max_len}")
        need = self.kv.blocks_for(request.max_num_tokens)
        if need > self.num_blocks:
            raise RequestError(f"the request needs {need} KV-cache blocks of {self.kv.block_size} tokens but the "
                               f"cache has {self.num_blocks}; shorten it or give the cache more memory")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks are freed at once. False if it is unknown or done."""
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return False
        self.scheduler.finish(tracked.request, RequestStatus.FINISHED_ABORTED)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return []
        logits = self.runner.execute(batch.scheduled)
        return self._postprocess(batch.scheduled, logits)

    def _postprocess(self, scheduled: list[ScheduledRequest], logits: StepLogits) -> list[RequestOutput]:
        self._record_prompt_logprobs(logits)
        sampling = [s for s in scheduled if s.samples]
        samples = self.sampler.sample(logits.sample_logits, [s.request for s in sampling])
        self.scheduler.update(scheduled)
        for s, (token, record) in zip(sampling, samples):
            s.request.append_output(token)
            if record is not None:
                s.request.logprobs.append(record)
        outputs = []
        for s in scheduled:
            tracked = self.requests[s.request.request_id]
            if tracked.num_cached_tokens < 0:
                tracked.num_cached_tokens = s.start  # the prefix-cache hit of its first step
            if s.samples:
                outputs.append(self._output(tracked))
        return outputs

    def _record_prompt_logprobs(self, logits: StepLogits) -> None:
        for request_id, (first, rows) in logits.prompt_logits.items():
            request = self.requests[request_id].request
            logprobs = torch.log_softmax(rows, dim=-1)
            if not request.prompt_logprobs:
                request.prompt_logprobs.append(None)  # the first prompt token has no logprob
            for i in range(rows.shape[0]):
                target = request.prompt_token_ids[first + i + 1]
                request.prompt_logprobs.append(logprob_record(logprobs[i], target, request.params.prompt_logprobs))

    def _output(self, tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        new_ids = request.output_token_ids[tracked.num_reported:]
        tracked.num_reported = request.num_output_tokens
        finished = request.status.finished
        new_text = ""
        if tracked.detokenizer is not None:
            new_text = "".join(tracked.detokenizer.push(t) for t in new_ids)
            if finished:
                new_text += tracked.detokenizer.flush()
        tracked.text += new_text
        if finished:
            self.scheduler.finish(request, request.status)
            del self.requests[request.request_id]
        return RequestOutput(
            request.request_id, request.prompt_token_ids, request.output_token_ids, new_ids, tracked.text,
            new_text, finished, request.status.value if finished else None,
            request.logprobs if request.params.logprobs is not None else None,
            request.prompt_logprobs if request.params.prompt_logprobs is not None else None,
            max(tracked.num_cached_tokens, 0))
