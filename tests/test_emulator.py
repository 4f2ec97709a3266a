"""The emulator over real HTTP on loopback: key checks in each provider's shape, recording, faults."""

from __future__ import annotations

import json
import secrets
import time

import httpx
import pytest

from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.emulator.keys import KeysFileError, parse_keys


def auth_headers(provider: str, key: str) -> dict[str, str]:
    return {
        "openai": {"authorization": f"Bearer {key}"},
        "mistral": {"authorization": f"Bearer {key}"},
        "anthropic": {"x-api-key": key, "anthropic-version": "2023-06-01"},
        "google": {"x-goog-api-key": key},
        "exa": {"x-api-key": key},
    }[provider]


LISTINGS = {
    "openai": "/models",
    "mistral": "/v1/models",
    "anthropic": "/v1/models",
    "google": "/v1beta/models",
    "exa": "/websets/v0/websets",
}


def chat_call(
    emulator: EmulatorServer,
    provider: str,
    key: str,
    *,
    stream: bool = False,
    prompt: str = "Summarise the quarterly report for the board",
) -> httpx.Response:
    base = emulator.base_url(provider)
    headers = auth_headers(provider, key)
    if provider in ("openai", "mistral"):
        path = "/chat/completions" if provider == "openai" else "/v1/chat/completions"
        body: dict = {
            "model": "gpt-4o-mini" if provider == "openai" else "mistral-small-latest",
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
        }
        if stream and provider == "openai":
            body["stream_options"] = {"include_usage": True}
        return httpx.post(base + path, headers=headers, json=body)
    if provider == "anthropic":
        body = {
            "model": "claude-haiku-4-5",
            "max_tokens": 200,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
        }
        return httpx.post(base + "/v1/messages", headers=headers, json=body)
    if provider == "google":
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        return httpx.post(
            base + f"/v1beta/models/gemini-2.5-flash:{method}", headers=headers, json=body
        )
    return httpx.post(base + "/search", headers=headers, json={"query": prompt, "numResults": 3})


@pytest.mark.parametrize("provider", sorted(LISTINGS))
def test_listing_accepts_a_registered_key_and_records_which_one(emulator, provider):
    key_a = emulator.new_key(provider, label="workspace-a")
    key_b = emulator.new_key(provider, label="workspace-b")
    response = httpx.get(
        emulator.base_url(provider) + LISTINGS[provider], headers=auth_headers(provider, key_b)
    )
    assert response.status_code == 200, response.text
    (call,) = emulator.calls(provider)
    assert call.key_label == "workspace-b"
    assert call.used_key(key_b)
    assert not call.used_key(key_a)
    assert call.method == "GET"
    assert call.status == 200


EXPECTED_AUTH = {
    # provider: (status for a wrong key, how to read the provider's own error message)
    "openai": (401, lambda b: b["error"]["code"] == "invalid_api_key"),
    "mistral": (401, lambda b: b["object"] == "error" and b["message"] == "Unauthorized"),
    "anthropic": (
        401,
        lambda b: b["type"] == "error" and b["error"]["type"] == "authentication_error",
    ),
    "google": (400, lambda b: b["error"]["details"][0]["reason"] == "API_KEY_INVALID"),
    "exa": (401, lambda b: b["tag"] == "INVALID_API_KEY"),
}


@pytest.mark.parametrize("provider", sorted(LISTINGS))
def test_an_unknown_key_is_refused_in_the_providers_own_shape(emulator, provider):
    emulator.new_key(provider)
    wrong = secrets.token_urlsafe(20)
    response = httpx.get(
        emulator.base_url(provider) + LISTINGS[provider], headers=auth_headers(provider, wrong)
    )
    status, shape_ok = EXPECTED_AUTH[provider]
    assert response.status_code == status
    assert shape_ok(response.json())
    assert wrong not in response.text
    (call,) = emulator.calls(provider)
    assert call.key_label is None
    assert call.used_key(wrong)
    assert call.status == status


def test_a_missing_google_key_is_permission_denied(emulator):
    response = httpx.get(emulator.base_url("google") + "/v1beta/models")
    assert response.status_code == 403
    assert response.json()["error"]["status"] == "PERMISSION_DENIED"


