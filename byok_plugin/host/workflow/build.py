"""From a schema-valid document to a :class:`Workflow`: the checks a JSON Schema cannot express.

Each check reports the JSON path of the value at fault: an edge to a block that does not exist, a
cycle, a reference to a block that is not upstream, an output field a block does not have, a model
whose provider cannot be inferred, an invalid regular expression or response schema.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from byok_plugin.host.workflow.document import read_document, read_file, schema_problems
from byok_plugin.host.workflow.errors import InputsError, Problem, WorkflowError, json_path
from byok_plugin.host.workflow.model import (
    AgentBlock,
    AgentTool,
    Block,
    ConditionBlock,
    Edge,
    InputBlock,
    InputSpec,
    KeyRef,
    OutputBlock,
    ToolBlock,
    WebSearch,
    Workflow,
)
from byok_plugin.host.workflow.patterns import PatternError, compile_pattern
from byok_plugin.host.workflow.providers import (
    ANTHROPIC_MAX_SEARCHES,
    TOOL_PROVIDERS,
    infer_provider,
    web_search_refusal,
)
from byok_plugin.host.workflow.templates import Ref, Template, TemplateSyntaxError

__all__ = [
    "OUTPUT_FIELDS",
    "bind_inputs",
    "check_models",
    "load_workflow",
    "parse_workflow",
]

#: the output fields of each block type; True when a field holds a structure one may step into
OUTPUT_FIELDS: Mapping[str, Mapping[str, bool]] = MappingProxyType(
    {
        "agent": {
            "content": False,
            "json": True,
            "model": False,
            "provider": False,
            "finish_reason": False,
        },
        "condition": {"result": False, "value": False, "content": False},
        "tool": {"content": False, "results": True},
        "output": {"value": False, "fields": True, "content": False},
    }
)
_TEMPERATURE_MAX = {"anthropic": 1.0}
#: a workflow's checks stop at this many problems: each costs a "did you mean" search among up to
#: MAX_BLOCKS names, and a hostile file can hold thousands of bad references
MAX_PROBLEMS = 100
#: how deeply a ``response_schema`` may nest objects and arrays, as the operator's JSON files may
#: (``byok_plugin.core.json_file.MAX_DEPTH``); structured output allows far less (OpenAI: 10
#: levels of objects, which is 20 here)
MAX_SCHEMA_DEPTH = 32
#: the most names a message lists (``declared: a, b, ...``)
_LISTED = 10
_CONDITION_OPERATORS = ("equals", "not_equals", "in", "contains", "matches")


def load_workflow(path: str | Path) -> Workflow:
    """Read, check and build the workflow in a JSON file; :class:`WorkflowError` lists what is
    wrong, each problem with its JSON path."""
    path = Path(path)
    return parse_workflow(read_file(path), source=str(path))


def parse_workflow(document: Any, source: str = "<workflow>") -> Workflow:
    """Check a parsed document (or JSON text) and build the workflow."""
    if isinstance(document, str | bytes):
        document = read_document(document, source)
    problems = schema_problems(document)
    if problems:
        raise WorkflowError(problems, source)
    builder = _Builder(document, source)
    try:
        workflow = builder.build()
    except _TooManyProblems:
        problems = [
            *builder.problems,
            Problem("$", f"more than {MAX_PROBLEMS} problems: checking stopped; fix these first"),
        ]
        raise WorkflowError(problems, source) from None
    if builder.problems or workflow is None:
        raise WorkflowError(builder.problems, source)
    return workflow


def check_models(workflow: Workflow, is_known: Callable[[str, str], bool | None]) -> list[Problem]:
    """The agent models and tools nobody knows.

    ``is_known(provider, model)`` answers ``True``/``False`` (known; hosted or not) or ``None``
    (unknown). A host passes ``byok_is_hosted`` here, so the plugin's catalog, or any plugin that
    answers first, decides which models exist.
    """
    problems = []
    for block in workflow.blocks.values():
        base = ("blocks", block.id)
        if isinstance(block, AgentBlock):
            if is_known(block.provider, block.model) is None:
                problems.append(
                    Problem(
                        json_path((*base, "model")),
                        f"unknown {block.provider} model {block.model!r}: no installed plugin "
                        f"knows it (byok_is_hosted gave no answer); check the name, or add the "
                        f"model to the catalog",
                    )
                )
            for i, tool in enumerate(block.tools):
                provider, name = TOOL_PROVIDERS[tool.type]
                if is_known(provider, name) is None:
                    problems.append(
                        Problem(json_path((*base, "tools", i, "type")), f"unknown tool {name!r}")
                    )
        elif isinstance(block, ToolBlock):
            provider, name = TOOL_PROVIDERS[block.tool]
            if is_known(provider, name) is None:
                problems.append(Problem(json_path((*base, "tool")), f"unknown tool {name!r}"))
    return problems


def bind_inputs(workflow: Workflow, given: Mapping[str, Any]) -> dict[str, Any]:
    """The run's input values: ``given`` (strings from a command line are converted to the declared
    type) plus defaults. A missing or undeclared input, or a value of the wrong type, is an
    :class:`InputsError` naming ``$.inputs.NAME``."""
    problems = []
    values: dict[str, Any] = {}
    for name in given:
        if name not in workflow.inputs:
            declared = _listed(workflow.inputs) or "none"
            close = difflib.get_close_matches(name, list(workflow.inputs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(
                Problem(
                    json_path(("inputs", name)),
                    f"is not an input of this workflow (declared: {declared}){hint}",
                )
            )
    for name, spec in workflow.inputs.items():
        path = json_path(("inputs", name))
        if name in given:
            value, error = _coerce(spec.type, given[name])
            if error:
                problems.append(Problem(path, error))
            else:
                values[name] = value
        elif spec.has_default:
            values[name] = spec.default
        else:
            problems.append(Problem(path, f"required input {name!r} was not given"))
    if problems:
        raise InputsError(problems, f"inputs of {workflow.source}")
    return values


def _coerce(kind: str, value: Any) -> tuple[Any, str | None]:
    if kind == "string":
        if isinstance(value, str):
            return value, None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value), None
        return None, f"must be a string, not {type(value).__name__}"
    if kind == "boolean":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in {
            "true",
            "false",
            "1",
            "0",
            "yes",
            "no",
        }:
            return value.strip().lower() in {"true", "1", "yes"}, None
        return None, "must be true or false"
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, str):
            try:
                return int(value.strip()), None
            except ValueError:
                pass
        return None, f"must be an integer, not {_short(value)}"
    # number
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
        else:
            if number == number and number not in (float("inf"), float("-inf")):
                return number, None
    return None, f"must be a number, not {_short(value)}"


def _depth(value: Any) -> int:
    """How many objects and arrays deep ``value`` nests (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            items: Iterable[Any] = current.values()
        elif isinstance(current, list):
            items = current
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            break
        stack.extend((item, depth + 1) for item in items)
    return deepest


def _listed(names: Iterable[str]) -> str:
    """``a, b, c``; after :data:`_LISTED` names, ``... (N in all)``."""
    names = list(names)
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown}, ... ({len(names)} in all)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


