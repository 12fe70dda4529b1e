"""Recompute-style generation: every new token re-runs the dense model over the whole sequence.

This is how the reference implementation generates (full score maps every step). It is exact and simple,
and it is what the server runs until the paged-cache engine replaces it; its cost grows as O(T^2) per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .model import MTATransformer


@dataclass(slots=True)
class GenerationParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, params: GenerationParams, gen: torch.Generator | None) -> int:
    """logits [vocab] (fp32) -> one token id. Temperature 0 is greedy."""
    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


@torch.no_grad()
def generate(model: MTATransformer, prompt_ids: list[int], params: GenerationParams,
             eos_id: int | None) -> tuple[list[int], str]:
    """-> (generated ids, finish reason "stop" | "length")."""
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    stops = set(params.stop_token_ids)
    if eos_id is not None and not params.ignore_eos:
        stops.add(eos_id)
    out: list[int] = []
    for _ in range(params.max_tokens):
        logits = model.score([prompt_ids + out])[0][-1]
        token = sample(logits, params, gen)
        out.append(token)
        if token in stops:
            return out, "stop"
    return out, "length"
