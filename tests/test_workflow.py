"""The JSON workflow format: schema, graph and reference checks, each problem at its JSON path."""

from __future__ import annotations

import copy
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from byok_plugin.cli import main
from byok_plugin.host.workflow import (
    AgentBlock,
    ConditionBlock,
    InputsError,
    Template,
    TemplateSyntaxError,
    WorkflowError,
    bind_inputs,
    check_models,
    infer_provider,
    load_workflow,
    parse_workflow,
    workflow_schema,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_workflows").glob("*.json"))
TRIAGE = json.loads((ROOT / "sample_workflows" / "support-ticket-triage.json").read_text())


def mutated(change) -> dict[str, Any]:
    doc = copy.deepcopy(TRIAGE)
    change(doc)
    return doc


def problems_of(document: Any) -> list[tuple[str, str]]:
    with pytest.raises(WorkflowError) as info:
        parse_workflow(document, source="wf.json")
    assert info.value.problems, "a WorkflowError must name at least one problem"
    return [(p.path, p.message) for p in info.value.problems]


# --- the shipped schema and samples ---------------------------------------------------------------


def test_the_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = workflow_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_there_are_at_least_four_different_samples() -> None:
    assert len(SAMPLES) >= 4
    workflows = [load_workflow(p) for p in SAMPLES]
    assert len({w.name for w in workflows}) == len(workflows)
    kinds = {b.type for w in workflows for b in w.blocks.values()}
    assert kinds == {"agent", "input", "condition", "tool", "output"}
    assert any(b.key is not None for w in workflows for b in w.agent_blocks), "no block-level key"
    providers = {b.provider for w in workflows for b in w.agent_blocks}
    assert providers == {"openai", "anthropic", "google", "mistral"}


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_every_sample_is_valid_and_its_models_are_known(path: Path) -> None:
    workflow = load_workflow(path)
    assert workflow.order
    assert set(workflow.order) == set(workflow.blocks)
    # the schema in the file's "$schema" is the shipped one
    schema_ref = json.loads(path.read_text())["$schema"]
    assert (
        path.parent / schema_ref
    ).resolve() == ROOT / "byok_plugin/host/schema/workflow.schema.json"
    from byok_plugin import App, Settings, plugin_manager_for

    pm = plugin_manager_for(App(Settings.from_environ()))
    assert check_models(workflow, lambda p, m: pm.hook.byok_is_hosted(provider=p, model=m)) == []


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_byok_validate_accepts_every_sample(path: Path, isolated_home: Path) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(path)], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_the_triage_sample_is_read_as_intended() -> None:
    workflow = load_workflow(ROOT / "sample_workflows" / "support-ticket-triage.json")
    classify = workflow.blocks["classify"]
    assert isinstance(classify, AgentBlock)
    assert (classify.provider, classify.model, classify.max_tokens) == (
        "openai",
        "gpt-4o-mini",
        300,
    )
    assert classify.response_schema is not None
    condition = workflow.blocks["is_urgent"]
    assert isinstance(condition, ConditionBlock)
    assert condition.operator == "in"
    assert condition.test("HIGH")
    assert not condition.test("low")
    assert workflow.upstream("result") == {
        "start",
        "classify",
        "is_urgent",
        "draft_reply",
        "escalate",
    }
    (branch,) = workflow.outgoing["is_urgent"]
    assert branch.target == "escalate"
    assert branch.branch is True


# --- malformed workflows: each rejected with the JSON path of the offending value ----------------

KEY = "sk-proj-" + secrets.token_urlsafe(24)

