"""Hypothesis-generated malformed workflows: each is rejected with a problem at the exact JSON path
of the value the test broke, and nothing, however malformed, produces anything but a
WorkflowError (``byok validate``: exit status 2, no traceback)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byok_plugin.cli import main
from byok_plugin.host.workflow import Workflow, WorkflowError, json_path, parse_workflow

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {
    p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "sample_workflows").glob("*.json"))
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)

#: (where, JSON type of the value) of the fields the schema types, per block type
TYPED_FIELDS = {
    "agent": {
        "model": str,
        "prompt": str,
        "system": str,
        "temperature": float,
        "max_tokens": int,
        "stream": bool,
    },
    "tool": {"query": str, "num_results": int, "include_text": bool},
    "condition": {"value": str, "ignore_case": bool},
}
ALLOWED = {
    "agent": {
        "type",
        "description",
        "model",
        "provider",
        "system",
        "prompt",
        "temperature",
        "max_tokens",
        "response_schema",
        "tools",
        "max_tool_rounds",
        "web_search",
        "key",
        "stream",
        "retries",
    },
    "tool": {
        "type",
        "description",
        "tool",
        "query",
        "num_results",
        "search_type",
        "include_text",
        "key",
        "retries",
    },
    "condition": {
        "type",
        "description",
        "value",
        "equals",
        "not_equals",
        "in",
        "contains",
        "matches",
        "ignore_case",
    },
    "input": {"type", "description", "fields"},
    "output": {"type", "description", "value", "fields"},
}
REQUIRED = {"agent": ("model", "prompt"), "tool": ("tool", "query"), "condition": ("value",)}


def wrong_for(kind: type) -> st.SearchStrategy[Any]:
    """A JSON value that is certainly not of ``kind`` (ints are numbers, bools are not)."""
    if kind is str:
        return st.integers() | st.booleans() | st.none() | st.lists(st.text(max_size=3), max_size=2)
    if kind is bool:
        return st.integers() | st.text(max_size=5) | st.none()
    if kind is int:
        return (
            st.text(max_size=5)
            | st.booleans()
            | st.none()
            | st.floats(0.1, 100).filter(lambda f: f != int(f))
        )
    return (
        st.text(max_size=5)
        | st.booleans()
        | st.none()
        | st.dictionaries(st.text(max_size=3), st.integers(), max_size=1)
    )


def outcome(document: Any) -> WorkflowError | None:
    """The WorkflowError a document raises (any other exception propagates and fails the test)."""
    try:
        parse_workflow(document, source="generated.json")
    except WorkflowError as exc:
        return exc
    return None


@st.composite
def broken_workflows(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    """A sample with one deliberate defect; returns it, the JSON path of the defect, its kind."""
    doc = copy.deepcopy(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    blocks = doc["blocks"]
    block_id = draw(st.sampled_from(sorted(blocks)))
    block = blocks[block_id]
    kind = block["type"]
    options = [
        "unknown_property",
        "unknown_type",
        "bad_reference",
        "bad_edge",
        "cycle",
        "bad_block_id",
    ]
    if kind in TYPED_FIELDS:
        options += ["wrong_type", "missing_required"]
    if kind == "agent":
        options += ["out_of_range"]
    defect = draw(st.sampled_from(options))
    base = ("blocks", block_id)

    if defect == "wrong_type":
        name, typ = draw(st.sampled_from(sorted(TYPED_FIELDS[kind].items())))
        block[name] = draw(wrong_for(typ))
        return doc, json_path((*base, name)), defect
    if defect == "missing_required":
        name = draw(st.sampled_from(REQUIRED[kind]))
        block.pop(name)
        return doc, json_path((*base, name)), defect
    if defect == "out_of_range":
        name, value = draw(
            st.sampled_from(["temperature", "max_tokens"]).flatmap(
                lambda n: st.tuples(
                    st.just(n),
                    (st.floats(2.01, 1e6) | st.floats(-1e6, -0.01))
                    if n == "temperature"
                    else (st.integers(max_value=0) | st.integers(min_value=200_001)),
                )
            )
        )
        block[name] = value
        return doc, json_path((*base, name)), defect
    if defect == "unknown_property":
        name = draw(identifiers.filter(lambda n: n not in ALLOWED[kind]))
        block[name] = draw(json_values)
        return doc, json_path((*base, name)), defect
    if defect == "unknown_type":
        block["type"] = draw(st.text(min_size=1, max_size=12).filter(lambda t: t not in ALLOWED))
        return doc, json_path((*base, "type")), defect
    if defect == "bad_block_id":
        bad = draw(
            st.text(min_size=1, max_size=10).filter(
                lambda t: not t[0].isascii() or not t[0].isalpha() or " " in t
            )
        )
        blocks[bad] = {"type": "output", "value": "x"}
        return doc, json_path(("blocks", bad)), defect
    if defect == "bad_reference":
        # a reference to a block that does not exist, in one of the block's template fields
        agents = [b for b, v in blocks.items() if v["type"] == "agent"]
        target = draw(st.sampled_from(agents))
        missing = draw(identifiers.filter(lambda n: n not in blocks and n != "inputs"))
        blocks[target]["prompt"] = blocks[target]["prompt"] + f" {{{{{missing}.content}}}}"
        return doc, json_path(("blocks", target, "prompt")), defect
    if defect == "bad_edge":
        edges = doc.setdefault("edges", [])
        missing = draw(identifiers.filter(lambda n: n not in blocks))
        end = draw(st.sampled_from(["from", "to"]))
        edge = {"from": block_id, "to": block_id, end: missing}
        edges.append(edge)
        return doc, json_path(("edges", len(edges) - 1, end)), defect
    # cycle: an edge from a block back to one of its ancestors
    workflow: Workflow = parse_workflow(copy.deepcopy(doc))
    pairs = [
        (down, up)
        for down in workflow.order
        for up in sorted(workflow.upstream(down))
        if workflow.blocks[down].type != "output" and workflow.blocks[up].type != "input"
    ]
    if not pairs:
        doc["blocks"]["loop_a"] = {"type": "agent", "model": "gpt-4o-mini", "prompt": "a"}
        doc["blocks"]["loop_b"] = {"type": "agent", "model": "gpt-4o-mini", "prompt": "b"}
        doc.setdefault("edges", []).append({"from": "loop_a", "to": "loop_b"})
        pairs = [("loop_b", "loop_a")]
    down, up = draw(st.sampled_from(pairs))
    edge: dict[str, str] = {"from": down, "to": up}
    if workflow.blocks.get(down) is not None and workflow.blocks[down].type == "condition":
        edge["branch"] = "false"
    doc.setdefault("edges", []).append(edge)
    return doc, json_path(("edges", len(doc["edges"]) - 1)), defect


@settings(max_examples=300, deadline=None)
@given(broken_workflows())
def test_a_generated_defect_is_reported_at_its_exact_path(
    case: tuple[dict[str, Any], str, str],
) -> None:
    doc, path, defect = case
    error = outcome(doc)
    assert error is not None, f"{defect} at {path} was accepted"
    assert path in [p.path for p in error.problems], (
        defect,
        path,
        [str(p) for p in error.problems],
    )


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_a_workflow_or_a_workflow_error(document: Any) -> None:
    error = outcome(document)
    if error is not None:
        assert error.problems
        assert all(p.path.startswith("$") for p in error.problems)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_a_workflow_or_a_workflow_error(raw: bytes | str) -> None:
    error = outcome(raw)
    if error is not None:
        assert error.problems


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=broken_workflows())
def test_byok_validate_exits_2_on_generated_defects(
    case: tuple[dict[str, Any], str, str], isolated_home: Path
) -> None:
    doc, path, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "generated.json"
        target.write_text(json.dumps(doc, allow_nan=False))
        result = CliRunner().invoke(
            main, ["validate", str(target)], env={"BYOK_HOME": str(isolated_home)}
        )
    assert result.exit_code == 2, result.output
    assert f"{path}: " in result.output
    assert "Traceback" not in result.output
