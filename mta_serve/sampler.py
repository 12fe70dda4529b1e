"""Turns a step's logits into next tokens (and logprobs), each request with its own parameters.

Order: logit_bias, min_tokens masking, penalties, then temperature (0 = greedy), top_k, top_p, min_p, and a
draw. A request with a seed draws from its own generator, one draw per token, so its tokens do not depend
on what else is in the batch. Logprobs are taken from the raw logits (the model's distribution).
"""
from __future__ import annotations

import torch

from .request import Request, TokenLogprob


class Sampler:
    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()  # shared by requests without a seed
        if seed is not None:
            self.generator.manual_seed(seed)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple[int, TokenLogprob | None]]:
        """logits [B, vocab] (fp32), one row per request -> (token id, logprob record if asked) per request.

        Plain greedy rows (no bias, masks or penalties: the common case) are decided together on the
        logits' device with one transfer to the host; the others one by one."""
        tokens: list[int | None] = [None] * len(requests)
        plain = [i for i, r in enumerate(requests) if _plain_greedy(r)]
        if plain:
            rows = logits if len(plain) == len(requests) else logits[plain]
            for i, token in zip(plain, torch.argmax(rows, dim=-1).tolist()):
                tokens[i] = token
        for row, request in enumerate(requests):
            if tokens[row] is None:
                tokens[row] = self._sample_one(logits[row].float().clone(), request)
        return list(zip(tokens, logprob_records(logits, tokens, requests)))

    def _sample_one(self, logits: torch.Tensor, request: Request) -> int:
        params = request.params
        apply_bias_and_masks(logits, request)
        apply_penalties(logits, request)
        if params.greedy:
            return int(torch.argmax(logits).item())
        probs = filtered_probs(logits / params.temperature, params.top_k, params.top_p, params.min_p)
        gen = request.generator or self.generator
        return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


def apply_bias_and_masks(logits: torch.Tensor, request: Request) -> None:
    params = request.params
    for token_id, bias in params.logit_bias.items():
        if 0 <= token_id < logits.shape[0]:
            logits[token_id] += bias
    if request.num_output_tokens < params.min_tokens:
        banned = list(params.stop_token_ids)
        if request.eos_token_id is not None:
            banned.append(request.eos_token_id)
        logits[[t for t in banned if 0 <= t < logits.shape[0]]] = float("-inf")


def apply_penalties(logits: torch.Tensor, request: Request) -> None:
    params = request.params
    vocab = logits.shape[0]
    if params.presence_penalty or params.frequency_penalty:
        counts = torch.bincount(torch.tensor(request.output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(logits.device, logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        seen[torch.tensor(request.token_ids, dtype=torch.long, device=logits.device)] = True
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits.copy_(torch.where(seen, penalized, logits))


def filtered_probs(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Probabilities after top-k, top-p (smallest set whose mass reaches top_p) and min-p filtering."""
    if 0 < top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _plain_greedy(request: Request) -> bool:
    params = request.params
    return (params.greedy and not params.logit_bias and request.num_output_tokens >= params.min_tokens
            and not params.presence_penalty and not params.frequency_penalty and params.repetition_penalty == 1.0)


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
