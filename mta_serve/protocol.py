"""Request bodies of the OpenAI-compatible API, strictly typed ("3" is not an integer and true is not 1).

Unknown fields are ignored, since clients such as `vllm bench serve` send extras; options that are known but
not implemented are rejected with 400 when the client sets them (see UNSUPPORTED)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictFloat | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    min_p: Number = 0.0
    n: StrictInt = Field(1, ge=1, le=16)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None  # vLLM's extension: generation also ends at these tokens
    include_stop_str_in_output: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0
    logit_bias: dict[StrictStr, Number] | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    user: StrictStr | None = None
    response_format: dict | None = None
    # vLLM's structured-output extensions: known, so that a client relying on them is refused, not ignored
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM joins text parts


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list | None = None
    tool_choice: StrictStr | dict | None = None


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]


# Known options the server does not implement: a client that sets them gets 400, never silence.
UNSUPPORTED = {
    "suffix": lambda v: v is not None,
    "best_of": lambda v: v not in (None, 1),
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: v is not None and v.get("type", "text") != "text",
    **{name: (lambda v: v is not None) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                                     "structured_outputs")},
}
