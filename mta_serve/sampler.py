"""Turns a step's logits into next tokens (and logprobs), each request with its own parameters.

Order: logit_bias, min_tokens masking, penalties, then temperature (0 = greedy), top_k, top_p, min_p, and a
draw. The whole batch is decided on the logits' device (one tensor per step for each of these, whatever mix
of parameters the requests use) and the host reads back only the chosen token ids. A draw is one uniform
number per token, inverted through the row's cumulative distribution; a request with a seed takes it from
its own generator, so its tokens do not depend on what else is in the batch. Logprobs are taken from the
raw logits (the model's distribution).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .request import Request, TokenLogprob
from .sampling_params import valid_seed


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, vocab] -> [B] int64, each row's first index of its maximum: on CUDA the two-pass Triton
    kernel (fused_ops.argmax_rows: a batch-1 row spread over the GPU), elsewhere torch.argmax."""
    if logits.is_cuda:
        from .kernels.fused_ops import argmax_rows

        return argmax_rows(logits)
    return torch.argmax(logits, dim=-1)


class Sampler:
    def __init__(self, seed: int | None = None):
        if seed is not None and not valid_seed(seed):
            # checked here, not at the first draw, where it would fail a running engine's step
            raise ValueError(f"invalid seed={seed!r}: allowed None or an integer in [0, 2^63)")
        self.seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}  # per device, for requests without a seed

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
        """logits [B, vocab] (fp32), one row per request -> (token id, logprob record if asked) per request."""
        return self.sample_async(logits, requests).result()

    @torch.no_grad()
    def sample_async(self, logits: torch.Tensor, requests: list[Request]) -> "PendingSamples":
        """Queue the batch's decision on the logits' device and the copy of its token ids to the host; the
        host waits only in PendingSamples.result()."""
        tokens = greedy_tokens(logits)  # [B]: plain greedy rows are done
        rest = [i for i, r in enumerate(requests) if not _plain_greedy(r)]
        if rest:
            rows = _on(logits.device, rest, torch.long)
            tokens[rows] = self._decide(logits[rows].float(), [requests[i] for i in rest])
        if logits.device.type != "cuda":
            return PendingSamples(tokens, tokens, None, logits, requests)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(logits.device))  # the logits' device, not the current one
        return PendingSamples(tokens, host, copied, logits, requests)

    def _decide(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits [m, vocab] (a copy, changed in place) of requests with any parameter -> tokens [m]."""
        apply_bias_and_masks(logits, requests)
        apply_penalties(logits, requests)
        tokens = torch.argmax(logits, dim=-1)  # [m]: right for the greedy ones
        drawn = [k for k, r in enumerate(requests) if not r.params.greedy]
        if drawn:
            device, params = logits.device, [requests[k].params for k in drawn]
            rows = _on(device, drawn, torch.long)
            # A temperature past the dtype's range would be inf, and inf / inf NaN: at its largest finite value
            # the distribution is as flat as it can be, the limit anyway. A logit divided past the range (a
            # penalized one, below temperature 1) is held at the largest value too, since softmax over an inf
            # is NaN.
            finfo = torch.finfo(logits.dtype)
            temperature = _on(device, [p.temperature for p in params], logits.dtype)[:, None].clamp(max=finfo.max)
            vocab = logits.shape[1]
            probs = filtered_probs((logits[rows] / temperature).clamp(max=finfo.max),
                                   _on(device, [min(p.top_k, vocab) for p in params], torch.long),
                                   _on(device, [p.top_p for p in params], logits.dtype),
                                   _on(device, [p.min_p for p in params], logits.dtype))
            tokens[rows] = draw(probs, self._uniforms([requests[k] for k in drawn], device))
        return tokens

    def _uniforms(self, requests: list[Request], device: torch.device) -> torch.Tensor:
        """One uniform number in [0, 1) per request [m]: seeded requests from their own generator."""
        shared = [k for k, r in enumerate(requests) if r.params.seed is None]
        values = torch.empty(len(requests), device=device)
        if shared:
            values[_on(device, shared, torch.long)] = torch.rand(len(shared), device=device,
                                                                 generator=self._shared_generator(device))
        for k, request in enumerate(requests):
            if request.params.seed is not None:
                values[k:k + 1] = torch.rand(1, device=device, generator=_request_generator(request, device))
        return values

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._shared[device] = gen
        return self._shared[device]


@dataclass(slots=True)
class PendingSamples:
    """A step's chosen tokens on their way to the host (the device may still be computing them)."""

    device_tokens: torch.Tensor  # [B] int64 on the logits' device: what the next step's placeholders read
    tokens: torch.Tensor  # [B] int64: on the host (pinned, being filled) on CUDA, else the tokens themselves
    copied: torch.cuda.Event | None  # recorded after the copy to the host was queued
    logits: torch.Tensor  # [B, vocab] the sampled rows, for logprob records
    requests: list[Request]

    def result(self) -> list[tuple[int, TokenLogprob | None]]:
        """(token id, logprob record if asked) per request, once the device has them."""
        if self.copied is not None:
            self.copied.synchronize()
        token_ids = self.tokens.tolist()
        return list(zip(token_ids, logprob_records(self.logits, token_ids, self.requests)))


def _request_generator(request: Request, device: torch.device) -> torch.Generator:
    """The request's own generator on `device`, made from its seed at its first draw there."""
    if request.generator is None or request.generator.device != device:
        request.generator = torch.Generator(device=device).manual_seed(request.params.seed)
    return request.generator


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on `device` without waiting for the device (the copy is queued behind its work)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def apply_bias_and_masks(logits: torch.Tensor, requests: list[Request]) -> None:
    """logits [m, vocab], row k of requests[k]: add logit_bias; while fewer than min_tokens outputs exist, ban
    EOS (unless ignore_eos: then it stops nothing) and the stop token ids."""
    vocab = logits.shape[1]
    biased = [(k, t, b) for k, r in enumerate(requests) for t, b in r.params.logit_bias.items() if 0 <= t < vocab]
    banned = [(k, t) for k, r in enumerate(requests) if r.num_drawn_tokens < r.params.min_tokens
              for t in [*r.params.stop_token_ids, None if r.params.ignore_eos else r.eos_token_id]
              if t is not None and 0 <= t < vocab]
    device = logits.device
    if biased:
        rows, ids, bias = zip(*biased)
        logits.index_put_((_on(device, rows, torch.long), _on(device, ids, torch.long)),
                          _on(device, bias, logits.dtype), accumulate=True)
    if banned:
        rows, ids = zip(*banned)
        logits.index_put_((_on(device, rows, torch.long), _on(device, ids, torch.long)),
                          torch.full((len(ids),), float("-inf"), device=device))  # a device value: no copy


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """logits [m, vocab]: presence and frequency penalties over each request's outputs, then the repetition
    penalty over its prompt and outputs."""
    device, params = logits.device, [r.params for r in requests]
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.zeros_like(logits)  # [m, vocab]: times each token was generated
        rows, ids = _row_tokens([r.output_token_ids for r in requests], device)
        counts.index_put_((rows, ids), torch.ones(ids.shape, device=device), accumulate=True)
        frequency = _on(device, [p.frequency_penalty for p in params], logits.dtype)[:, None]
        presence = _on(device, [p.presence_penalty for p in params], logits.dtype)[:, None]
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # [m, vocab]: in prompt or output
        rows, ids = _row_tokens([r.token_ids[:r.num_known_tokens] for r in requests], device)
        seen.index_put_((rows, ids), torch.ones(ids.shape, dtype=torch.bool, device=device))
        # A penalty that rounds to 0 in the logits' dtype would make -inf * 0 NaN: at least the smallest normal
        # number. A logit it divides past the dtype's range is inf here; _decide holds it at the largest value.
        penalty = _on(device, [p.repetition_penalty for p in params], logits.dtype)[:, None].clamp(
            min=torch.finfo(logits.dtype).tiny)
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits))


