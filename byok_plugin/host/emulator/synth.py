"""Deterministic replies and usage numbers, derived from the request alone.

The same request always gets the same reply and the same usage, whether streamed or not, so tests
can compare the two paths. The numbers are shaped like real ones, with simple documented rules:

- prompt tokens: ``ceil(chars / 4) + 4`` per message (system prompt included), plus 3;
- cached (cache-read) tokens: half of a prompt of at least 16 tokens, rounded down to a multiple
  of 8 (real providers cache only prompts of 1024 tokens and more; the emulator caches short ones
  too, so that a test with a prompt of ~50 characters sees a cache read);
- cache-write tokens (Anthropic only, when the request carries ``cache_control``): a quarter of what
  is not read from the cache;
- output tokens: one per streamed piece of the reply (a word, or 4 characters of JSON), cut at the
  request's max output tokens (finish reason ``length``);
- reasoning tokens: for reasoning models (``o1``/``o3``/``o4``/``gpt-5``, ``magistral``,
  ``gemini-2.5``/``gemini-3``, or a request asking for reasoning/thinking), ``16 + hash % 48``;
  none when the request turns thinking off (Gemini's ``thinkingBudget: 0``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_FILLER = (
    "the",
    "workspace",
    "key",
    "served",
    "this",
    "call",
    "and",
    "usage",
    "was",
    "recorded",
    "for",
    "billing",
    "with",
    "care",
    "so",
    "every",
    "token",
    "counts",
)

_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "magistral", "gemini-2.5", "gemini-3")


@dataclass(frozen=True, slots=True)
class Reply:
    """What the emulated model answers, and what it "consumed"."""

    pieces: tuple[str, ...]
    finish: str  # "stop" or "length"
    prompt_tokens: int  # every input token, cached ones included
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int  # visible output only
    reasoning_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


def is_reasoning_model(model: str) -> bool:
    name = model.rsplit("/", 1)[-1].lower()
    return name.startswith(_REASONING_PREFIXES)


def prompt_tokens(parts: Sequence[str]) -> int:
    return 3 + sum(math.ceil(len(p) / 4) + 4 for p in parts)


def schema_instance(schema: Mapping[str, Any], depth: int = 0) -> Any:
    """A small value that conforms to a (simple) JSON schema: the reply to a structured request."""
    if depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            return schema_instance(schema[combinator][0], depth + 1)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: schema_instance(sub, depth + 1) for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items") or {"type": "string"}
        return [schema_instance(items, depth + 1)] * int(schema.get("minItems", 1))
    if kind == "string":
        return "emulated"
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 1.5))
    if kind == "boolean":
        return True
    return None


def make_reply(
    *,
    provider: str,
    model: str,
    parts: Sequence[str],
    last_user: str,
    max_tokens: int | None,
    schema: Mapping[str, Any] | None = None,
    reasoning: bool | None = None,
    cache_write: bool = False,
) -> Reply:
    """The deterministic reply to a request whose text content is ``parts``.

    :param reasoning: ``True`` when the request asks for reasoning/thinking, ``False`` when it
        turns it off, ``None`` for the model's default (:func:`is_reasoning_model`).
    """
    digest = int.from_bytes(hashlib.sha256("\x00".join([model, *parts]).encode()).digest()[:8])
    if schema is not None:
        text = json.dumps(schema_instance(schema), separators=(",", ":"))
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    else:
        echo = " ".join(last_user.split()[:8]) or "(empty)"
        words = [f"Emulated {provider} reply from {model} to: {echo}."]
        words += [f" {_FILLER[(digest >> i) % len(_FILLER)]}" for i in range(4 + digest % 12)]
        words[-1] += "."
        pieces = words
    finish = "stop"
    if max_tokens is not None and len(pieces) > max_tokens:
        pieces, finish = pieces[: max(max_tokens, 0)], "length"
    total_prompt = prompt_tokens(parts)
    cached = (total_prompt // 2) // 8 * 8 if total_prompt >= 16 else 0
    writes = (total_prompt - cached) // 4 if cache_write else 0
    thinks = is_reasoning_model(model) if reasoning is None else reasoning
    return Reply(
        pieces=tuple(pieces),
        finish=finish,
        prompt_tokens=total_prompt,
        cached_tokens=cached,
        cache_write_tokens=writes,
        output_tokens=len(pieces),
        reasoning_tokens=16 + digest % 48 if thinks else 0,
    )


def text_of(content: Any) -> str:
    """The text of a message ``content`` in any of the providers' shapes (string or parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        for key in ("text", "content"):
            value = content.get(key)
            if isinstance(value, str):
                return value
        return text_of(content.get("parts") or content.get("content"))
    if isinstance(content, Sequence):
        return "".join(text_of(part) for part in content)
    return str(content)
