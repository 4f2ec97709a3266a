"""The five official SDKs (pinned in the ``sdk-tests`` extra), pointed at the emulator on loopback,
do what a user does with them: chat/messages streamed and not, usage with cached and reasoning or
thinking tokens, structured output, tool calls, the SDK's own authentication error for a wrong key,
the SDK's own retry after a 429 with ``Retry-After``, models listed and fetched, tokens counted,
an Exa search with its cost. A new SDK release that breaks fidelity fails here, not for a user.

Retries are kept short: a ``Retry-After`` of 0.01 s, and no retries where a test wants the error.
"""

from __future__ import annotations

import ast
import json
import re
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import anthropic
import exa_py
import httpx
import mistralai.client as mistral
import openai
import pydantic
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from byok_plugin.host.emulator import Fault, FaultKind

PROMPT = "Write a two-line status update about the key rotation for the platform team."
QUICK_RETRY = 0.01  # seconds: the Retry-After the emulator's 429s carry here


class Status(pydantic.BaseModel):
    team: str
    done: bool
    items: list[str]


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 3}},
    "required": ["city", "days"],
}


def rate_limit_once(emulator, provider: str) -> None:
    emulator.add_fault(Fault(FaultKind.RATE_LIMIT, provider=provider, retry_after=QUICK_RETRY))


def statuses(emulator, provider: str) -> list[int]:
    return [c.status for c in emulator.calls(provider)]


# OpenAI ------------------------------------------------------------------------------------------
def openai_client(emulator, key: str, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=emulator.base_url("openai"), max_retries=max_retries)


def test_openai_sdk_normal_and_streamed(emulator):
    key = emulator.new_key("openai", label="sdk")
    client = openai_client(emulator, key)
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


def test_openai_sdk_structured_output_and_tool_calls(emulator):
    client = openai_client(emulator, emulator.new_key("openai"))
    messages = [{"role": "user", "content": PROMPT}]
    parsed = client.chat.completions.parse(
        model="gpt-4o-mini", messages=messages, response_format=Status
    )
    assert isinstance(parsed.choices[0].message.parsed, Status)

    tools = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
    forced = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="required"
    )
    assert forced.choices[0].finish_reason == "tool_calls"
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "emulated", "days": 3}

    with client.chat.completions.stream(
        model="gpt-4o-mini", messages=messages, tools=tools, tool_choice="required"
    ) as stream:
        final = stream.get_final_completion()
    streamed_call = final.choices[0].message.tool_calls[0]
    assert (streamed_call.function.name, streamed_call.function.arguments) == (
        "weather",
        call.function.arguments,
    )


def test_openai_sdk_responses_api(emulator):
    client = openai_client(emulator, emulator.new_key("openai"))
    kwargs = {"model": "o4-mini", "instructions": "Be brief.", "input": PROMPT}
    response = client.responses.create(**kwargs)
    assert response.status == "completed"
    assert response.output_text.startswith("Emulated openai reply")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    usage = response.usage
    assert usage.input_tokens_details.cached_tokens > 0
    assert usage.output_tokens_details.reasoning_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    with client.responses.stream(**kwargs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == response.output_text
    assert final.usage.model_dump() == usage.model_dump()

    parsed = client.responses.parse(model="gpt-4o-mini", input=PROMPT, text_format=Status)
    assert isinstance(parsed.output_parsed, Status)

    tool = {"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}
    called = client.responses.create(
        model="gpt-4o-mini", input=PROMPT, tools=[tool], tool_choice="required"
    )
    call = called.output[0]
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call",
        "weather",
        {"city": "emulated", "days": 3},
    )

    counted = client.responses.input_tokens.count(**kwargs)
    assert counted.input_tokens == usage.input_tokens

    short = client.responses.create(model="gpt-4o-mini", input=PROMPT, max_output_tokens=2)
    assert short.status == "incomplete"
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 2


def test_openai_sdk_sees_an_authentication_error(emulator):
    emulator.new_key("openai")
    with pytest.raises(openai.AuthenticationError):
        openai_client(emulator, "sk-wrong").models.list()
    good = openai_client(emulator, emulator.new_key("openai"))
    assert "gpt-4o-mini" in [m.id for m in good.models.list()]


def test_openai_sdk_retries_a_429_and_gets_models(emulator):
    client = openai_client(emulator, emulator.new_key("openai"), max_retries=1)
    rate_limit_once(emulator, "openai")
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    assert statuses(emulator, "openai") == [429, 200]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-no-such-model")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/no/such/route", cast_to=httpx.Response)
    assert info.value.body["type"] == "invalid_request_error"


