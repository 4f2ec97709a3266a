"""The official ``openai`` and ``anthropic`` SDKs, pointed at the emulator, complete a normal and a
streamed call and read the usage: the emulator speaks the real wire formats."""

from __future__ import annotations

import anthropic
import openai
import pytest

PROMPT = "Write a two-line status update about the key rotation for the platform team."


def test_openai_sdk_normal_and_streamed(emulator):
    key = emulator.new_key("openai", label="sdk")
    client = openai.OpenAI(api_key=key, base_url=emulator.base_url("openai"), max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    completion = client.chat.completions.create(model="o4-mini", messages=messages)
    usage = completion.usage
    assert completion.choices[0].message.content.startswith("Emulated openai reply")
    assert completion.choices[0].finish_reason == "stop"
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert usage.completion_tokens_details.reasoning_tokens > 0

    stream = client.chat.completions.create(
        model="o4-mini", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    text, streamed_usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            streamed_usage = chunk.usage
    assert text == completion.choices[0].message.content
    assert streamed_usage is not None
    assert streamed_usage.model_dump() == usage.model_dump()
    assert [c.stream for c in emulator.calls("openai")] == [False, True]
    assert {c.key_label for c in emulator.calls("openai")} == {"sdk"}


def test_openai_sdk_sees_an_authentication_error(emulator):
    emulator.new_key("openai")
    client = openai.OpenAI(api_key="sk-wrong", base_url=emulator.base_url("openai"), max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    good = openai.OpenAI(api_key=emulator.new_key("openai"), base_url=emulator.base_url("openai"))
    assert "gpt-4o-mini" in [m.id for m in good.models.list()]


def test_anthropic_sdk_normal_and_streamed(emulator):
    key = emulator.new_key("anthropic", label="sdk")
    client = anthropic.Anthropic(
        api_key=key, base_url=emulator.base_url("anthropic"), max_retries=0
    )
    kwargs = {
        "model": "claude-haiku-4-5",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": PROMPT}],
    }
    message = client.messages.create(**kwargs)
    assert message.stop_reason == "end_turn"
    assert message.content[0].text.startswith("Emulated anthropic reply")
    assert message.usage.cache_read_input_tokens > 0
    assert message.usage.cache_creation_input_tokens > 0
    assert message.usage.input_tokens > 0

    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.cache_read_input_tokens == message.usage.cache_read_input_tokens
    assert final.usage.cache_creation_input_tokens == message.usage.cache_creation_input_tokens
    assert [c.stream for c in emulator.calls("anthropic")] == [False, True]


def test_anthropic_sdk_sees_rate_limit_and_auth_errors(emulator):
    from byok_plugin.host.emulator import Fault, FaultKind

    key = emulator.new_key("anthropic")
    client = anthropic.Anthropic(
        api_key=key, base_url=emulator.base_url("anthropic"), max_retries=0
    )
    emulator.add_fault(Fault(FaultKind.RATE_LIMIT, provider="anthropic", retry_after=0))
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    bad = anthropic.Anthropic(
        api_key="sk-ant-wrong", base_url=emulator.base_url("anthropic"), max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError):
        bad.models.list()
    assert next(m.id for m in client.models.list()) == "claude-sonnet-4-5"