def _row_tokens(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) [n] each: every token of every row's list, for indexing a [rows, vocab] tensor."""
    rows = [k for k, tokens in enumerate(token_lists) for _ in tokens]
    return _on(device, rows, torch.long), _on(device, [t for tokens in token_lists for t in tokens], torch.long)


def filtered_probs(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """logits [m, vocab] (after temperature); top_k [m] (0 or -1 = off), top_p [m], min_p [m] -> probabilities
    [m, vocab] after top-k (ties with the k-th logit kept), top-p (the smallest set of most likely tokens
    whose mass reaches top_p) and min-p filtering, renormalized."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # the most likely token is always kept (its mass before is 0), even where top_p rounds to 0 in this dtype
    top_p = top_p.clamp(min=torch.finfo(probs.dtype).tiny)
    probs = probs * ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs [m, vocab], uniforms [m] in [0, 1) -> tokens [m]: the first token whose cumulative probability
    exceeds the uniform (zero-probability tokens are never chosen)."""
    vocab = probs.shape[1]
    cdf = probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None].contiguous()
    tokens = torch.searchsorted(cdf, target, right=True)[:, 0]
    # A uniform that rounds up to the total mass: the last token that has any probability.
    last = vocab - 1 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), dim=-1)
    return torch.where(tokens < vocab, tokens, last)


def _plain_greedy(request: Request) -> bool:
    params = request.params
    return (params.greedy and not params.logit_bias and request.num_drawn_tokens >= params.min_tokens
            and not params.penalized)


def logprob_records(logits: torch.Tensor, tokens: list[int],
                    requests: list[Request]) -> list[TokenLogprob | None]:
    """logits [B, vocab] (raw): the records of the rows whose request asks for logprobs, read back at once.
    Only those rows are normalized (log-softmax over a 128k vocabulary is not free)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    records: list[TokenLogprob | None] = [None] * len(requests)
    if not rows:
        return records
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [len(rows), vocab]
    top_n = max(requests[i].params.logprobs for i in rows)
    chosen = logprobs[torch.arange(len(rows), device=logprobs.device), [tokens[i] for i in rows]].tolist()
    values, ids = torch.topk(logprobs, top_n) if top_n > 0 else (logprobs[:, :0], logprobs[:, :0])
    values, ids = values.tolist(), ids.tolist()
    for k, i in enumerate(rows):
        n = requests[i].params.logprobs
        top = {int(t): float(v) for t, v in zip(ids[k][:n], values[k][:n])}
        records[i] = TokenLogprob(tokens[i], float(chosen[k]), top)
    return records


def logprob_record(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """logprobs [vocab] -> the chosen token's logprob and the top_n alternatives."""
    top = {}
    if top_n > 0:
        values, ids = torch.topk(logprobs, top_n)
        top = {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}
    return TokenLogprob(token, float(logprobs[token].item()), top)
