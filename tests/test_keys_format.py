"""Input checks before anything is stored, and the display hint; errors never quote the key."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keys_support import random_key, windows

from byok_plugin.core.errors import InvalidInput, InvalidKeyFormat, UnknownProvider
from byok_plugin.core.key_format import (
    KNOWN_PROVIDERS,
    MAX_KEY_LENGTH,
    check_api_key,
    check_key_id,
    check_label,
    check_provider,
    check_workspace_id,
    mask,
)


@pytest.mark.parametrize("provider", KNOWN_PROVIDERS)
def test_real_shaped_keys_pass_without_warning(provider: str) -> None:
    check = check_api_key(provider, random_key(provider))
    assert check.provider == provider
    assert check.warnings == ()


@pytest.mark.parametrize(
    ("provider", "key", "expected"),
    [
        ("openai", "", "is empty"),
        ("openai", "sk-proj-abc def" + "x" * 20, "whitespace at character 12"),
        ("openai", "sk-proj-abc\x00" + "x" * 20, "control character"),
        ("openai", "sk-proj-é" + "x" * 20, "non-ASCII"),
        ("openai", "sk-short", "8 characters long"),
        ("openai", "sk-" + "x" * MAX_KEY_LENGTH, "the limit is"),
        ("openai", "pk-" + "x" * 30, "start with 'sk-'"),
        ("openai", "sk-ant-api03-" + "x" * 30, "looks like an Anthropic key"),
        ("anthropic", "sk-proj-" + "x" * 30, "start with 'sk-ant-'"),
    ],
)
def test_bad_keys_are_refused_with_a_reason(provider: str, key: str, expected: str) -> None:
    with pytest.raises(InvalidKeyFormat, match=expected) as info:
        check_api_key(provider, key)
    # the secret part (past any public prefix such as 'sk-ant-') never shows
    assert not any(w in str(info.value) for w in windows(key[8:]))


@pytest.mark.parametrize(
    ("provider", "key", "expected"),
    [
        ("openai", "sk-admin-" + "x" * 40, "admin key"),
        ("openai", "sk-" + "x" * 30, "unusual OpenAI"),
        ("anthropic", "sk-ant-admin01-" + "x" * 40, "Admin API key"),
        ("google", "AIza" + "x" * 20, "length 24"),
        ("google", "AQ." + "x" * 50, None),
        ("google", "ya29." + "x" * 50, "unusual Gemini"),
        ("mistral", "x" * 31 + "-", "unusual Mistral"),
        ("exa", "x" * 36, "unusual Exa"),
    ],
)
def test_unusual_keys_pass_with_a_warning(provider: str, key: str, expected: str | None) -> None:
    check = check_api_key(provider, key)
    if expected is None:
        assert check.warnings == ()
    else:
        assert len(check.warnings) == 1
        assert expected in check.warnings[0]
        assert not any(w in check.warnings[0] for w in windows(key))


CANARY_ALPHABET = "QXZJVKWY"  # letters that never occur together in our messages


@settings(max_examples=300, deadline=None)
@given(
    provider=st.sampled_from(KNOWN_PROVIDERS),
    before=st.text(max_size=30),
    canary=st.text(alphabet=CANARY_ALPHABET, min_size=10, max_size=20),
    after=st.text(max_size=600),
)
def test_no_check_message_ever_quotes_the_key(
    provider: str, before: str, canary: str, after: str
) -> None:
    key = before + canary + after
    try:
        check = check_api_key(provider, key)
    except InvalidKeyFormat as exc:
        messages = [str(exc), repr(exc)]
    else:
        messages = [*list(check.warnings), repr(check)]
    for message in messages:
        assert canary not in message
        assert not any(w in message for w in windows(canary, 6))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=20, max_size=512))
def test_the_hint_shows_at_most_ten_characters(key: str) -> None:
    hint = mask(key)
    assert hint == f"{key[:6]}...{key[-4:]}"
    # no run of the key longer than the hint's own 6-character prefix
    assert not any(w in hint for w in windows(key, 7))


def test_the_hint_of_a_short_value_shows_nothing() -> None:
    assert mask("abc") == "..."


def test_providers_are_checked_and_normalized() -> None:
    assert check_provider(" OpenAI ") == "openai"
    with pytest.raises(UnknownProvider, match="use one of openai, anthropic"):
        check_provider("azure")
    with pytest.raises(UnknownProvider, match="a provider is required"):
        check_provider("")


def test_workspace_ids_labels_and_key_ids_are_checked() -> None:
    assert check_workspace_id("acme") == "acme"
    for bad in ("", " acme", "a\x00b", "x" * 201):
        with pytest.raises(InvalidInput):
            check_workspace_id(bad)
    assert check_label(None) == "default"
    for bad in ("", " spaced ", "a\nb", "x" * 65):
        with pytest.raises(InvalidInput):
            check_label(bad)
    assert check_key_id("key_abcdEFGH1234-_xy") == "key_abcdEFGH1234-_xy"
    with pytest.raises(InvalidInput, match="key id"):
        check_key_id("sk-proj-notanid")