def test_anthropic_requires_its_version_header(emulator):
    key = emulator.new_key("anthropic")
    response = httpx.get(emulator.base_url("anthropic") + "/v1/models", headers={"x-api-key": key})
    assert response.status_code == 400
    assert "anthropic-version" in response.json()["error"]["message"]


def test_a_key_of_one_provider_is_refused_by_another(emulator):
    key = emulator.new_key("openai")
    response = httpx.get(
        emulator.base_url("mistral") + "/v1/models", headers=auth_headers("mistral", key)
    )
    assert response.status_code == 401


def test_accept_any_key_is_explicit(emulator):
    emulator.state.accept_any_key = True
    response = httpx.get(
        emulator.base_url("openai") + "/models", headers=auth_headers("openai", "anything")
    )
    assert response.status_code == 200
    assert httpx.get(emulator.base_url("openai") + "/models").status_code == 401


@pytest.mark.parametrize("provider", sorted(LISTINGS))
def test_replies_are_deterministic_and_recorded(emulator, provider):
    key = emulator.new_key(provider, label="ws")
    first, second = chat_call(emulator, provider, key), chat_call(emulator, provider, key)
    assert first.status_code == second.status_code == 200, first.text
    strip = ("id", "created", "requestId", "responseId", "request_id")
    a = {k: v for k, v in first.json().items() if k not in strip}
    b = {k: v for k, v in second.json().items() if k not in strip}
    assert a == b
    calls = emulator.calls(provider)
    assert [c.key_label for c in calls] == ["ws", "ws"]
    assert all(c.model and not c.stream and c.body for c in calls)


def test_usage_numbers_are_realistic(emulator):
    key = emulator.new_key("openai")
    body = chat_call(emulator, "openai", key, prompt="word " * 200).json()
    usage = body["usage"]
    assert usage["prompt_tokens"] > usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    reasoning = httpx.post(
        emulator.base_url("openai") + "/chat/completions",
        headers=auth_headers("openai", key),
        json={"model": "o4-mini", "messages": [{"role": "user", "content": "think hard"}]},
    ).json()["usage"]
    assert reasoning["completion_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google", "mistral"])
def test_streams_end_with_the_providers_terminal_event(emulator, provider):
    key = emulator.new_key(provider)
    response = chat_call(emulator, provider, key, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    terminal = {
        "openai": "data: [DONE]",
        "mistral": "data: [DONE]",
        "anthropic": '"type":"message_stop"',
        "google": '"finishReason":"STOP"',
    }
    last = [line for line in response.text.splitlines() if line.strip()][-1]
    assert terminal[provider] in last
    assert emulator.calls(provider)[0].stream


def test_rate_limit_fault_then_normal_answer(emulator):
    key = emulator.new_key("anthropic")
    emulator.add_fault(Fault(FaultKind.RATE_LIMIT, provider="anthropic", retry_after=7, times=2))
    first, second, third = (chat_call(emulator, "anthropic", key) for _ in range(3))
    assert first.status_code == second.status_code == 429
    assert first.headers["retry-after"] == "7"
    assert first.json()["error"]["type"] == "rate_limit_error"
    assert third.status_code == 200
    assert [c.fault for c in emulator.calls("anthropic")] == [
        FaultKind.RATE_LIMIT,
        FaultKind.RATE_LIMIT,
        None,
    ]


def test_faults_can_target_one_key(emulator):
    hit, spared = emulator.new_key("openai"), emulator.new_key("openai")
    emulator.add_fault(Fault.for_key(FaultKind.SERVER_ERROR, hit, times=None))
    assert chat_call(emulator, "openai", spared).status_code == 200
    assert chat_call(emulator, "openai", hit).status_code == 500
    assert chat_call(emulator, "openai", hit).status_code == 500
    assert chat_call(emulator, "openai", spared).status_code == 200
    emulator.state.clear_faults()
    assert chat_call(emulator, "openai", hit).status_code == 200


def test_malformed_json_fault(emulator):
    key = emulator.new_key("google")
    emulator.add_fault(Fault(FaultKind.MALFORMED_JSON, provider="google"))
    response = chat_call(emulator, "google", key)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_truncated_stream_fault_drops_the_terminal_events(emulator):
    key = emulator.new_key("openai")
    emulator.add_fault(Fault(FaultKind.TRUNCATED_STREAM, provider="openai"))
    response = chat_call(emulator, "openai", key, stream=True)
    assert response.status_code == 200
    assert "[DONE]" not in response.text
    assert '"usage":{' not in response.text
    assert "chat.completion.chunk" in response.text


def test_slow_fault_delays_the_answer(emulator):
    key = emulator.new_key("mistral")
    emulator.add_fault(Fault(FaultKind.SLOW, provider="mistral", delay=0.5))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            emulator.base_url("mistral") + "/v1/chat/completions",
            headers=auth_headers("mistral", key),
            json={"model": "mistral-small-latest", "messages": [{"role": "user", "content": "x"}]},
            timeout=httpx.Timeout(5, read=0.1),
        )


