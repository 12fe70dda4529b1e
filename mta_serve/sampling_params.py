"""Per-request sampling parameters (OpenAI / vLLM semantics), validated on construction."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names it (the API reports it in the error's `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SEED_LIMIT = 2**63  # seeds are in [0, 2^63): what torch.Generator.manual_seed takes as a signed 64-bit int


def valid_seed(value) -> bool:
    return _is_int(value) and 0 <= value < SEED_LIMIT


def as_token_id(value):
    """An integer-like token id (int, NumPy or 0-d torch integer) as an int; anything else unchanged, for the
    caller to name."""
    dtype = str(getattr(value, "dtype", ""))
    if isinstance(value, bool) or not hasattr(value, "__index__") or getattr(value, "ndim", 0) or "bool" in dtype:
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _sequence(value, name: str, allowed: str) -> tuple:
    """stop / stop_token_ids as a tuple: None is none, a lone string or integer is one."""
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise SamplingParamsError(name, f"invalid {name}={value!r}: allowed a list of {allowed}") from None


@dataclass(slots=True)
class SamplingParams:
    """Temperature 0 (or below 1e-5) is greedy. Penalties follow vLLM: presence/frequency subtract from the logits of tokens
    already generated; repetition divides positive (multiplies negative) logits of tokens seen in the prompt
    or output. `logprobs` / `prompt_logprobs` = how many top alternatives to report (0 = only the chosen
    token's); logprobs are those of the model's raw distribution, before penalties and temperature."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 (vLLM's spelling) = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one (kept if include_stop_str_in_output)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingParamsError(name, f"invalid {name}={value!r}: allowed a finite number")
        for name in ("max_tokens", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise SamplingParamsError(name, f"invalid {name}={getattr(self, name)!r}: allowed an integer")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise SamplingParamsError(name, f"invalid {name}={getattr(self, name)!r}: allowed None or an integer")
        if self.seed is not None and not valid_seed(self.seed):
            raise SamplingParamsError("seed", f"invalid seed={self.seed!r}: allowed an integer in [0, 2^63)")
        checks = [
            (self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", "a number >= 0"),
            (0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (self.top_k >= -1, "top_k", "an integer >= -1 (0 or -1 = off)"),
            (0 <= self.min_p <= 1, "min_p", "a number in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "a number in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "a number in [-2, 2]"),
            (0 < self.repetition_penalty <= 2, "repetition_penalty", "a number in (0, 2]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             "an integer in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"0..{MAX_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"0..{MAX_LOGPROBS}"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise SamplingParamsError(name, f"invalid {name}={getattr(self, name)!r}: allowed {allowed}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"invalid {name}={getattr(self, name)!r}: allowed true or false")
        # NumPy and torch integers too (ids taken from an array), as plain ints
        self.stop_token_ids = tuple(map(as_token_id, _sequence(self.stop_token_ids, "stop_token_ids",
                                                               "non-negative integers")))
        if any(not _is_int(x) or x < 0 for x in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", f"invalid stop_token_ids={self.stop_token_ids!r}: "
                                                        "allowed non-negative integers")
        self.stop = _sequence(self.stop, "stop", "non-empty strings")
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise SamplingParamsError("stop", f"invalid stop={self.stop!r}: allowed non-empty strings")
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if any(not -100 <= v <= 100 for v in self.logit_bias.values()):
            raise SamplingParamsError("logit_bias", "invalid logit_bias: values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        # Below this, dividing by the temperature overflows to inf/nan; the limit is greedy anyway.
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether presence, frequency or repetition penalties apply: sampling then reads the generated
        tokens on the host."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
