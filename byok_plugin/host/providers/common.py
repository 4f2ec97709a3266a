"""The provider-neutral request and result of a model call (and of an Exa search).

Frozen values: a workflow runner builds a :class:`CompletionRequest` once and hands it to any
provider's client; every client answers with a :class:`CompletionResult` whose ``usage`` is a
``byok_hookspecs.Usage`` with disjoint token counts (see its docstring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from byok_hookspecs import Usage

__all__ = [
    "CompletionRequest",
    "CompletionResult",
    "FinishReason",
    "FunctionTool",
    "Message",
    "SearchHit",
    "SearchRequest",
    "SearchResult",
    "StreamDone",
    "StreamEvent",
    "TextDelta",
    "Tool",
    "ToolCall",
    "WebSearchTool",
]

Role = Literal["user", "assistant", "tool"]


def _check_text(owner: object, *names: str, optional: bool = False) -> None:
    """``TypeError`` unless each field is a string (or, ``optional``, ``None``): a provider's answer
    with a number or a list there is refused where it is read, not deep in a workflow."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, str) and not (optional and value is None):
            raise TypeError(
                f"{type(owner).__name__}.{name} must be a string, not {type(value).__name__}"
            )


class FinishReason:
    """Why a model stopped, normalised across providers (the raw value is kept alongside)."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model asks for. ``arguments`` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str = "{}"

    def __post_init__(self) -> None:
        _check_text(self, "id", "name", "arguments")

    def parsed_arguments(self) -> Any:
        """The arguments as JSON values; ``ValueError`` if the model wrote invalid JSON."""
        return json.loads(self.arguments or "{}")


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of the conversation (the system prompt goes in ``CompletionRequest.system``).

    :param role: ``user``, ``assistant``, or ``tool`` (the result of a tool call).
    :param content: the text.
    :param tool_calls: for an assistant turn that called tools.
    :param tool_call_id: for a ``tool`` turn: the call it answers.
    :param name: for a ``tool`` turn: the function's name (Gemini needs it).
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant", "tool"):
            raise ValueError(f"Message.role must be user, assistant or tool, not {self.role!r}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


@dataclass(frozen=True, slots=True)
class WebSearchTool:
    """The provider's own web search, where it has one: OpenAI ``web_search_options`` (search
    models), Anthropic's ``web_search`` server tool, Gemini's ``google_search``. Mistral's chat
    completions have none: its client raises ``UnsupportedRequest``.

    :param max_uses: Anthropic only: at most this many searches in one call.
    """

    max_uses: int | None = None


Tool = FunctionTool | WebSearchTool


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A model call, in terms every provider understands.

    :param model: the provider's model name.
    :param messages: the conversation, oldest first; at least one.
    :param system: the system prompt, if any.
    :param temperature: sampling temperature; ``None`` leaves the provider's default.
    :param max_output_tokens: an upper bound on generated tokens (Anthropic requires one: its
        client uses ``default_max_tokens`` when this is ``None``).
    :param response_schema: a JSON Schema the answer must follow (structured output).
    :param schema_name: the schema's name where the provider asks for one (OpenAI).
    :param tools: functions and/or web search the model may use.
    :param tool_choice: ``auto``, ``required``, ``none`` or a function's name; ``None`` = default.
    """

    model: str
    messages: tuple[Message, ...]
    system: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    response_schema: Mapping[str, Any] | None = None
    schema_name: str = "response"
    tools: tuple[Tool, ...] = ()
    tool_choice: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("CompletionRequest.model must not be empty")
        if not self.messages:
            raise ValueError("CompletionRequest.messages must hold at least one message")
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        if isinstance(self.tools, list):
            object.__setattr__(self, "tools", tuple(self.tools))
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError("CompletionRequest.max_output_tokens must be at least 1")

    @classmethod
    def simple(cls, model: str, prompt: str, **kwargs: Any) -> CompletionRequest:
        """One user message: ``CompletionRequest.simple("gpt-4o-mini", "Hello")``."""
        return cls(model=model, messages=(Message("user", prompt),), **kwargs)

    @property
    def function_tools(self) -> tuple[FunctionTool, ...]:
        return tuple(t for t in self.tools if isinstance(t, FunctionTool))

    @property
    def web_search(self) -> WebSearchTool | None:
        return next((t for t in self.tools if isinstance(t, WebSearchTool)), None)


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A model's complete answer.

    :param provider: who answered.
    :param model: the model that answered, as the provider named it.
    :param content: the visible text (a JSON document for a structured request).
    :param finish_reason: normalised (:class:`FinishReason`).
    :param raw_finish_reason: the provider's own value (``end_turn``, ``MAX_TOKENS``...).
    :param tool_calls: the functions the model asks to call.
    :param usage: what the call consumed, from the provider's own usage fields.
    :param response_id: the provider's id of the response, if any.
    :param streamed: whether it was read from a stream.
    """

    provider: str
    model: str
    content: str
    finish_reason: str
    usage: Usage
    raw_finish_reason: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    response_id: str | None = None
    streamed: bool = False

    def __post_init__(self) -> None:
        _check_text(self, "model", "content")
        _check_text(self, "raw_finish_reason", "response_id", optional=True)

    def parsed_content(self) -> Any:
        """The content as JSON (for a structured request); ``ValueError`` if it is not JSON."""
        return json.loads(self.content)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of visible text, as a stream delivers it."""

    text: str


@dataclass(frozen=True, slots=True)
class StreamDone:
    """The last event of a complete stream: the whole result, usage included."""

    result: CompletionResult


StreamEvent = TextDelta | StreamDone


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """An Exa search.

    :param query: what to search for.
    :param num_results: 1 to 100.
    :param search_type: Exa's ``type``: ``auto``, ``neural``, ``fast``, ``deep``, ``keyword``.
    :param include_text: also return each page's text (billed per page).
    :param max_characters: cap on the text per page, with ``include_text``.
    """

    query: str
    num_results: int = 10
    search_type: str = "auto"
    include_text: bool = False
    max_characters: int | None = None

    def __post_init__(self) -> None:
        if not self.query.strip():
            raise ValueError("SearchRequest.query must not be empty")
        if not 1 <= self.num_results <= 100:
            raise ValueError("SearchRequest.num_results must be between 1 and 100")


@dataclass(frozen=True, slots=True)
class SearchHit:
    url: str
    title: str | None = None
    id: str | None = None
    published_date: str | None = None
    author: str | None = None
    score: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        _check_text(self, "url")
        _check_text(self, "title", "id", "published_date", "author", "text", optional=True)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Exa's answer: the hits, the search type it resolved to, and the usage (with Exa's cost)."""

    provider: str
    hits: tuple[SearchHit, ...]
    usage: Usage
    search_type: str | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        _check_text(self, "search_type", "request_id", optional=True)