MALFORMED: list[tuple[str, Any, str, str]] = [
    (
        "unknown block type",
        lambda d: d["blocks"]["classify"].update(type="agnet"),
        "$.blocks.classify.type",
        "did you mean 'agent'",
    ),
    (
        "typo in a property",
        lambda d: d["blocks"]["classify"].update(promt="x"),
        "$.blocks.classify.promt",
        "did you mean 'prompt'",
    ),
    (
        "agent without a model",
        lambda d: d["blocks"]["classify"].pop("model"),
        "$.blocks.classify.model",
        "is required",
    ),
    (
        "agent without a prompt",
        lambda d: d["blocks"]["draft_reply"].pop("prompt"),
        "$.blocks.draft_reply.prompt",
        "is required",
    ),
    (
        "empty prompt",
        lambda d: d["blocks"]["draft_reply"].update(prompt=""),
        "$.blocks.draft_reply.prompt",
        "must not be empty",
    ),
    (
        "a key written in plain text",
        lambda d: d["blocks"]["classify"].update(key=KEY),
        "$.blocks.classify.key",
        "never written in a workflow",
    ),
    (
        "a key object without a reference",
        lambda d: d["blocks"]["classify"].update(key={"value": KEY}),
        "$.blocks.classify.key",
        "needs one of: label, env",
    ),
    (
        "a key object with both references",
        lambda d: d["blocks"]["classify"].update(key={"label": "team", "env": "TEAM_KEY"}),
        "$.blocks.classify.key",
        "keep exactly one of label, env",
    ),
    (
        "a label with a control character",
        lambda d: d["blocks"]["classify"].update(key={"label": "team\nx"}),
        "$.blocks.classify.key.label",
        "a stored key's label",
    ),
    (
        "a bad env variable name",
        lambda d: d["blocks"]["classify"].update(key={"env": "1-BAD"}),
        "$.blocks.classify.key.env",
        "environment variable name",
    ),
    (
        "reference to a downstream block",
        lambda d: d["blocks"]["classify"].update(prompt="{{draft_reply.content}}"),
        "$.blocks.classify.prompt",
        "not upstream",
    ),
    (
        "reference to a sibling branch",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{escalate.content}}"),
        "$.blocks.draft_reply.prompt",
        "not upstream",
    ),
    (
        "reference to its own output",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{draft_reply.content}}"),
        "$.blocks.draft_reply.prompt",
        "its own output",
    ),
    (
        "reference to no block",
        lambda d: d["blocks"]["draft_reply"].update(system="{{clasify.content}}"),
        "$.blocks.draft_reply.system",
        "did you mean 'classify'",
    ),
    (
        "undeclared input",
        lambda d: d["blocks"]["classify"].update(prompt="{{inputs.tikcet}}"),
        "$.blocks.classify.prompt",
        "did you mean 'ticket'",
    ),
    (
        "unknown output field",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{classify.contnet}}"),
        "$.blocks.draft_reply.prompt",
        "did you mean 'content'",
    ),
    (
        "json field not in the response schema",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{classify.json.categry}}"),
        "$.blocks.draft_reply.prompt",
        "not a property",
    ),
    (
        "json of a block without a response schema",
        lambda d: d["blocks"]["result"]["fields"].update(x="{{draft_reply.json.a}}"),
        "$.blocks.result.fields.x",
        "no response_schema",
    ),
    (
        "reference without a field",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{ classify }}"),
        "$.blocks.draft_reply.prompt",
        "names no field",
    ),
    (
        "unclosed reference",
        lambda d: d["blocks"]["draft_reply"].update(prompt="Hi {{classify.content"),
        "$.blocks.draft_reply.prompt",
        "never closed",
    ),
    (
        "garbage in a reference",
        lambda d: d["blocks"]["draft_reply"].update(prompt="{{classify.content + 1}}"),
        "$.blocks.draft_reply.prompt",
        "not a reference",
    ),
    (
        "a cycle",
        lambda d: d["edges"].append({"from": "draft_reply", "to": "classify"}),
        "$.edges[6]",
        "cycle",
    ),
    (
        "a self loop",
        lambda d: d["edges"].append({"from": "classify", "to": "classify"}),
        "$.edges[6]",
        "cannot feed itself",
    ),
    (
        "an edge from no block",
        lambda d: d["edges"].append({"from": "clasify", "to": "result"}),
        "$.edges[6].from",
        "no block named 'clasify'",
    ),
    (
        "an edge to no block",
        lambda d: d["edges"].append({"from": "classify", "to": "nowhere"}),
        "$.edges[6].to",
        "no block named",
    ),
    (
        "a repeated edge",
        lambda d: d["edges"].append({"from": "start", "to": "classify"}),
        "$.edges[6]",
        "repeats the edge",
    ),
    (
        "a condition edge without a branch",
        lambda d: d["edges"][3].pop("branch"),
        "$.edges[3].branch",
        "is required",
    ),
    (
        "a branch on a plain edge",
        lambda d: d["edges"][0].update(branch="true"),
        "$.edges[0].branch",
        "only edges leaving a condition",
    ),
    (
        "a branch that is not true/false",
        lambda d: d["edges"][3].update(branch="yes"),
        "$.edges[3].branch",
        "must be one of",
    ),
    (
        "an edge into an input block",
        lambda d: d["edges"].append({"from": "classify", "to": "start"}),
        "$.edges[6].to",
        "no edge may lead into it",
    ),
    (
        "an edge out of an output block",
        lambda d: d["edges"].append({"from": "result", "to": "escalate"}),
        "$.edges[6].from",
        "no edge may leave it",
    ),
    (
        "unknown provider for a model",
        lambda d: d["blocks"]["draft_reply"].update(model="llama-3-70b"),
        "$.blocks.draft_reply.model",
        "cannot tell which provider",
    ),
    (
        "provider contradicting the model",
        lambda d: d["blocks"]["draft_reply"].update(provider="openai"),
        "$.blocks.draft_reply.provider",
        "is an anthropic model, not openai",
    ),
    (
        "an unknown provider",
        lambda d: d["blocks"]["draft_reply"].update(provider="cohere"),
        "$.blocks.draft_reply.provider",
        "must be one of",
    ),
    (
        "temperature above the provider's range",
        lambda d: d["blocks"]["draft_reply"].update(temperature=1.5),
        "$.blocks.draft_reply.temperature",
        "at most 1.0",
    ),
    (
        "temperature out of range",
        lambda d: d["blocks"]["classify"].update(temperature=-1),
        "$.blocks.classify.temperature",
        "at least 0",
    ),
    (
        "temperature as text",
        lambda d: d["blocks"]["classify"].update(temperature="warm"),
        "$.blocks.classify.temperature",
        "must be a number",
    ),
    (
        "max_tokens zero",
        lambda d: d["blocks"]["classify"].update(max_tokens=0),
        "$.blocks.classify.max_tokens",
        "at least 1",
    ),
    (
        "max_tokens fractional",
        lambda d: d["blocks"]["classify"].update(max_tokens=1.5),
        "$.blocks.classify.max_tokens",
        "must be an integer",
    ),
    (
        "stream as text",
        lambda d: d["blocks"]["draft_reply"].update(stream="yes"),
        "$.blocks.draft_reply.stream",
        "true or false",
    ),
    (
        "invalid response schema",
        lambda d: d["blocks"]["classify"]["response_schema"]["properties"]["summary"].update(
            type="strng"
        ),
        "$.blocks.classify.response_schema.properties.summary.type",
        "not a valid JSON Schema",
    ),
    (
        "response schema not an object",
        lambda d: d["blocks"]["classify"].update(response_schema={"type": "array"}),
        "$.blocks.classify.response_schema.type",
        'must be "object"',
    ),
    (
        "condition with two tests",
        lambda d: d["blocks"]["is_urgent"].update(equals="high"),
        "$.blocks.is_urgent",
        "keep exactly one",
    ),
    (
        "condition with no test",
        lambda d: d["blocks"]["is_urgent"].pop("in"),
        "$.blocks.is_urgent",
        "needs one of",
    ),
    (
        "condition with a bad regex",
        lambda d: (
            d["blocks"]["is_urgent"].pop("in"),
            d["blocks"]["is_urgent"].update(matches="(unclosed"),
        ),
        "$.blocks.is_urgent.matches",
        "regular expression",
    ),
    (
        "input block exposing an undeclared input",
        lambda d: d["blocks"]["start"].update(fields=["ticket", "tier"]),
        "$.blocks.start.fields[1]",
        "not a declared input",
    ),
    (
        "input default of the wrong type",
        lambda d: d["inputs"]["customer_tier"].update(default=3),
        "$.inputs.customer_tier.default",
        "input's type",
    ),
    (
        "input of an unknown type",
        lambda d: d["inputs"]["ticket"].update(type="text"),
        "$.inputs.ticket.type",
        "must be one of",
    ),
    (
        "a block id with a space",
        lambda d: d["blocks"].update({"bad id": {"type": "output", "value": "x"}}),
        '$.blocks["bad id"]',
        "not a valid block id",
    ),
    (
        "a block named inputs",
        lambda d: d["blocks"].update({"inputs": {"type": "output", "value": "x"}}),
        "$.blocks.inputs",
        "reserved",
    ),
    ("no blocks", lambda d: d.update(blocks={}), "$.blocks", "at least 1"),
    ("no name", lambda d: d.pop("name"), "$.name", "is required"),
    (
        "a version that is not one",
        lambda d: d.update(version="latest"),
        "$.version",
        "a version such as",
    ),
    ("a version as a number", lambda d: d.update(version=1), "$.version", "must be a string"),
    (
        "an unknown top-level property",
        lambda d: d.update(steps=[]),
        "$.steps",
        "not a known property",
    ),
    (
        "edges as an object",
        lambda d: d.update(edges={"start": "classify"}),
        "$.edges",
        "must be an array",
    ),
    (
        "an output block with neither value nor fields",
        lambda d: d["blocks"]["result"].pop("fields"),
        "$.blocks.result",
        "needs one of",
    ),
    (
        "a tool block with an unknown tool",
        lambda d: d["blocks"].update(search={"type": "tool", "tool": "google", "query": "x"}),
        "$.blocks.search.tool",
        "must be one of",
    ),
    (
        "an agent tool that does not exist",
        lambda d: d["blocks"]["classify"].update(tools=[{"type": "browser"}]),
        "$.blocks.classify.tools[0].type",
        "must be one of",
    ),
]


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_a_malformed_workflow_is_rejected_at_its_json_path(
    change, path: str, fragment: str
) -> None:
    found = problems_of(mutated(change))
    assert any(p == path and fragment in m for p, m in found), found


