"""Ground-truth generation for tests: a full dense recompute of the whole sequence for every token."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logprob of each, every step recomputing the dense model over the sequence."""
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model.score([prompt + tokens])[0][-1]
        token = int(torch.argmax(logits))
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        tokens.append(token)
    return tokens, logprobs
