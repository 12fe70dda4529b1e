"""Chat templates render as Hugging Face's apply_chat_template renders them (the prompt the model was trained
on): whitespace control, undefined names, loop controls, raise_exception, tojson."""
from __future__ import annotations

import pytest

from mta_serve.completions import ParamError, render_chat
from mta_serve.protocol import ChatCompletionRequest

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

# Qwen2.5's shape: tests `tools` and `message.tool_calls`, which a request without tools leaves undefined.
QWEN_LIKE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Zephyr's shape: plain block tags on their own lines, which trim_blocks and lstrip_blocks remove.
ZEPHYR_LIKE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# break/continue, tojson (which must leave < > & alone), raise_exception (after a leading system message,
# users at odd positions) and {% generation %} around the assistant's text
STRICT_JSON = """{{ bos_token }}{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% if (m.role == 'user') != (loop.index0 % 2 == 1) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}
    {% if m.role == 'assistant' %}{% generation %}{{ m | tojson }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}
{% endfor %}"""


class _Recorder:
    """Only render_chat is under test: the tokenizer keeps the text it is asked to encode."""

    bos_id, eos_id = 1, 2

    def __init__(self, template: str):
        self.chat_template = template

    def decode(self, ids, skip_special=True):
        return {1: "<s>", 2: "</s>"}[ids[0]]

    def encode(self, text, add_bos=True):
        self.text = text
        return [0]


def _ours(template: str, messages: list[dict]) -> str:
    tok = _Recorder(template)
    render_chat(ChatCompletionRequest(model="m", messages=messages), tok)
    return tok.text


def _hugging_face(template: str, messages: list[dict]) -> str:
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True, bos_token="<s>",
        eos_token="</s>")
    return rendered[0]


@pytest.mark.parametrize("template", [QWEN_LIKE, ZEPHYR_LIKE, STRICT_JSON], ids=["qwen", "zephyr", "strict"])
def test_templates_render_as_hugging_face_renders_them(template):
    messages = [{"role": "system", "content": "be <brief> & kind"}, {"role": "user", "content": "hi <b> & </b>"},
                {"role": "assistant", "content": "héllo"}, {"role": "user", "content": "again"}]
    assert _ours(template, messages) == _hugging_face(template, messages)


def test_raise_exception_is_a_messages_error():
    with pytest.raises(ParamError, match="roles must alternate user/assistant") as err:
        _ours(STRICT_JSON, [{"role": "system", "content": "s"}, {"role": "assistant", "content": "first"}])
    assert err.value.param == "messages"