def test_there_are_more_than_twenty_malformed_cases() -> None:
    assert len(MALFORMED) >= 20


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_byok_validate_exits_2_with_the_path_and_no_traceback(
    change, path: str, fragment: str, tmp_path: Path, isolated_home: Path
) -> None:
    target = tmp_path / "wf.json"
    target.write_text(json.dumps(mutated(change)))
    result = CliRunner().invoke(
        main, ["validate", str(target)], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert f"{path}: " in result.output
    assert str(target) in result.output
    assert "Traceback" not in result.output
    assert KEY not in result.output


def test_byok_validate_json_lists_the_problems(tmp_path: Path, isolated_home: Path) -> None:
    target = tmp_path / "wf.json"
    target.write_text(
        json.dumps(mutated(lambda d: d["blocks"]["classify"].update(temperature=9, promt=1)))
    )
    result = CliRunner().invoke(
        main, ["validate", "--json", str(target)], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 2
    report = json.loads(result.output)
    assert report["valid"] is False
    assert {p["path"] for p in report["problems"]} == {
        "$.blocks.classify.temperature",
        "$.blocks.classify.promt",
    }


def test_a_key_pasted_in_the_workflow_is_never_echoed() -> None:
    for value in (KEY, {"env": "X", "value": KEY}, [KEY], {"env": KEY}):
        found = problems_of(mutated(lambda d, v=value: d["blocks"]["classify"].update(key=v)))
        assert all(KEY not in m and KEY not in p for p, m in found), found


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ('{"name": "x",', "$", "not valid JSON: line 1"),
        ("", "$", "not valid JSON"),
        ("[1, 2]", "$", "must be an object"),
        ('{"name": "a", "name": "b", "version": "1", "blocks": {}}', "$.name", "more than once"),
        (
            '{"name": "a", "version": "1", "blocks": {"x": {"type": "output", "value": "1"},'
            ' "x": {"type": "output", "value": "2"}}}',
            "$.blocks.x",
            "more than once",
        ),
        (
            '{"name": "a", "version": "1", "blocks": {"c": {"type": "agent", "model": "gpt-4o",'
            ' "prompt": "hi", "temperature": NaN}}}',
            "$.blocks.c.temperature",
            "NaN is not a JSON number",
        ),
        ('{"name": "a", "version": "1", "blocks": {}, "x": [-Infinity]}', "$.x[0]", "-Infinity"),
    ],
)
def test_unreadable_json_is_a_workflow_error(text: str, path: str, fragment: str) -> None:
    assert any(p == path and fragment in m for p, m in problems_of(text))


