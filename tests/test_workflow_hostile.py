"""Hostile workflow files: what a security review reproduced against the workflow loader.

- a workflow ``name`` (the ledger's workflow id, shown in terminals) with control characters, line
  breaks or bidi overrides; a NUL makes a ledger row PostgreSQL cannot store;
- schema patterns written ``^...$`` that Python's ``re.search`` let through with a final ``\\n``;
- many blocks (the graph checks must stay linear), a bound on their number;
- a deeply nested ``response_schema`` (a RecursionError traceback in ``byok validate``);
- a template that renders far more text than it holds (``{{start.t}}`` two thousand times).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.host.workflow import (
    Ref,
    RenderError,
    Template,
    WorkflowError,
    json_path,
    load_workflow,
    parse_workflow,
    workflow_schema,
)
from byok_plugin.host.workflow.build import MAX_PROBLEMS, MAX_SCHEMA_DEPTH
from byok_plugin.host.workflow.document import (
    MAX_BLOCKS,
    MAX_EDGES,
    MAX_INPUTS,
    MAX_WORKFLOW_BYTES,
)
from byok_plugin.host.workflow.templates import MAX_RENDERED_CHARS

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = json.loads((ROOT / "sample_workflows" / "support-ticket-triage.json").read_text())


def mutated(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(TRIAGE)
    change(doc)
    return doc


def problems_of(document: Any) -> list[tuple[str, str]]:
    with pytest.raises(WorkflowError) as info:
        parse_workflow(document, source="wf.json")
    assert info.value.problems, "a WorkflowError must name at least one problem"
    return [(p.path, p.message) for p in info.value.problems]


# --- the workflow name ------------------------------------------------------------------------

REFUSED_IN_NAMES = {
    "NUL": "\x00",
    "ESC": "\x1b",
    "BEL": "\x07",
    "newline": "\n",
    "carriage return": "\r",
    "tab": "\t",
    "DEL": "\x7f",
    "C1 NEL": "\x85",
    "C1 CSI": "\x9b",
    "line separator": "\u2028",
    "paragraph separator": "\u2029",
    "right-to-left override": "\u202e",
    "left-to-right embedding": "\u202a",
    "first strong isolate": "\u2068",
    "pop directional isolate": "\u2069",
    "lone surrogate": "\ud800",
}


@pytest.mark.parametrize("char", REFUSED_IN_NAMES.values(), ids=REFUSED_IN_NAMES.keys())
@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_workflow_name_with_a_control_character_is_refused_at_its_path(
    char: str, where: str
) -> None:
    name = {"start": char + "triage", "middle": "tri" + char + "age", "end": "triage" + char}[where]
    found = problems_of(mutated(lambda d: d.update(name=name)))
    assert [p for p, _ in found] == ["$.name"], found
    (message,) = [m for _, m in found]
    assert "control characters" in message
    assert char not in message  # quoted escaped, never raw


def test_the_reported_escape_sequence_name_is_refused_by_byok_validate(tmp_path: Path) -> None:
    name = "x\u001b]0;PWNED\u0007\u001b[2J\u001b[31mFAKE: all charges refunded\u001b[0m"
    target = tmp_path / "wf.json"
    target.write_text(json.dumps(mutated(lambda d: d.update(name=name))))
    result = CliRunner().invoke(main, ["validate", str(target)])
    assert result.exit_code == 2, result.output
    assert "$.name: " in result.output
    assert "\x1b" not in result.output
    assert "\\x1b" in result.output  # the value is quoted with its escapes


@pytest.mark.parametrize("char", REFUSED_IN_NAMES.values(), ids=REFUSED_IN_NAMES.keys())
def test_a_model_name_with_a_control_character_is_refused_at_its_path(char: str) -> None:
    # gpt-4o-mini + NUL still looks like an OpenAI model; the ledger could not store it
    found = problems_of(
        mutated(lambda d: d["blocks"]["classify"].update(model=f"gpt-4o-mini{char}"))
    )
    assert found == [
        (
            "$.blocks.classify.model",
            f"{f'gpt-4o-mini{char}'!r} has the wrong form: a model name is text without control "
            "characters, line breaks or bidirectional-text controls (it is recorded in the ledger "
            "and shown in terminals)",
        )
    ]


@pytest.mark.parametrize(
    "name", ["triage", "support ticket triage", "Tri-age (v2) · für Kunden", "分类 🎫", "a"]
)
def test_a_workflow_name_of_printable_text_is_accepted(name: str) -> None:
    assert parse_workflow(mutated(lambda d: d.update(name=name))).name == name


# --- patterns are anchored at the end of the text -----------------------------------------------


def _label(d: dict[str, Any], value: str) -> None:
    d["blocks"]["classify"]["key"] = {"label": value}


def _env(d: dict[str, Any], value: str) -> None:
    d["blocks"]["classify"]["key"] = {"env": value}


def _block_id(d: dict[str, Any], value: str) -> None:
    d["blocks"][value] = d["blocks"].pop("result")
    for edge in d["edges"]:
        if edge["to"] == "result":
            edge["to"] = value


def _edge_end(d: dict[str, Any], value: str) -> None:
    d["edges"][0]["from"] = value


def _input_name(d: dict[str, Any], value: str) -> None:
    d["inputs"][value] = {"type": "string"}


def _input_field(d: dict[str, Any], value: str) -> None:
    d["blocks"]["start"]["fields"] = ["ticket", value]


def _output_field(d: dict[str, Any], value: str) -> None:
    d["blocks"]["result"] = {"type": "output", "fields": {value: "{{classify.content}}"}}


def _version(d: dict[str, Any], value: str) -> None:
    d["version"] = value


# (change, the good value, the JSON path of the bad one)
FIELDS: dict[str, tuple[Any, str, str]] = {
    "key label": (_label, "default", "$.blocks.classify.key.label"),
    "key env": (_env, "TEAM_KEY", "$.blocks.classify.key.env"),
    "block id": (_block_id, "result", '$.blocks["result\\u000a"]'),
    "edge end": (_edge_end, "start", "$.edges[0].from"),
    "input name": (_input_name, "extra", '$.inputs["extra\\u000a"]'),
    "input block field": (_input_field, "customer_tier", "$.blocks.start.fields[1]"),
    "output field": (_output_field, "reply", '$.blocks.result.fields["reply\\u000a"]'),
    "version": (_version, "1.2.0", "$.version"),
    "name": (lambda d, v: d.update(name=v), "triage", "$.name"),
}


@pytest.mark.parametrize(("change", "good", "path"), FIELDS.values(), ids=FIELDS.keys())
def test_a_final_newline_does_not_pass_a_pattern(change: Any, good: str, path: str) -> None:
    parse_workflow(mutated(lambda d: change(d, good)))  # the value itself is fine
    found = problems_of(mutated(lambda d: change(d, good + "\n")))
    assert path in [p for p, _ in found], found
    assert all("\n" not in p for p, _ in found), found


def test_a_json_path_shows_a_key_s_control_characters_escaped() -> None:
    assert json_path(("blocks", "b\n", "prompt")) == '$.blocks["b\\u000a"].prompt'
    assert json_path(("blocks", 'say "hi" \\ \u202e\x1b')) == (
        '$.blocks["say \\"hi\\" \\\\ \\u202e\\u001b"]'
    )
    assert json_path(("blocks", "classify", "prompt")) == "$.blocks.classify.prompt"
    assert json_path(("blocks", "für", 0)) == '$.blocks["für"][0]'


# --- size bounds, and checks that stay linear --------------------------------------------------


def chain(blocks: int) -> dict[str, Any]:
    """``start`` -> ``c0`` -> ... -> ``out``: ``blocks`` blocks in one chain, each condition
    reading the one before it (every reference is checked against its block's upstream set)."""
    doc: dict[str, Any] = {
        "name": "chain",
        "version": "1",
        "inputs": {"t": {"type": "string"}},
        "blocks": {"start": {"type": "input"}},
        "edges": [{"from": "start", "to": "c0"}],
    }
    conditions = blocks - 2
    for i in range(conditions):
        before = f"{{{{c{i - 1}.value}}}}" if i else ""
        doc["blocks"][f"c{i}"] = {
            "type": "condition",
            "value": "{{start.t}}" + before,
            "equals": "x",
        }
        if i:
            doc["edges"].append({"from": f"c{i - 1}", "to": f"c{i}", "branch": "true"})
    doc["blocks"]["out"] = {"type": "output", "value": "{{start.t}} {{c0.value}}"}
    doc["edges"].append({"from": f"c{conditions - 1}", "to": "out", "branch": "true"})
    return doc


def test_a_workflow_of_max_blocks_chained_loads_and_its_references_are_checked() -> None:
    workflow = parse_workflow(chain(MAX_BLOCKS))
    assert len(workflow.blocks) == MAX_BLOCKS
    assert workflow.order[0] == "start"
    assert workflow.order[-1] == "out"
    # the upstream sets are right: a reference down the chain (not up it) is refused
    doc = chain(MAX_BLOCKS)
    doc["blocks"]["c5"]["value"] = "{{c900.value}}"
    assert problems_of(doc) == [
        (
            "$.blocks.c5.value",
            "{{c900.value}}: block 'c900' is not upstream of 'c5'; add an edge (or a path of "
            "edges) from 'c900' to 'c5'",
        )
    ]


def test_one_block_more_than_the_limit_is_refused_with_the_count() -> None:
    assert problems_of(chain(MAX_BLOCKS + 1)) == [
        ("$.blocks", f"has {MAX_BLOCKS + 1} blocks; a workflow may have at most {MAX_BLOCKS}")
    ]


def test_too_many_edges_or_inputs_are_refused_with_the_count() -> None:
    doc = chain(10)
    doc["edges"] = doc["edges"] * (MAX_EDGES // len(doc["edges"]) + 1)
    doc["inputs"] = {f"i{n}": {"type": "string"} for n in range(MAX_INPUTS + 1)}
    found = problems_of(doc)
    assert found == [
        ("$.edges", f"has {len(doc['edges'])} edges; a workflow may have at most {MAX_EDGES}"),
        ("$.inputs", f"has {MAX_INPUTS + 1} inputs; a workflow may have at most {MAX_INPUTS}"),
    ]


def test_the_schema_states_the_same_limits() -> None:
    schema = workflow_schema()["properties"]
    assert schema["blocks"]["maxProperties"] == MAX_BLOCKS
    assert schema["edges"]["maxItems"] == MAX_EDGES
    assert schema["inputs"]["maxProperties"] == MAX_INPUTS


def test_the_checks_stop_after_max_problems_and_say_so() -> None:
    # every block holds bad references: each would cost a "did you mean" search among all ids
    doc = chain(MAX_BLOCKS)
    for i in range(MAX_BLOCKS - 2):
        doc["blocks"][f"c{i}"]["value"] = "".join(
            f"{{{{nothere{i}x{j}.value}}}}" for j in range(50)
        )
    found = problems_of(doc)
    assert len(found) == MAX_PROBLEMS + 1
    assert found[0] == (
        "$",
        f"more than {MAX_PROBLEMS} problems: checking stopped; fix these first",
    )
    assert all("names no block" in m for p, m in found[1:]), found[:3]


def test_a_long_list_of_names_is_cut_in_a_message() -> None:
    doc = chain(10)
    doc["inputs"] = {f"input{n}": {"type": "string"} for n in range(40)}
    doc["inputs"]["t"] = {"type": "string"}
    doc["blocks"]["out"]["value"] = "{{inputs.nothing_like_it}}"
    ((path, message),) = problems_of(doc)
    assert path == "$.blocks.out.value"
    assert "declared: input0, input1," in message
    assert "input9, ... (41 in all)" in message
    assert "input10" not in message


# --- a deeply nested response_schema ----------------------------------------------------------


def nested_schema(objects: int, innermost: Any) -> dict[str, Any]:
    """``objects`` schemas of type object, each the only property of the one before it."""
    schema: Any = innermost
    for _ in range(objects):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def _with_schema(schema: dict[str, Any]) -> dict[str, Any]:
    def change(d: dict[str, Any]) -> None:
        d["blocks"]["classify"]["response_schema"] = schema
        d["blocks"]["is_urgent"]["value"] = "{{classify.content}}"
        d["blocks"]["draft_reply"]["prompt"] = "{{start.ticket}}"
        d["blocks"]["escalate"]["prompt"] = "{{classify.content}}"
        d["blocks"]["result"]["fields"] = {"reply": "{{draft_reply.content}}"}

    return mutated(change)


def test_a_response_schema_at_the_depth_limit_is_accepted() -> None:
    # 15 objects, each 2 levels (the schema, its properties), and a string schema with examples
    schema = nested_schema(15, {"type": "string", "examples": ["a"]})
    workflow = parse_workflow(_with_schema(schema))
    assert workflow.blocks["classify"].response_schema == schema  # type: ignore[union-attr]


def test_a_response_schema_one_level_deeper_is_refused_at_its_path() -> None:
    schema = nested_schema(15, {"type": "string", "examples": [["a"]]})
    assert problems_of(_with_schema(schema)) == [
        (
            "$.blocks.classify.response_schema",
            f"is nested deeper than {MAX_SCHEMA_DEPTH} levels (objects and arrays inside one "
            "another); providers accept far less",
        )
    ]


def test_byok_validate_refuses_the_reported_deep_response_schema_without_a_traceback(
    tmp_path: Path,
) -> None:
    # 100 nested objects, 6.4 KB: jsonschema's check recursed until a RecursionError
    target = tmp_path / "deep.json"
    target.write_text(json.dumps(_with_schema(nested_schema(100, {"type": "string"}))))
    result = CliRunner().invoke(main, ["validate", str(target)])
    assert result.exit_code == 2, result.output
    assert "$.blocks.classify.response_schema: is nested deeper than" in result.output
    assert "Traceback" not in result.output
    assert "RecursionError" not in result.output


# --- templates that render far more than they hold ---------------------------------------------


def test_a_template_renders_up_to_the_limit_and_no_further() -> None:
    template = Template.parse("<{{inputs.t}}|{{inputs.t}}>")
    values = {"t": "x" * 4}
    assert template.render(lambda ref: values[str(ref.path[0])], limit=11) == "<xxxx|xxxx>"
    with pytest.raises(RenderError) as info:
        template.render(lambda ref: values[str(ref.path[0])], limit=10)
    message = str(info.value)
    assert "longer than 10 characters" in message
    assert "reached in its own text, part 5 of 5" in message  # the closing ">" crossed it
    with pytest.raises(RenderError, match=r"reached at \{\{inputs\.t\}\}, part 4 of 5"):
        template.render(lambda ref: values[str(ref.path[0])], limit=8)


def test_the_limit_is_checked_before_the_long_text_is_built() -> None:
    template = Template.parse("{{inputs.t}}" * 2000)
    looked_up = []

    def lookup(ref: Ref) -> str:
        looked_up.append(ref)
        return "y" * 100_000

    with pytest.raises(RenderError, match=f"longer than {MAX_RENDERED_CHARS:,} characters"):
        template.render(lookup)
    # it stopped at the part that crossed the limit: the 168th of 2,000 (16 Mi / 100,000)
    assert len(looked_up) == MAX_RENDERED_CHARS // 100_000 + 1


def test_text_of_exactly_the_limit_renders() -> None:
    half = "z" * (MAX_RENDERED_CHARS // 2)
    text = Template.parse("{{inputs.t}}{{inputs.t}}").render(lambda ref: half)
    assert len(text) == MAX_RENDERED_CHARS


def _amplifier(block: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "amplify",
        "version": "1",
        "inputs": {"t": {"type": "string"}},
        "blocks": {
            "start": {"type": "input"},
            "a": block,
            "out": {"type": "output", "value": "done"},
        },
        "edges": [
            {"from": "start", "to": "a"},
            {
                "from": "a",
                "to": "out",
                **({"branch": "true"} if block["type"] == "condition" else {}),
            },
        ],
    }


@pytest.mark.parametrize(
    "block",
    [
        {"type": "agent", "model": "gpt-4o-mini", "prompt": "{{start.t}}" * 2000},
        {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi", "system": "{{start.t}}" * 2000},
        {"type": "condition", "value": "{{start.t}}" * 2000, "equals": "x"},
        {"type": "tool", "tool": "exa_search", "query": "{{start.t}}" * 2000},
    ],
    ids=["agent prompt", "agent system", "condition value", "tool query"],
)
def test_byok_run_fails_the_amplifying_block_naming_it_and_the_limit(
    block: dict[str, Any], tmp_path: Path
) -> None:
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(_amplifier(block)))
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"t": "y" * 100_000}))
    environ = {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"}
    result = CliRunner().invoke(
        main, ["run", str(flow), "-w", "acme", "--inputs", str(inputs), "--json"], env=environ
    )
    assert result.exit_code == 1, result.output
    run = json.loads(result.stdout)
    assert run["status"] == "failed"
    (failed,) = [b for b in run["blocks"] if b["status"] == "failed"]
    assert failed["block"] == "a"
    assert failed["calls"] == []  # nothing was sent
    assert f"longer than {MAX_RENDERED_CHARS:,} characters" in failed["error"]
    assert run["error"].startswith("block 'a' failed: the rendered text would be longer than")


# --- the file itself ------------------------------------------------------------------------------


def test_a_workflow_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    target = tmp_path / "big.json"
    text = json.dumps(TRIAGE)
    target.write_text(text + " " * (MAX_WORKFLOW_BYTES + 1 - len(text)))
    with pytest.raises(WorkflowError) as info:
        load_workflow(target)
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("$", f"is larger than {MAX_WORKFLOW_BYTES // (1024 * 1024)} MB")
    ]
    # one byte less is read (and is the sample)
    target.write_text(text + " " * (MAX_WORKFLOW_BYTES - len(text)))
    assert load_workflow(target).name == TRIAGE["name"]
    with pytest.raises(WorkflowError, match="is larger than 16 MB"):
        parse_workflow(text + " " * MAX_WORKFLOW_BYTES)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_byok_validate_refuses_a_pipe_or_a_device_without_reading_it(
    kind: str, tmp_path: Path
) -> None:
    if kind == "fifo":
        target = tmp_path / "flow.json"
        os.mkfifo(target)  # opening it to read would wait for a writer for ever
    else:
        target = Path("/dev/zero")  # reading it would never end
    result = CliRunner().invoke(main, ["validate", str(target)])
    assert result.exit_code == 2, result.output
    assert "$: is not a regular file" in result.output