def test_a_slow_answer_finishing_after_a_reset_is_not_recorded_into_the_next_log(emulator):
    """A test's timed-out call must not show up in the next test's call log."""
    key = emulator.new_key("mistral")
    emulator.add_fault(Fault(FaultKind.SLOW, provider="mistral", delay=0.4))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            emulator.base_url("mistral") + "/v1/chat/completions",
            headers=auth_headers("mistral", key),
            json={"model": "mistral-small-latest", "messages": [{"role": "user", "content": "x"}]},
            timeout=httpx.Timeout(5, read=0.05),
        )
    emulator.state.reset()  # what the fixture does between tests
    time.sleep(0.6)  # the slow answer finishes now
    assert emulator.calls() == []


def test_bad_requests_are_answered_400_in_the_providers_shape(emulator):
    key = emulator.new_key("openai")
    response = httpx.post(
        emulator.base_url("openai") + "/chat/completions",
        headers=auth_headers("openai", key),
        json={"messages": []},
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.post(
        emulator.base_url("openai") + "/chat/completions",
        headers={**auth_headers("openai", key), "content-type": "application/json"},
        content=b"{not json",
    )
    assert response.status_code == 400


def test_keys_file_parsing_names_the_line_never_the_key():
    secret = secrets.token_urlsafe(16)
    keys = parse_keys(f"# comment\n\nopenai=sk-{secret}\nanthropic:ws-b = {secret}\n")
    assert [(k.provider, k.label) for k in keys] == [("openai", None), ("anthropic", "ws-b")]
    assert keys[1].api_key == secret
    assert secret not in repr(keys[1])
    with pytest.raises(
        KeysFileError, match=r"keys.txt, line 2: unknown provider before '='"
    ) as info:
        parse_keys(f"openai={secret}\ncohere={secret}\n", source="keys.txt")
    assert secret not in str(info.value)
    with pytest.raises(KeysFileError, match="line 1: expected provider") as info:
        parse_keys(f"openai {secret}\n", source="keys.txt")
    assert secret not in str(info.value)


def test_the_control_api_drives_an_emulator_in_another_process(emulator):
    key = "sk-" + secrets.token_urlsafe(20)
    control = emulator.url + "/_emulator"
    assert (
        httpx.post(
            control + "/keys", json={"provider": "openai", "key": key, "label": "remote"}
        ).json()["label"]
        == "remote"
    )
    assert (
        httpx.post(
            control + "/faults", json={"kind": "rate_limit", "provider": "openai", "retry_after": 2}
        ).status_code
        == 200
    )
    assert chat_call(emulator, "openai", key).status_code == 429
    assert chat_call(emulator, "openai", key).status_code == 200
    calls = httpx.get(control + "/calls", params={"provider": "openai"}).json()
    assert [(c["key_label"], c["status"], c["fault"]) for c in calls] == [
        ("remote", 429, "rate_limit"),
        ("remote", 200, None),
    ]
    assert key not in json.dumps(calls)
    bad = httpx.post(control + "/faults", json={"kind": "meteor"})
    assert bad.status_code == 400
    assert "meteor" in bad.json()["error"]
    assert httpx.post(control + "/keys", json={"provider": "cohere", "key": "x"}).status_code == 400
    assert httpx.delete(control + "/calls").status_code == 200
    assert emulator.calls() == []


# the shape of each provider's error for a path it does not serve, and for a method a path refuses
UNKNOWN_ROUTE_ERRORS = {
    "openai": lambda body: body["error"]["type"] == "invalid_request_error",
    "mistral": lambda body: body["object"] == "error",
    "anthropic": lambda body: (
        body["type"] == "error"
        and body["error"]["type"] in ("not_found_error", "invalid_request_error")
    ),
    "google": lambda body: body["error"]["status"] in ("NOT_FOUND", "UNIMPLEMENTED"),
    "exa": lambda body: body["tag"] in ("NOT_FOUND", "INVALID_REQUEST"),
}


@pytest.mark.parametrize("provider", sorted(UNKNOWN_ROUTE_ERRORS))
def test_unknown_routes_and_methods_answer_in_the_providers_error_json(emulator, provider):
    key = emulator.new_key(provider)
    headers = auth_headers(provider, key)
    base = emulator.base_url(provider)
    missing = httpx.get(base + "/no/such/route", headers=headers)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert UNKNOWN_ROUTE_ERRORS[provider](missing.json()), missing.text
    assert "/no/such/route" in missing.text
    wrong_method = httpx.delete(base + LISTINGS[provider], headers=headers)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"].startswith("GET")
    assert UNKNOWN_ROUTE_ERRORS[provider](wrong_method.json()), wrong_method.text
    assert [(c.method, c.status) for c in emulator.calls(provider)] == [
        ("GET", 404),
        ("DELETE", 405),
    ]


def test_a_gemini_429_says_when_to_retry_in_its_body_as_google_does(emulator):
    key = emulator.new_key("google")
    emulator.add_fault(Fault(FaultKind.RATE_LIMIT, provider="google", retry_after=7))
    response = chat_call(emulator, "google", key)
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    error = response.json()["error"]
    assert error["status"] == "RESOURCE_EXHAUSTED"
    kinds = {d["@type"].rsplit(".", 1)[1]: d for d in error["details"]}
    assert kinds["RetryInfo"] == {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "7s",
    }
    assert kinds["QuotaFailure"]["violations"][0]["quotaDimensions"]["model"] == "gemini-2.5-flash"
    assert "Help" in kinds


def test_gemini_serves_v1_and_v1beta_and_reads_snake_case_fields(emulator):
    key = emulator.new_key("google")
    headers = auth_headers("google", key)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {
        "contents": [{"role": "user", "parts": [{"text": "weather?"}]}],
        "generation_config": {"thinking_config": {"thinking_budget": 0}},
        "tools": [{"function_declarations": [{"name": "f", "parameters_json_schema": schema}]}],
        "tool_config": {"function_calling_config": {"mode": "ANY"}},
    }
    for version in ("v1", "v1beta"):
        url = emulator.base_url("google") + f"/{version}/models/gemini-2.5-flash:generateContent"
        answer = httpx.post(url, headers=headers, json=body).json()
        call = answer["candidates"][0]["content"]["parts"][0]["functionCall"]
        assert call == {"name": "f", "args": {"city": "emulated"}}
        assert "thoughtsTokenCount" not in answer["usageMetadata"]


@pytest.mark.parametrize("kind", [FaultKind.TRUNCATED_STREAM, FaultKind.MALFORMED_JSON])
def test_a_responses_api_stream_breaks_as_asked(emulator, kind):
    key = emulator.new_key("openai")
    url = emulator.base_url("openai") + "/responses"
    body = {"model": "gpt-4o-mini", "input": "Summarise the report", "stream": True}
    whole = httpx.post(url, headers=auth_headers("openai", key), json=body).text
    assert whole.rstrip().endswith("}")
    assert "event: response.completed" in whole
    emulator.add_fault(Fault(kind, provider="openai"))
    broken = httpx.post(url, headers=auth_headers("openai", key), json=body).text
    if kind is FaultKind.TRUNCATED_STREAM:
        assert "response.completed" not in broken
    else:
        assert "event: response.completed" in broken
        assert 'data: {"broken": \n' in broken
    assert [c.fault for c in emulator.calls("openai")] == [None, kind]