# Anthropic ---------------------------------------------------------------------------------------
def anthropic_client(emulator, key: str, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key, base_url=emulator.base_url("anthropic"), max_retries=max_retries
    )


def test_anthropic_sdk_normal_and_streamed(emulator):
    client = anthropic_client(emulator, emulator.new_key("anthropic", label="sdk"))
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


def test_anthropic_sdk_top_level_cache_control_thinking_and_count_tokens(emulator):
    client = anthropic_client(emulator, emulator.new_key("anthropic"))
    kwargs = {
        "model": "claude-sonnet-4-5",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    plain = client.messages.create(max_tokens=300, **kwargs)
    assert plain.usage.cache_creation_input_tokens == 0
    cached = client.messages.create(max_tokens=300, cache_control={"type": "ephemeral"}, **kwargs)
    assert cached.usage.cache_creation_input_tokens > 0
    counted = client.messages.count_tokens(**kwargs)
    usage = cached.usage
    assert counted.input_tokens == (
        usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    )

    thinking = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(max_tokens=2000, thinking=thinking, **kwargs) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking
    assert final.usage.output_tokens > len(final.content[1].text.split())


def test_anthropic_sdk_structured_output_and_tool_use(emulator):
    client = anthropic_client(emulator, emulator.new_key("anthropic"))
    messages = [{"role": "user", "content": PROMPT}]
    parsed = client.messages.parse(
        model="claude-sonnet-4-5", max_tokens=500, messages=messages, output_format=Status
    )
    assert isinstance(parsed.parsed_output, Status)

    tools = [{"name": "weather", "description": "Weather", "input_schema": WEATHER}]
    kwargs = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": messages,
        "tools": tools,
        "tool_choice": {"type": "tool", "name": "weather"},
    }
    message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    assert (message.content[0].name, message.content[0].input) == (
        "weather",
        {"city": "emulated", "days": 3},
    )
    with client.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {"city": "emulated", "days": 3}


def test_anthropic_sdk_retries_a_429_and_sees_auth_errors(emulator):
    client = anthropic_client(emulator, emulator.new_key("anthropic"), max_retries=1)
    rate_limit_once(emulator, "anthropic")
    message = client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert statuses(emulator, "anthropic") == [429, 200]
    rate_limit_once(emulator, "anthropic")
    with pytest.raises(anthropic.RateLimitError):
        anthropic_client(emulator, emulator.new_key("anthropic")).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(emulator, "sk-ant-wrong").models.list()


def test_anthropic_sdk_models_list_and_get(emulator):
    client = anthropic_client(emulator, emulator.new_key("anthropic"))
    assert next(m.id for m in client.models.list()) == "claude-sonnet-4-5"
    assert client.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-no-such-model")


# Google Gemini -----------------------------------------------------------------------------------
def genai_client(emulator, key: str, *, attempts: int = 1, version: str | None = None):
    """google-genai with its default API version (``v1``) unless ``version`` is given."""
    options = genai_types.HttpOptions(
        base_url=emulator.base_url("google"),
        api_version=version,
        retry_options=genai_types.HttpRetryOptions(
            attempts=attempts, initial_delay=QUICK_RETRY, max_delay=QUICK_RETRY, jitter=0
        ),
    )
    return genai.Client(api_key=key, http_options=options)


def test_genai_sdk_default_api_version_normal_and_streamed(emulator):
    client = genai_client(emulator, emulator.new_key("google", label="sdk"))
    config = genai_types.GenerateContentConfig(system_instruction="Be brief.")
    response = client.models.generate_content(
        model="gemini-2.5-flash", contents=PROMPT, config=config
    )
    assert response.text.startswith("Emulated google reply")
    usage = response.usage_metadata
    assert usage.cached_content_token_count > 0
    assert usage.thoughts_token_count > 0
    assert usage.total_token_count == (
        usage.prompt_token_count + usage.candidates_token_count + usage.thoughts_token_count
    )
    chunks = list(
        client.models.generate_content_stream(
            model="gemini-2.5-flash", contents=PROMPT, config=config
        )
    )
    assert "".join(c.text for c in chunks) == response.text
    assert chunks[-1].usage_metadata == usage
    assert [c.path.split("/")[1] for c in emulator.calls("google")] == ["v1", "v1"]
    beta = genai_client(emulator, emulator.new_key("google"), version="v1beta")
    assert beta.models.generate_content(model="gemini-2.5-flash", contents=PROMPT).text