class _TooManyProblems(Exception):
    """:data:`MAX_PROBLEMS` problems were found: the checks stop."""


class _Builder:
    def __init__(self, document: Mapping[str, Any], source: str) -> None:
        self.doc = document
        self.source = source
        self.problems: list[Problem] = []

    def fail(self, parts: Iterable[str | int], message: str) -> None:
        self.problem(Problem(json_path(parts), message))

    def problem(self, problem: Problem) -> None:
        self.problems.append(problem)
        if len(self.problems) >= MAX_PROBLEMS:
            raise _TooManyProblems

    # ---------------------------------------------------------------------------------------
    def build(self) -> Workflow | None:
        inputs = self._inputs()
        blocks: dict[str, Block] = {}
        for block_id, raw in self.doc["blocks"].items():
            block = self._block(block_id, raw, inputs)
            if block is not None:
                blocks[block_id] = block
        edges = self._edges(self.doc.get("edges", []), self.doc["blocks"])
        if self.problems:
            return None
        incoming: dict[str, list[Edge]] = {b: [] for b in blocks}
        outgoing: dict[str, list[Edge]] = {b: [] for b in blocks}
        for edge in edges:
            incoming[edge.target].append(edge)
            outgoing[edge.source].append(edge)
        order = self._order(blocks, edges, outgoing)
        if order is None:
            return None
        workflow = Workflow(
            name=self.doc["name"],
            version=self.doc["version"],
            description=self.doc.get("description", ""),
            inputs=MappingProxyType(inputs),
            blocks=MappingProxyType(blocks),
            edges=tuple(edges),
            source=self.source,
            incoming=MappingProxyType({k: tuple(v) for k, v in incoming.items()}),
            outgoing=MappingProxyType({k: tuple(v) for k, v in outgoing.items()}),
            order=order,
        )
        self._references(workflow)
        return None if self.problems else workflow

    # inputs ----------------------------------------------------------------------------------
    def _inputs(self) -> dict[str, InputSpec]:
        specs = {}
        for name, raw in (self.doc.get("inputs") or {}).items():
            kind = raw.get("type", "string")
            has_default = "default" in raw
            if has_default and not _type_fits(kind, raw["default"]):
                self.fail(("inputs", name, "default"), f"must be of the input's type, {kind}")
            specs[name] = InputSpec(
                name=name,
                type=kind,
                description=raw.get("description", ""),
                default=raw.get("default"),
                has_default=has_default,
            )
        return specs

    # blocks ----------------------------------------------------------------------------------
    def _template(self, parts: tuple[str | int, ...], text: str) -> Template:
        try:
            return Template.parse(text)
        except TemplateSyntaxError as exc:
            self.fail(parts, str(exc))
            return Template(source=text, parts=(text,))

    def _key(self, raw: Mapping[str, Any] | None) -> KeyRef | None:
        if not raw:
            return None
        return KeyRef(label=raw["label"]) if "label" in raw else KeyRef(env=raw["env"])

    def _block(
        self, block_id: str, raw: Mapping[str, Any], inputs: Mapping[str, InputSpec]
    ) -> Block | None:
        base = ("blocks", block_id)
        kind = raw["type"]
        description = raw.get("description", "")
        if kind == "agent":
            return self._agent(block_id, raw, base, description)
        if kind == "input":
            fields = tuple(raw.get("fields", list(inputs)))
            for i, name in enumerate(fields):
                if name not in inputs:
                    close = difflib.get_close_matches(name, list(inputs), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    self.fail((*base, "fields", i), f"{name!r} is not a declared input{hint}")
            if not fields:
                self.fail(base, "an input block needs inputs: declare them under $.inputs")
            return InputBlock(id=block_id, fields=fields, description=description)
        if kind == "condition":
            operator = next(op for op in _CONDITION_OPERATORS if op in raw)
            operand = raw[operator]
            ignore_case = bool(raw.get("ignore_case", False))
            pattern = None
            if operator == "matches":
                try:
                    pattern = compile_pattern(operand, ignore_case=ignore_case)
                except PatternError as exc:
                    self.fail((*base, "matches"), str(exc))
            return ConditionBlock(
                id=block_id,
                value=self._template((*base, "value"), raw["value"]),
                operator=operator,
                operand=tuple(operand) if isinstance(operand, list) else operand,
                ignore_case=ignore_case,
                description=description,
                pattern=pattern,
            )
        if kind == "tool":
            return ToolBlock(
                id=block_id,
                tool=raw["tool"],
                query=self._template((*base, "query"), raw["query"]),
                num_results=raw.get("num_results", 5),
                search_type=raw.get("search_type", "auto"),
                include_text=bool(raw.get("include_text", True)),
                key=self._key(raw.get("key")),
                retries=raw.get("retries"),
                description=description,
            )
        if kind == "output":
            value = raw.get("value")
            return OutputBlock(
                id=block_id,
                value=self._template((*base, "value"), value) if value is not None else None,
                fields=MappingProxyType(
                    {
                        name: self._template((*base, "fields", name), text)
                        for name, text in (raw.get("fields") or {}).items()
                    }
                ),
                description=description,
            )
        raise AssertionError(f"the schema admitted block type {kind!r}")  # pragma: no cover

    def _agent(
        self, block_id: str, raw: Mapping[str, Any], base: tuple[str, ...], description: str
    ) -> AgentBlock | None:
        model = raw["model"]
        inferred = infer_provider(model)
        provider = raw.get("provider")
        if provider is None:
            if inferred is None:
                self.fail(
                    (*base, "model"),
                    f'cannot tell which provider serves {model!r}: add "provider" '
                    f"(openai, anthropic, google or mistral)",
                )
                return None
            provider = inferred
        elif inferred is not None and inferred != provider:
            self.fail(
                (*base, "provider"),
                f"{model!r} is {'an' if inferred[0] in 'aeiou' else 'a'} {inferred} model, not {provider}",
            )
        temperature = raw.get("temperature")
        limit = _TEMPERATURE_MAX.get(provider)
        if temperature is not None and limit is not None and temperature > limit:
            self.fail(
                (*base, "temperature"), f"{provider} accepts a temperature of at most {limit}"
            )
        schema = raw.get("response_schema")
        if schema is not None:
            self._response_schema((*base, "response_schema"), schema)
            if schema.get("type") != "object":
                self.fail(
                    (*base, "response_schema", "type"),
                    'must be "object": providers return structured output as a JSON object',
                )
        tools = tuple(
            AgentTool(
                type=t["type"],
                num_results=t.get("num_results", 5),
                required=bool(t.get("required", False)),
                key=self._key(t.get("key")),
            )
            for t in raw.get("tools", [])
        )
        web_search = self._web_search(base, raw, provider, model, bool(tools))
        system = raw.get("system")
        return AgentBlock(
            id=block_id,
            model=model,
            provider=provider,
            prompt=self._template((*base, "prompt"), raw["prompt"]),
            system=self._template((*base, "system"), system) if system is not None else None,
            temperature=temperature,
            max_tokens=raw.get("max_tokens"),
            response_schema=MappingProxyType(dict(schema)) if schema is not None else None,
            tools=tools,
            max_tool_rounds=raw.get("max_tool_rounds", 3),
            web_search=web_search,
            key=self._key(raw.get("key")),
            stream=bool(raw.get("stream", False)),
            retries=raw.get("retries"),
            description=description,
        )

    def _response_schema(self, where: tuple[str, ...], schema: Mapping[str, Any]) -> None:
        """A valid JSON Schema, nested at most :data:`MAX_SCHEMA_DEPTH` levels (jsonschema's
        checks recurse: 100 nested objects made a RecursionError traceback)."""
        if _depth(schema) > MAX_SCHEMA_DEPTH:
            self.fail(
                where,
                f"is nested deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays inside "
                f"one another); providers accept far less",
            )
            return
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            path = json_path((*where, *exc.absolute_path))
            self.problem(Problem(path, f"is not a valid JSON Schema: {exc.message}"))
        except RecursionError:
            self.fail(where, "is nested too deeply to be checked")

    def _web_search(
        self,
        base: tuple[str, ...],
        raw: Mapping[str, Any],
        provider: str,
        model: str,
        exa_tools: bool,
    ) -> WebSearch | None:
        """The block's ``web_search`` (``true`` or ``{"max_uses": N}``), refused where the
        provider or model has no web search of its own."""
        setting = raw.get("web_search", False)
        if setting is False:
            return None
        where = (*base, "web_search")
        refused = web_search_refusal(provider, model)
        if refused is not None:
            self.fail(where, refused)
            return None
        max_uses = setting.get("max_uses") if isinstance(setting, Mapping) else None
        if max_uses is not None and provider != "anthropic":
            self.fail(
                (*where, "max_uses"),
                f"only Anthropic limits the searches of one call; {provider} bills one "
                f"{'grounded prompt' if provider == 'google' else 'search'} per call",
            )
        if exa_tools:
            self.fail(
                where,
                "a block searches with the provider's web_search or with exa_search tools, "
                "not both",
            )
        if provider == "google" and raw.get("response_schema") is not None:
            self.fail(
                where,
                "Gemini does not ground a structured (response_schema) answer with Google Search",
            )
        if provider == "anthropic" and max_uses is None:
            max_uses = ANTHROPIC_MAX_SEARCHES
        return WebSearch(max_uses=max_uses)

    # edges -----------------------------------------------------------------------------------
    def _edges(
        self, raw_edges: list[Mapping[str, Any]], raw_blocks: Mapping[str, Any]
    ) -> list[Edge]:
        edges = []
        seen: dict[tuple[str, str], int] = {}
        names = list(raw_blocks)
        for i, raw in enumerate(raw_edges):
            base = ("edges", i)
            ok = True
            for end in ("from", "to"):
                if raw[end] not in raw_blocks:
                    close = difflib.get_close_matches(raw[end], names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    self.fail((*base, end), f"no block named {raw[end]!r}{hint}")
                    ok = False
            if not ok:
                continue
            source, target = raw["from"], raw["to"]
            if source == target:
                self.fail(base, f"block {source!r} cannot feed itself (a cycle)")
                continue
            if (source, target) in seen:
                self.fail(
                    base,
                    f"repeats the edge {source} -> {target} of $.edges[{seen[source, target]}]",
                )
                continue
            seen[source, target] = i
            source_type = raw_blocks[source]["type"]
            target_type = raw_blocks[target]["type"]
            branch = raw.get("branch")
            if source_type == "condition" and branch is None:
                self.fail(
                    (*base, "branch"),
                    f'is required on edges leaving condition block {source!r}: "true" or "false"',
                )
            if source_type != "condition" and branch is not None:
                self.fail(
                    (*base, "branch"),
                    f"only edges leaving a condition block have a branch; {source!r} is a {source_type} block",
                )
            if target_type == "input":
                self.fail(
                    (*base, "to"),
                    f"input block {target!r} starts the workflow; no edge may lead into it",
                )
            if source_type == "output":
                self.fail(
                    (*base, "from"),
                    f"output block {source!r} ends the workflow; no edge may leave it",
                )
            edges.append(
                Edge(
                    source=source,
                    target=target,
                    branch=None if branch is None else branch == "true",
                    index=i,
                )
            )
        return edges

    def _order(
        self, blocks: Mapping[str, Block], edges: list[Edge], outgoing: Mapping[str, list[Edge]]
    ) -> tuple[str, ...] | None:
        """A topological order, or ``None`` after reporting a cycle."""
        indegree = dict.fromkeys(blocks, 0)
        for edge in edges:
            indegree[edge.target] += 1
        ready = [b for b in blocks if indegree[b] == 0]
        order: list[str] = []
        while ready:
            current = ready.pop(0)
            order.append(current)
            for edge in outgoing[current]:
                indegree[edge.target] -= 1
                if indegree[edge.target] == 0:
                    ready.append(edge.target)
        if len(order) == len(blocks):
            return tuple(order)
        # report one cycle, at its last-declared edge (most often the one just added)
        remaining = {b for b in blocks if b not in order}
        cycle = _find_cycle(remaining, outgoing)
        last = max(cycle, key=lambda e: e.index)
        turn = cycle.index(last)
        ordered = [*cycle[turn + 1 :], *cycle[: turn + 1]]
        loop = " -> ".join([*(e.source for e in ordered), ordered[0].source])
        self.fail(("edges", last.index), f"closes a cycle: {loop}")
        return None

    # references ------------------------------------------------------------------------------
    def _references(self, workflow: Workflow) -> None:
        # each block's upstream set, built once from its parents' in topological order (a walk
        # per block made loading quadratic: 20,000 chained blocks took 90 s)
        upstream: dict[str, frozenset[str]] = {}
        for block_id in workflow.order:
            above: set[str] = set()
            for edge in workflow.incoming[block_id]:
                above.add(edge.source)
                above |= upstream[edge.source]
            upstream[block_id] = frozenset(above)
        for block in workflow.blocks.values():
            for where, template in block.templates:
                parts = ("blocks", block.id, *where.split("."))
                for ref in template.refs:
                    message = self._check_ref(workflow, block.id, upstream[block.id], ref)
                    if message:
                        self.fail(parts, message)

    def _check_ref(
        self, workflow: Workflow, block_id: str, upstream: frozenset[str], ref: Ref
    ) -> str | None:
        if ref.is_input:
            name = ref.path[0]
            if name not in workflow.inputs:
                declared = _listed(workflow.inputs) or "none"
                close = difflib.get_close_matches(str(name), list(workflow.inputs), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                return f"{ref} names no declared input (declared: {declared}){hint}"
            if len(ref.path) > 1:
                return f"{ref}: input {name!r} is a single value; it has no fields"
            return None
        if ref.root not in workflow.blocks:
            close = difflib.get_close_matches(ref.root, list(workflow.blocks), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{ref} names no block{hint}"
        if ref.root == block_id:
            return f"{ref}: a block cannot read its own output"
        if ref.root not in upstream:
            return (
                f"{ref}: block {ref.root!r} is not upstream of {block_id!r}; add an edge "
                f"(or a path of edges) from {ref.root!r} to {block_id!r}"
            )
        source = workflow.blocks[ref.root]
        field = ref.path[0]
        if isinstance(source, InputBlock):
            if field not in source.fields:
                return f"{ref}: input block {ref.root!r} has no field {field!r} (it has {_listed(source.fields)})"
            if len(ref.path) > 1:
                return f"{ref}: {field!r} is a single value; it has no fields"
            return None
        fields = OUTPUT_FIELDS[source.type]
        if field not in fields:
            close = difflib.get_close_matches(str(field), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{ref}: a {source.type} block has no output {field!r} (it has {_listed(fields)}){hint}"
        if len(ref.path) > 1 and not fields[str(field)]:
            return f"{ref}: {field!r} is text; it has no fields"
        if isinstance(source, AgentBlock) and field == "json":
            if source.response_schema is None:
                return f"{ref}: block {ref.root!r} has no response_schema, so it has no json output; use .content"
            if len(ref.path) > 1:
                props = source.response_schema.get("properties")
                key = ref.path[1]
                if isinstance(props, Mapping) and props and key not in props:
                    return (
                        f"{ref}: {key!r} is not a property of {ref.root!r}'s response_schema "
                        f"(it has {_listed(props)})"
                    )
        return None


def _find_cycle(nodes: set[str], outgoing: Mapping[str, list[Edge]]) -> list[Edge]:
    """One cycle among ``nodes`` (what a topological sort left over), as its edges.

    Left-over nodes are on a cycle or downstream of one; pruning those with no edge back into the
    set, until none is left to prune, keeps nodes that each have a successor in the set, so a walk
    from any of them must come back on itself.
    """
    nodes = set(nodes)
    while True:
        sinks = {n for n in nodes if not any(e.target in nodes for e in outgoing[n])}
        if not sinks:
            break
        nodes -= sinks
    start = min(nodes)
    path: list[Edge] = []
    position = {start: 0}
    current = start
    while True:
        edge = next(
            e for e in sorted(outgoing[current], key=lambda e: e.target) if e.target in nodes
        )
        path.append(edge)
        if edge.target in position:
            return path[position[edge.target] :]
        position[edge.target] = len(path)
        current = edge.target