def test_a_missing_file_exits_2(tmp_path: Path, isolated_home: Path) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(tmp_path / "nope.json")], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 2
    assert "does not exist" in result.output


def test_an_unknown_model_is_rejected_when_no_plugin_knows_it() -> None:
    workflow = parse_workflow(
        mutated(lambda d: d["blocks"]["classify"].update(model="gpt-4o-minii"))
    )
    known = {
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-haiku-4-5"),
        ("anthropic", "claude-sonnet-4-5"),
    }
    problems = check_models(workflow, lambda p, m: True if (p, m) in known else None)
    assert [(p.path, "unknown openai model 'gpt-4o-minii'" in p.message) for p in problems] == [
        ("$.blocks.classify.model", True)
    ]
    # "known but not hosted" (False) is known: BYOK workspaces may still run it
    assert check_models(workflow, lambda p, m: False) == []


def test_several_problems_are_all_reported_sorted_by_path() -> None:
    found = problems_of(
        mutated(
            lambda d: (
                d["blocks"]["classify"].update(temperature=5),
                d["blocks"]["draft_reply"].update(max_tokens=0),
                d.update(version="x"),
            )
        )
    )
    assert [p for p, _ in found] == [
        "$.blocks.classify.temperature",
        "$.blocks.draft_reply.max_tokens",
        "$.version",
    ]


