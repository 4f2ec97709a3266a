"""A loaded, checked workflow: frozen values the runner executes.

Built only by :func:`byok_plugin.host.workflow.parse_workflow` after the JSON Schema and the
semantic checks pass, so every field here is known to be well-formed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from byok_plugin.host.workflow.patterns import Pattern
from byok_plugin.host.workflow.templates import Template

__all__ = [
    "AgentBlock",
    "AgentTool",
    "Block",
    "ConditionBlock",
    "Edge",
    "InputBlock",
    "InputSpec",
    "KeyRef",
    "OutputBlock",
    "ToolBlock",
    "WebSearch",
    "Workflow",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Which key serves a block, by reference: a key written in the workflow file would travel
    with every copy of it (version control, logs, shared exports); a reference does not.

    - ``label``: the workspace's stored key with that label for the block's provider. The runner
      passes it to ``byok_resolve_credential`` as ``CredentialRequest.key_label``; resolution
      serves that key (source ``workspace``: authorized, cooled down, audited and billed as any
      workspace key) or fails the block.
    - ``env``: an environment variable of the process, read at run time and passed as
      ``CredentialRequest.block_key`` (source ``block``). A workflow file is untrusted input, so a
      runner refuses it unless its operator allowed that variable (:class:`EnvKeyAllowance`).

    Exactly one of the two is set.
    """

    env: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if (self.env is None) == (self.label is None):
            raise ValueError("a KeyRef has exactly one of env and label")

    @property
    def member(self) -> str:
        """The name of the reference's member in the workflow file: ``env`` or ``label``."""
        return "env" if self.env is not None else "label"

    def __str__(self) -> str:
        return f"${self.env}" if self.env is not None else f"label {self.label!r}"


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    type: str = "string"
    description: str = ""
    default: Any = None
    has_default: bool = False


@dataclass(frozen=True, slots=True)
class AgentTool:
    """A tool the model may call: an Exa web search."""

    type: str = "exa_search"
    num_results: int = 5
    required: bool = False
    key: KeyRef | None = None


@dataclass(frozen=True, slots=True)
class WebSearch:
    """The provider's own web search, enabled on an agent block (``"web_search"``).

    :param max_uses: Anthropic only: at most this many searches in one call (each billed).
    """

    max_uses: int | None = None


@dataclass(frozen=True, slots=True)
class AgentBlock:
    id: str
    model: str
    provider: str
    prompt: Template
    system: Template | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    response_schema: Mapping[str, Any] | None = None
    tools: tuple[AgentTool, ...] = ()
    max_tool_rounds: int = 3
    web_search: WebSearch | None = None
    key: KeyRef | None = None
    stream: bool = False
    retries: int | None = None
    description: str = ""
    type: ClassVar[str] = "agent"

    @property
    def templates(self) -> tuple[tuple[str, Template], ...]:
        pairs = [("prompt", self.prompt)]
        if self.system is not None:
            pairs.insert(0, ("system", self.system))
        return tuple(pairs)


@dataclass(frozen=True, slots=True)
class InputBlock:
    id: str
    fields: tuple[str, ...]
    description: str = ""
    type: ClassVar[str] = "input"
    templates: ClassVar[tuple[tuple[str, Template], ...]] = ()


@dataclass(frozen=True, slots=True)
class ConditionBlock:
    """``value`` (rendered) tested with one operator; edges leaving it follow ``true`` or ``false``."""

    id: str
    value: Template
    operator: str
    operand: str | tuple[str, ...]
    ignore_case: bool = False
    description: str = ""
    #: the ``matches`` pattern, compiled by RE2 (linear time; see ``patterns``)
    pattern: Pattern | None = field(default=None, compare=False)
    type: ClassVar[str] = "condition"

    @property
    def templates(self) -> tuple[tuple[str, Template], ...]:
        return (("value", self.value),)

    def test(self, text: str) -> bool:
        value = text.strip()
        operand = self.operand
        if self.ignore_case:
            value = value.casefold()
            operand = (
                operand.casefold()
                if isinstance(operand, str)
                else tuple(o.casefold() for o in operand)
            )
        if self.operator == "equals":
            return value == operand
        if self.operator == "not_equals":
            return value != operand
        if self.operator == "in":
            return value in operand
        if self.operator == "contains":
            return isinstance(operand, str) and operand in value
        assert self.pattern is not None
        try:
            return self.pattern.search(text) is not None
        except UnicodeEncodeError:  # a lone surrogate (JSON allows one) has no UTF-8 form
            return self.pattern.search(text.encode("utf-8", "replace").decode()) is not None


@dataclass(frozen=True, slots=True)
class ToolBlock:
    """A direct Exa search."""

    id: str
    tool: str
    query: Template
    num_results: int = 5
    search_type: str = "auto"
    include_text: bool = True
    key: KeyRef | None = None
    retries: int | None = None
    description: str = ""
    type: ClassVar[str] = "tool"

    @property
    def templates(self) -> tuple[tuple[str, Template], ...]:
        return (("query", self.query),)


@dataclass(frozen=True, slots=True)
class OutputBlock:
    id: str
    value: Template | None = None
    fields: Mapping[str, Template] = field(default_factory=lambda: _EMPTY)
    description: str = ""
    type: ClassVar[str] = "output"

    @property
    def templates(self) -> tuple[tuple[str, Template], ...]:
        if self.value is not None:
            return (("value", self.value),)
        return tuple((f"fields.{name}", t) for name, t in self.fields.items())


Block = AgentBlock | InputBlock | ConditionBlock | ToolBlock | OutputBlock


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    branch: bool | None = None
    index: int = 0

    def follows(self, condition_result: bool | None) -> bool:
        return self.branch is None or self.branch == condition_result


@dataclass(frozen=True)
class Workflow:
    """A checked workflow. ``order`` is a topological order of the blocks."""

    name: str
    version: str
    blocks: Mapping[str, Block]
    edges: tuple[Edge, ...] = ()
    inputs: Mapping[str, InputSpec] = field(default_factory=lambda: _EMPTY)
    description: str = ""
    source: str = "<workflow>"
    incoming: Mapping[str, tuple[Edge, ...]] = field(default_factory=lambda: _EMPTY, repr=False)
    outgoing: Mapping[str, tuple[Edge, ...]] = field(default_factory=lambda: _EMPTY, repr=False)
    order: tuple[str, ...] = field(default=(), repr=False)

    def upstream(self, block_id: str) -> frozenset[str]:
        """Every block with a path of edges into ``block_id``."""
        seen: set[str] = set()
        stack = [e.source for e in self.incoming.get(block_id, ())]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(e.source for e in self.incoming.get(current, ()))
        return frozenset(seen)

    @property
    def agent_blocks(self) -> tuple[AgentBlock, ...]:
        return tuple(b for b in self.blocks.values() if isinstance(b, AgentBlock))

    @property
    def output_blocks(self) -> tuple[OutputBlock, ...]:
        return tuple(b for b in self.blocks.values() if isinstance(b, OutputBlock))
