"""``matches`` conditions run in linear time (RE2), and a workflow's patterns are bounded.

With Python's backtracking ``re``, ``^(a+)+$`` on ``"a" * 26 + "b"`` took 3.5 s on the event loop
and stalled every run beside it; on a few hundred characters it never ends. These tests run such
patterns on 100,000 characters through ``byok run`` and the condition itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.host.workflow import ConditionBlock, WorkflowError, parse_workflow
from byok_plugin.host.workflow.patterns import MAX_PATTERN_LENGTH

EVIL = r"^(a+)+$"
#: a guard against a hang, not a measurement: RE2 answers in milliseconds, backtracking never
HANG_GUARD_SECONDS = 120


def _finishes(work: Callable[[], Any]) -> Any:
    """``work()``'s result; fails the test (instead of hanging it) if it does not return."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_SECONDS)
    assert not thread.is_alive(), "the condition did not finish: catastrophic backtracking"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _document(pattern: str, *, ignore_case: bool = False) -> dict[str, Any]:
    check: dict[str, Any] = {"type": "condition", "value": "{{inputs.text}}", "matches": pattern}
    if ignore_case:
        check["ignore_case"] = True
    return {
        "name": "pattern-check",
        "version": "1.0.0",
        "inputs": {"text": {"type": "string"}},
        "blocks": {
            "check": check,
            "yes": {"type": "output", "value": "matched"},
            "no": {"type": "output", "value": "no match"},
        },
        "edges": [
            {"from": "check", "to": "yes", "branch": "true"},
            {"from": "check", "to": "no", "branch": "false"},
        ],
    }


def _condition(pattern: str, *, ignore_case: bool = False) -> ConditionBlock:
    workflow = parse_workflow(_document(pattern, ignore_case=ignore_case), source="test")
    block = workflow.blocks["check"]
    assert isinstance(block, ConditionBlock)
    return block


def _problems(pattern: str) -> list[tuple[str, str]]:
    with pytest.raises(WorkflowError) as caught:
        parse_workflow(_document(pattern), source="flow.json")
    return [(p.path, p.message) for p in caught.value.problems]


def test_a_catastrophic_pattern_answers_on_a_long_text() -> None:
    condition = _condition(EVIL)
    assert _finishes(lambda: condition.test("a" * 100_000 + "b")) is False
    assert _finishes(lambda: condition.test("a" * 100_000)) is True


def test_byok_run_is_not_stalled_by_a_catastrophic_pattern(tmp_path: Path) -> None:
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(_document(EVIL)), encoding="utf-8")
    environ = {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"}
    text = "a" * 50_000 + "b"
    result = _finishes(
        lambda: CliRunner().invoke(
            main, ["run", str(flow), "-w", "acme", "-i", f"text={text}", "--json"], env=environ
        )
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)
    assert run["outputs"] == {"no": "no match"}


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a)\1", "backreference"),
        (r"(?=a)b", "look-ahead"),
        (r"(?<!a)b", "look-behind"),
        ("(unclosed", "syntax"),
        (r"\pL{1000}\pL{1000}\pL{1000}", "compiled program too large"),
    ],
)
def test_patterns_re2_cannot_run_in_linear_time_are_refused_at_load(pattern: str, why: str) -> None:
    [(path, message)] = _problems(pattern)
    assert path == "$.blocks.check.matches", why
    assert "RE2" in message
    assert "look-around" in message  # says what is not supported


def test_a_pattern_longer_than_the_limit_is_refused_with_its_length() -> None:
    assert _condition("a" * MAX_PATTERN_LENGTH).test("a" * MAX_PATTERN_LENGTH)
    [(path, message)] = _problems("a" * (MAX_PATTERN_LENGTH + 1))
    assert path == "$.blocks.check.matches"
    assert f"{MAX_PATTERN_LENGTH + 1} characters" in message
    assert f"at most {MAX_PATTERN_LENGTH}" in message
    assert "aaaa" not in message  # the pattern is not echoed


def test_byok_validate_names_the_pattern_and_exits_2(tmp_path: Path) -> None:
    flow = tmp_path / "flow.json"
    flow.write_text(json.dumps(_document(r"(\w+)\s\1")), encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(flow)], env={"BYOK_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert "$.blocks.check.matches" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("pattern", "ignore_case", "text", "expected"),
    [
        (r"\bURGENT\b", False, "this is URGENT now", True),
        (r"\bURGENT\b", False, "this is urgent now", False),
        (r"\bURGENT\b", True, "this is urgent now", True),
        (r"^\d{3}-\d{4}$", False, "555-1234", True),
        ("café", True, "CAFÉ au lait", True),
        ("中文", False, "这是中文文本", True),
        (r"x\d", False, "lone \ud800 surrogate x1", True),  # no UTF-8 form: still searched
    ],
)
def test_patterns_match_as_before(
    pattern: str, ignore_case: bool, text: str, expected: bool
) -> None:
    assert _condition(pattern, ignore_case=ignore_case).test(text) is expected