def test_genai_sdk_thinking_budget_in_its_own_snake_case(emulator):
    client = genai_client(emulator, emulator.new_key("google"))

    def generate(model: str, **thinking: object):
        config = genai_types.GenerateContentConfig(
            thinking_config=genai_types.ThinkingConfig(**thinking)
        )
        return client.models.generate_content(model=model, contents=PROMPT, config=config)

    off = generate("gemini-2.5-flash", thinking_budget=0)
    assert off.usage_metadata.thoughts_token_count is None
    on = generate("gemini-2.0-flash", thinking_budget=512, include_thoughts=True)
    assert on.usage_metadata.thoughts_token_count > 0
    assert on.candidates[0].content.parts[0].thought is True
    assert on.text.startswith("Emulated google reply")  # the thought is not part of the text
    config = genai_types.GenerateContentConfig(
        thinking_config=genai_types.ThinkingConfig(thinking_budget=512, include_thoughts=True)
    )
    chunks = list(
        client.models.generate_content_stream(
            model="gemini-2.0-flash", contents=PROMPT, config=config
        )
    )
    assert chunks[0].candidates[0].content.parts[0].thought is True
    assert "".join(c.text or "" for c in chunks[1:]) == on.text
    assert chunks[-1].usage_metadata == on.usage_metadata
    with pytest.raises(genai_errors.ClientError) as info:
        generate("gemini-2.5-pro", thinking_budget=0)
    assert info.value.code == 400
    assert "Budget 0 is invalid" in info.value.message


def test_genai_sdk_structured_output_and_forced_function_call(emulator):
    client = genai_client(emulator, emulator.new_key("google"))
    structured = client.models.generate_content(
        model="gemini-2.5-flash",
        contents=PROMPT,
        config=genai_types.GenerateContentConfig(
            response_mime_type="application/json", response_schema=Status
        ),
    )
    assert isinstance(structured.parsed, Status)

    declaration = genai_types.FunctionDeclaration(name="weather", parameters_json_schema=WEATHER)
    config = genai_types.GenerateContentConfig(
        tools=[genai_types.Tool(function_declarations=[declaration])],
        tool_config=genai_types.ToolConfig(
            function_calling_config=genai_types.FunctionCallingConfig(mode="ANY")
        ),
        automatic_function_calling=genai_types.AutomaticFunctionCallingConfig(disable=True),
    )
    called = client.models.generate_content(
        model="gemini-2.5-flash", contents=PROMPT, config=config
    )
    call = called.function_calls[0]
    assert (call.name, call.args) == ("weather", {"city": "emulated", "days": 3})


def test_genai_sdk_auth_error_and_429_retry_with_retry_info(emulator):
    wrong = genai_client(emulator, "AIza-wrong")
    with pytest.raises(genai_errors.ClientError) as info:
        wrong.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")
    assert info.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"

    key = emulator.new_key("google")
    rate_limit_once(emulator, "google")
    no_retry = genai_client(emulator, key)
    with pytest.raises(genai_errors.ClientError) as info:
        no_retry.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert info.value.code == 429
    details = {d["@type"].rsplit(".", 1)[1]: d for d in info.value.details["error"]["details"]}
    assert details["RetryInfo"]["retryDelay"] == "0.01s"
    assert details["QuotaFailure"]["violations"][0]["quotaDimensions"]["model"] == (
        "gemini-2.5-flash"
    )

    emulator.state.clear_calls()
    rate_limit_once(emulator, "google")
    retrying = genai_client(emulator, key, attempts=2)
    retried = retrying.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert retried.text
    assert statuses(emulator, "google") == [429, 200]


def test_genai_sdk_models_list_get_and_count_tokens(emulator):
    client = genai_client(emulator, emulator.new_key("google"))
    names = [m.name for m in client.models.list(config={"page_size": 2})]
    assert names[:2] == ["models/gemini-2.5-flash", "models/gemini-2.5-pro"]
    assert len(names) == 4  # two pages
    model = client.models.get(model="gemini-2.5-flash")
    assert (model.name, model.thinking) == ("models/gemini-2.5-flash", True)
    with pytest.raises(genai_errors.ClientError) as info:
        client.models.get(model="gemini-no-such-model")
    assert info.value.code == 404
    counted = client.models.count_tokens(model="gemini-2.5-flash", contents=PROMPT)
    generated = client.models.generate_content(model="gemini-2.5-flash", contents=PROMPT)
    assert counted.total_tokens == generated.usage_metadata.prompt_token_count


# Mistral -----------------------------------------------------------------------------------------
def mistral_client(emulator, key: str, *, retries: bool = False) -> mistral.Mistral:
    if retries:
        config = mistral.utils.RetryConfig(
            "backoff", mistral.utils.BackoffStrategy(10, 10, 1.0, 2000), False
        )
        return mistral.Mistral(
            api_key=key, server_url=emulator.base_url("mistral"), retry_config=config
        )
    return mistral.Mistral(api_key=key, server_url=emulator.base_url("mistral"))


