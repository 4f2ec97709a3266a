"""``byok_hookspecs.redact``: the one function every provider message and exception text goes
through before it reaches output, logs, the ledger or an audit event."""

from __future__ import annotations

import json
import secrets
from urllib.parse import quote

import pytest
from byok_hookspecs import redact
from hypothesis import assume, given
from hypothesis import strategies as st

KEY = "sk-proj-" + "Ab3dEf9hIj/kLmN+pQrStUvWxYz0123456789_-zz"
RANDOM_PART = KEY.removeprefix("sk-proj-")
HALVES = (KEY[: len(KEY) // 2], KEY[len(KEY) // 2 :])
OTHER_KEY = "zq" + secrets.token_hex(20)


def assert_clean(text: str) -> None:
    low = text.lower()
    for secret in (KEY, RANDOM_PART, *HALVES):
        assert secret.lower() not in low, text
    for form in (quote(KEY, safe=""), json.dumps(KEY)[1:-1].replace("/", "\\/")):
        assert form.lower() not in low, text


ECHOES = {
    "exact": f"Incorrect API key provided: {KEY}.",
    "upper case": f"invalid key {KEY.upper()}",
    "lower-case bearer": f"bad header: authorization: bearer {KEY.lower()}",
    "a prefix": f"key {KEY[:14]}... is not valid",
    "a suffix": f"key ending {KEY[-9:]} is not valid",
    "each half": f"{HALVES[0]} / {HALVES[1]}",
    "json object": json.dumps({"error": {"message": "denied", "key": KEY}}),
    "json list": json.dumps({"errors": [{"detail": ["bad", KEY]}]}),
    "json with escaped slash": json.dumps({"k": KEY}).replace("/", "\\/"),
    "json in json": json.dumps({"body": json.dumps({"api_key": KEY})}),
    "url-encoded": f"GET /v1/models?key={quote(KEY, safe='')}",
    "url-encoded in a path": f"https://gw.example/{quote(KEY, safe='')}/check",
    "x-api-key header": f"received headers x-api-key: {KEY}",
}


@pytest.mark.parametrize("text", ECHOES.values(), ids=ECHOES.keys())
def test_every_echoed_form_of_the_key_is_removed(text: str) -> None:
    out = redact(text, KEY)
    assert_clean(out)
    assert "[redacted]" in out


def test_the_rest_of_the_message_is_kept() -> None:
    out = redact(f"Rate limit reached for gpt-4o (key {KEY}); retry in 20s", KEY)
    assert out == "Rate limit reached for gpt-4o (key [redacted]); retry in 20s"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def", "Authorization: Bearer [redacted]"),
        ("GET /v1beta/models?key=AIzaXYZ&alt=sse", "GET /v1beta/models?key=[redacted]&alt=sse"),
        ('{"x-api-key": "some-other-key"}', '{"x-api-key": "[redacted]"}'),
        ("Incorrect API key provided: sk-*****GYvFc1.", "Incorrect API key provided: [redacted]."),
        ("max_tokens: 100 is too large", "max_tokens: 100 is too large"),
        ("", ""),
    ],
)
def test_anything_after_a_credential_marker_goes_whatever_the_key(text: str, expected: str) -> None:
    assert redact(text, None) == expected


def test_a_short_secret_is_removed_where_it_appears_whole() -> None:
    assert redact("pin 12ab and 12AB", "12ab") == "pin [redacted] and [redacted]"


def test_several_secrets_at_once() -> None:
    other = "another-secret-value-42"
    out = redact(f"{KEY} then {other.upper()}", KEY, other, None, "")
    assert out == "[redacted] then [redacted]"


@given(
    start=st.integers(min_value=0, max_value=len(KEY) - 8),
    length=st.integers(min_value=8, max_value=len(KEY)),
    upper=st.booleans(),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
)
def test_any_run_of_eight_or_more_characters_of_the_key_is_removed(
    start: int, length: int, upper: bool, before: str, after: str
) -> None:
    piece = KEY[start : start + length]
    if len(piece) < 8:
        piece = KEY[-8:]
    if upper:
        piece = piece.upper()
    out = redact(before + piece + after, KEY)
    assert piece.lower() not in out.lower()


@given(st.text(alphabet=st.characters(blacklist_characters="*=:"), max_size=200))
def test_text_without_the_key_or_a_marker_is_unchanged(text: str) -> None:
    assume("bearer" not in text.lower() and "basic" not in text.lower())
    key = OTHER_KEY
    assume(not any(key[i : i + 8] in text.lower() for i in range(len(key) - 7)))
    assert redact(text, key) == text
