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
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.host.workflow import WorkflowError, json_path, parse_workflow, workflow_schema
from byok_plugin.host.workflow.build import MAX_PROBLEMS, MAX_SCHEMA_DEPTH
from byok_plugin.host.workflow.document import MAX_BLOCKS, MAX_EDGES, MAX_INPUTS

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