# --- templates, providers and inputs -----------------------------------------------------------


def test_templates_parse_references_and_render_values() -> None:
    t = Template.parse(
        "Ticket {{ inputs.ticket }} is {{classify.json.category}}; first: {{s.results[0].url}}"
    )
    assert [(r.root, r.path) for r in t.refs] == [
        ("inputs", ("ticket",)),
        ("classify", ("json", "category")),
        ("s", ("results", 0, "url")),
    ]
    values = {"inputs": "T-1", "classify": "billing", "s": "https://x"}
    assert t.render(lambda r: values[r.root]) == "Ticket T-1 is billing; first: https://x"
    assert Template.parse("{{a.json}}").evaluate(lambda r: {"k": [1, 2]}) == {"k": [1, 2]}
    assert Template.parse("x {{a.json}}").evaluate(lambda r: {"k": True}) == 'x {"k": true}'
    assert Template.parse("no refs { here }").refs == ()
    with pytest.raises(TemplateSyntaxError):
        Template.parse("{{}}")


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o-mini", "openai"),
        ("o3", "openai"),
        ("o4-mini", "openai"),
        ("ft:gpt-4o-mini:acme::abc", "openai"),
        ("claude-sonnet-4-5", "anthropic"),
        ("gemini-2.5-flash", "google"),
        ("mistral-small-latest", "mistral"),
        ("codestral-latest", "mistral"),
        ("magistral-medium-latest", "mistral"),
        ("ministral-8b-latest", "mistral"),
        ("llama-3-70b", None),
        ("omni", None),
    ],
)
def test_the_provider_is_inferred_from_the_model_name(model: str, provider: str | None) -> None:
    assert infer_provider(model) == provider


def test_inputs_are_bound_converted_and_checked() -> None:
    doc = mutated(
        lambda d: d["inputs"].update(
            count={"type": "integer", "default": 3},
            ratio={"type": "number"},
            loud={"type": "boolean"},
        )
    )
    workflow = parse_workflow(doc)
    values = bind_inputs(workflow, {"ticket": "hi", "ratio": "0.5", "loud": "true"})
    assert values == {
        "ticket": "hi",
        "customer_tier": "pro",
        "count": 3,
        "ratio": 0.5,
        "loud": True,
    }
    with pytest.raises(InputsError) as info:
        bind_inputs(workflow, {"tikcet": "hi", "ratio": "lots", "loud": "maybe"})
    found = {(p.path, p.message.split(" (")[0].split(";")[0]) for p in info.value.problems}
    assert found == {
        ("$.inputs.tikcet", "is not an input of this workflow"),
        ("$.inputs.ticket", "required input 'ticket' was not given"),
        ("$.inputs.ratio", "must be a number, not 'lots'"),
        ("$.inputs.loud", "must be true or false"),
    }


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-minii", "unknown openai model 'gpt-4o-minii'"),
        ("claude-sonnet-9", "unknown anthropic model 'claude-sonnet-9'"),
    ],
)
def test_byok_validate_rejects_a_model_the_catalog_does_not_know(
    model: str, expected: str, tmp_path: Path, isolated_home: Path
) -> None:
    target = tmp_path / "wf.json"
    target.write_text(json.dumps(mutated(lambda d: d["blocks"]["classify"].update(model=model))))
    result = CliRunner().invoke(
        main, ["validate", str(target)], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 2, result.output
    assert f"$.blocks.classify.model: {expected}" in result.output


def test_a_model_the_catalog_knows_but_does_not_host_is_valid(
    tmp_path: Path, isolated_home: Path
) -> None:
    # o3 is in the catalog but not hosted: a BYOK workspace may run it
    target = tmp_path / "wf.json"
    target.write_text(json.dumps(mutated(lambda d: d["blocks"]["classify"].update(model="o3"))))
    result = CliRunner().invoke(
        main, ["validate", str(target)], env={"BYOK_HOME": str(isolated_home)}
    )
    assert result.exit_code == 0, result.output
