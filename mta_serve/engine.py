"""The engine: requests in, tokens out, one `step()` at a time (schedule -> run -> postprocess).

With `overlap_steps` (the default on CUDA) the host works one step ahead of the device: `step()` schedules
and launches step N+1 while step N still computes, then reads N's tokens, detokenizes, checks stop strings
and returns N's outputs, which the caller streams while the GPU computes N+1. A request that step N draws a
token for holds a placeholder for it (`Request.append_pending`) and is scheduled in N+1 all the same; N+1's
model runner takes the token from N's sampled tokens on the device. The GPU then waits for the host only
where the host's work per step exceeds the device's.

What N+1 cannot know yet costs at most one step per request. A request that N's token ends (EOS, a stop
token), or that a stop string or an abort ends while it is in the step in flight, has that step's token
discarded. A step that draws for a request with penalties completes before the next is launched, since the
penalties count the generated tokens on the host. Blocks freed while a step is in flight may go to the next
step: the device runs steps in order, so the step in flight is done with them before the next one writes
them. A discarded draw has still taken its random number: with a fixed engine seed, requests without their
own seed may then draw differently than without overlap (requests with a seed never do).

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
from .sampler import PendingSamples, Sampler, logprob_record
from .sampling_params import SamplingParams, SamplingParamsError, as_token_id
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
    arrival_time: float = 0.0  # time.monotonic() when added
    first_scheduled_time: float | None = None  # when it started computing (queue time = this - arrival)


@dataclass(slots=True)
class _InFlight:
    """A launched step: its forward and sampling are queued on the device."""

    scheduled: list[ScheduledRequest]
    logits: StepLogits
    sampling: list[ScheduledRequest]  # the scheduled requests that sample, in the order of `samples`
    samples: PendingSamples

    @property
    def reads_outputs(self) -> bool:
        """Whether the next step's sampling needs this step's tokens on the host: penalties count the
        generated tokens, so a step that draws for a penalized request completes before the next launches."""
        return any(s.request.params.penalized for s in self.sampling)


@dataclass(slots=True)
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # all decoded text (cut at a stop string)
    num_emitted_chars: int = 0  # text already returned; stop-string candidates are held back
    num_reported: int = 0  # output tokens already returned
    num_cached_tokens: int = field(default=-1)

    @property
    def holdback(self) -> int:
        """Characters held back while a stop string could still be completing."""
        stops = self.request.params.stop
        return max(map(len, stops)) - 1 if stops else 0


class LLMEngine:
    def __init__(self, model: MTATransformer, tokenizer=None, cache: CacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.cache_config = cache or CacheConfig()
        self.scheduler_config = scheduler or SchedulerConfig()
        warmup_tokens = min(self.scheduler_config.max_num_batched_tokens, model.cfg.max_seq_len)
        self.num_blocks = num_cache_blocks(model, self.cache_config, warmup_tokens,
                                           self.scheduler_config.max_num_seqs)
        self.pool = BlockPool(self.num_blocks, self.cache_config.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, self.cache_config.block_size, self.scheduler_config.max_num_seqs)
        self.scheduler = Scheduler(self.scheduler_config, self.kv)
        self.runner = ModelRunner(model, self.kv, self.num_blocks, self.cache_config.attention_backend,
                                  cuda_graphs=not self.cache_config.enforce_eager,
                                  max_num_seqs=self.scheduler_config.max_num_seqs)
        self.sampler = Sampler(seed)
        self.requests: dict[str, _Tracked] = {}
        overlap = self.scheduler_config.overlap_steps
        self.overlap_steps = self.runner.device.type == "cuda" if overlap is None else overlap
        self._in_flight: _InFlight | None = None

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self._prompt_ids(prompt)
        self.validate(ids, params)
        request = Request(request_id, ids, params, eos_token_id=getattr(self.tokenizer, "eos_id", None))
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        self.requests[request_id] = _Tracked(request, detok)
        self.scheduler.add(request)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [as_token_id(t) for t in prompt]
        if self.tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer; pass token ids instead")
        return self.tokenizer.encode(prompt, add_bos=True)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request can never run. Reads only fixed configuration, so any thread
        (the server, before queueing) may call it."""
        vocab = self.model.cfg.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        not_ints = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)]
        if not_ints:
            raise RequestError(f"token id {not_ints[0]!r} is not an integer")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]!r} is out of range [0, {vocab})")
        bad_bias = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad_bias:
            raise SamplingParamsError("logit_bias", f"logit_bias token id {bad_bias[0]} is out of range [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer to decode the output")
        max_len, total = self.model.cfg.max_seq_len, len(prompt_ids) + params.max_tokens
        if total > max_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                               f"exceeds the context length {max_len}")
        need = self.kv.blocks_for(total)
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
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Complete a step and return its outputs (with overlap_steps, after launching the next one)."""
        if not self.overlap_steps:
            return self._outputs(self._complete(self._launch(None)))
        step, self._in_flight = self._in_flight, None  # completed at most once, even if a later part raises
        if step is None:
            step = self._launch(None)
        if step is not None and step.reads_outputs:
            done = self._complete(step)  # its tokens are needed on the host to sample the next step
            self._in_flight = self._launch(None)
            return self._outputs(done)
        self._in_flight = self._launch(step)
        return self._outputs(self._complete(step))

    def _launch(self, in_flight: _InFlight | None) -> _InFlight | None:
        """Schedule a step and queue its forward and sampling on the device, behind the step `in_flight`
        (whose tokens are still on the device: requests it draws for hold placeholders)."""
        batch = self.scheduler.schedule()
        if not batch.scheduled:
            return None
        sampled = in_flight.samples.device_tokens if in_flight is not None else None
        logits = self.runner.execute(batch.scheduled, sampled)
        sampling = [s for s in batch.scheduled if s.samples]
        samples = self.sampler.sample_async(logits.sample_logits, [s.request for s in sampling])
        self.scheduler.update(batch.scheduled)
        for row, s in enumerate(sampling):
            s.request.append_pending(row)
        return _InFlight(batch.scheduled, logits, sampling, samples)

    def _complete(self, step: _InFlight | None) -> list[ScheduledRequest]:
        """Wait for a launched step's tokens and put them in place of its placeholders; a request they end
        (EOS, max_tokens) leaves the scheduler now. Returns the step's live requests."""
        if step is None:
            return []
        samples = step.samples.result()
        live = [s for s in step.scheduled if self._is_live(s.request)]
        self._record_prompt_logprobs(live, step.logits)
        for s, (token, record) in zip(step.sampling, samples):
            if not self._is_live(s.request):
                continue  # ended (stop string, abort) while this step ran: its token is discarded
            s.request.resolve_pending(token)
            if record is not None:
                s.request.logprobs.append(record)
            if s.request.status.finished:
                self.scheduler.finish(s.request, s.request.status)
        return live

    def _is_live(self, request) -> bool:
        tracked = self.requests.get(request.request_id)
        return tracked is not None and tracked.request is request and not request.status.finished

    def _outputs(self, done: list[ScheduledRequest]) -> list[RequestOutput]:
        """Detokenize, apply stop strings and build the outputs of a completed step's requests."""
        outputs = []
        for s in done:
            tracked = self.requests.get(s.request.request_id)
            if tracked is None or tracked.request is not s.request:
                continue  # aborted since
            if tracked.num_cached_tokens < 0:
                tracked.num_cached_tokens = s.start  # the prefix-cache hit of its first step
            if s.samples:
                outputs.append(self._output(tracked))
        return outputs

    def _record_prompt_logprobs(self, scheduled: list[ScheduledRequest], logits: StepLogits) -> None:
        for s in scheduled:
            if s.request.params.prompt_logprobs is not None and not s.request.prompt_logprobs:
                s.request.prompt_logprobs.append(None)  # the first prompt token has no logprob
        live = {s.request.request_id for s in scheduled}
        for request_id, (first, rows) in logits.prompt_logits.items():
            if request_id not in live:
                continue
            request = self.requests[request_id].request
            logprobs = torch.log_softmax(rows, dim=-1)
            for i in range(rows.shape[0]):
                target = request.prompt_token_ids[first + i + 1]
                request.prompt_logprobs.append(logprob_record(logprobs[i], target, request.params.prompt_logprobs))

    def _output(self, tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        new_ids = request.output_token_ids[tracked.num_reported:]
        tracked.num_reported = request.num_output_tokens
        self._advance_text(tracked, new_ids)
        finished = request.status.finished
        end = len(tracked.text) if finished else max(len(tracked.text) - tracked.holdback, tracked.num_emitted_chars)
        new_text = tracked.text[tracked.num_emitted_chars:end]
        tracked.num_emitted_chars = end
        if finished:  # it left the scheduler where it ended (_complete, a stop string, an abort)
            del self.requests[request.request_id]
        return RequestOutput(
            request.request_id, request.prompt_token_ids, request.output_token_ids, new_ids,
            tracked.text[:end], new_text, finished, request.status.value if finished else None,
            request.logprobs if request.params.logprobs is not None else None,
            request.prompt_logprobs if request.params.prompt_logprobs is not None else None,
            max(tracked.num_cached_tokens, 0), request.arrival_time, request.first_scheduled_time)

    def _advance_text(self, tracked: _Tracked, new_ids: list[int]) -> None:
        """Decode the new tokens; a stop string in the text ends the request there."""
        if tracked.detokenizer is None:
            return
        request, before = tracked.request, len(tracked.text)
        if request.status == RequestStatus.FINISHED_STOPPED and not request.params.include_stop_str_in_output:
            new_ids = new_ids[:-1]  # a stop token's (or EOS's) text is left out, as vLLM leaves it out
        tracked.text += "".join(tracked.detokenizer.push(t) for t in new_ids)
        if request.status.finished:
            tracked.text += tracked.detokenizer.flush()
        # Like EOS, stop strings count only once min_tokens tokens exist.
        if request.num_output_tokens < request.params.min_tokens:
            return
        stop_at = self._find_stop(tracked, before)
        if stop_at is not None:
            tracked.text = tracked.text[:stop_at]
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)

    @staticmethod
    def _find_stop(tracked: _Tracked, before: int) -> int | None:
        """Where the text ends if a stop string appeared in it (only text near the new part is searched)."""
        params = tracked.request.params
        start = max(0, before - tracked.holdback)
        found = [(i, stop) for stop in params.stop if (i := tracked.text.find(stop, start)) >= 0]
        if not found:
            return None
        i, stop = min(found)
        return i + len(stop) if params.include_stop_str_in_output else i