def test_mistral_sdk_normal_and_streamed(emulator):
    client = mistral_client(emulator, emulator.new_key("mistral", label="sdk"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    response = client.chat.complete(model="magistral-medium-latest", messages=messages)
    text = response.choices[0].message.content
    assert text.startswith("Emulated mistral reply")
    usage = response.usage
    assert usage.prompt_tokens_details["cached_tokens"] > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Magistral's reasoning is part of completion_tokens: more than the words of the answer
    assert usage.completion_tokens > len(response.choices[0].message.content.split())

    streamed, last = "", None
    for event in client.chat.stream(model="magistral-medium-latest", messages=messages):
        streamed += event.data.choices[0].delta.content or ""
        last = event.data
    assert streamed == text
    assert last.choices[0].finish_reason == "stop"
    assert last.usage.completion_tokens == usage.completion_tokens


def test_mistral_sdk_structured_output_and_tool_calls(emulator):
    client = mistral_client(emulator, emulator.new_key("mistral"))
    messages = [{"role": "user", "content": PROMPT}]
    parsed = client.chat.parse(
        model="mistral-small-latest", messages=messages, response_format=Status
    )
    assert isinstance(parsed.choices[0].message.parsed, Status)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]
    response = client.chat.complete(
        model="mistral-small-latest", messages=messages, tools=tools, tool_choice="any"
    )
    call = response.choices[0].message.tool_calls[0]
    assert response.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "emulated", "days": 3}


def test_mistral_sdk_auth_error_429_retry_and_models(emulator):
    with pytest.raises(mistral.errors.SDKError) as info:
        mistral_client(emulator, "wrong").models.list()
    assert info.value.status_code == 401
    emulator.state.clear_calls()
    client = mistral_client(emulator, emulator.new_key("mistral"), retries=True)
    rate_limit_once(emulator, "mistral")
    models = client.models.list()
    assert statuses(emulator, "mistral") == [429, 200]
    assert "mistral-small-latest" in [m.id for m in models.data]
    assert client.models.retrieve(model_id="mistral-small-latest").id == "mistral-small-latest"


# Exa ---------------------------------------------------------------------------------------------
def test_exa_sdk_search_with_cost(emulator):
    client = exa_py.Exa(api_key=emulator.new_key("exa"), base_url=emulator.base_url("exa"))
    found = client.search(PROMPT, num_results=3, contents={"text": True})
    assert len(found.results) == 3
    assert found.results[0].text.startswith("Emulated page text")
    cost = found.cost_dollars
    assert cost.search == {"neural": 0.005}
    assert cost.contents == {"text": 0.003}
    assert Decimal(str(cost.total)) == Decimal("0.008")
    keyword = client.search(PROMPT, num_results=2, type="keyword", contents=False)
    assert keyword.cost_dollars.search == {"keyword": 0.005}
    assert keyword.cost_dollars.contents is None


def test_exa_sdk_sees_a_wrong_key(emulator):
    emulator.new_key("exa")
    client = exa_py.Exa(api_key="exa-wrong", base_url=emulator.base_url("exa"))
    with pytest.raises(ValueError, match="401"):
        client.search("anything", num_results=1)


# The README's emulator section -------------------------------------------------------------------
SDK_OF_TEST = {
    "openai": "openai",
    "anthropic": "anthropic",
    "genai": "google-genai",
    "mistral": "mistralai",
    "exa": "exa-py",
}


def test_the_readme_states_these_tests_checks_and_sdk_versions():
    """The README's table (SDK, version, tests, checks) is this module's, for the SDKs installed."""
    counted: dict[str, list[int]] = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        sdk = SDK_OF_TEST.get(node.name.split("_")[1])
        if sdk is None:
            continue
        checks = sum(
            isinstance(n, ast.Assert)
            or (isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "raises")
            for n in ast.walk(node)
        )
        entry = counted.setdefault(sdk, [0, 0])
        entry[0] += 1
        entry[1] += checks
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {
        m["sdk"]: (m["version"], int(m["tests"]), int(m["checks"]))
        for m in re.finditer(
            r"^\| `(?P<sdk>[\w-]+)` \| (?P<version>[\d.]+) \| (?P<tests>\d+) \| (?P<checks>\d+) \|$",
            readme,
            re.MULTILINE,
        )
    }
    assert rows == {
        sdk: (metadata.version(sdk), tests, checks) for sdk, (tests, checks) in counted.items()
    }
    total_tests = sum(t for t, _ in counted.values())
    total_checks = sum(c for _, c in counted.values())
    assert f"{total_tests} tests, {total_checks} checks" in readme
