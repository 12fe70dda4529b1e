"""A generation request: its tokens, how many of them the cache holds, and its sampling state."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True)
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (id -> logprob, best first)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass(slots=True)
class Request:
    """`token_ids` = prompt + generated. Positions below `num_computed_tokens` have K/V (and MTA queries) in
    the cache; each step computes some of the rest. Prefill, chunked prefill, decode and recompute after
    preemption are all just "compute the next tokens".

    A token drawn by a step still on the device is a placeholder at the end of `token_ids` (-1 - j: row j
    of that step's sampled tokens), so the next step can already compute its position: the model runner
    reads the token from the device. `num_pending_tokens` counts them; they resolve in order."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # placeholders at the end of token_ids: drawn, not yet read back
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, if asked
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first is None, if asked
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when it first computed tokens (end of its queue time)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (all but the pending ones)."""
        return len(self.token_ids) - self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens read back so far."""
        return self.token_ids[self.num_prompt_tokens:self.num_known_tokens]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens read back so far."""
        return self.num_known_tokens - self.num_prompt_tokens

    @property
    def num_drawn_tokens(self) -> int:
        """Generated tokens drawn so far, pending ones included: the index of the next one drawn."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def max_num_tokens(self) -> int:
        """Prompt + max_tokens: the most tokens this request can ever hold in the cache."""
        return self.num_prompt_tokens + self.params.max_tokens

    def append_pending(self, sample_row: int) -> None:
        """A step that draws this request's next token has been launched; its token is row `sample_row` of
        that step's sampled tokens."""
        self.token_ids.append(-1 - sample_row)
        self.num_pending_tokens += 1

    def resolve_pending(self, token_id: int) -> None:
        """The oldest pending token has been read back. A token that ends the request drops the pending
        tokens after it (steps launched before it was known draw them; they are discarded)."""
        self.token_ids[self.num_known_tokens] = token_id
        self.num_pending_tokens -= 1
        if self._stops(token_id):
            self.status = RequestStatus.FINISHED_STOPPED
        elif self.num_output_tokens >= self.params.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
        if self.status.finished:
            del self.token_ids[self.num_known_tokens:]
            self.num_pending_tokens = 0

    def _stops(self, token_id: int) -> bool:
        # The sampler never picks a stop token before min_tokens, so no min_tokens check here.
        if token_id in self.params.stop_token_ids:
            return True
        return token_id == self.eos_token_id and not self.params.ignore_eos
