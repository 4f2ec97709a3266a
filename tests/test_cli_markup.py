"""Hostile text through every CLI command that prints it with Rich: labels, workspace ids, models,
providers, workflow names, block ids, outputs and provider messages are shown as they are.

Rich reads a plain ``str`` as console markup: ``[/]`` raises ``MarkupError`` (a traceback),
``[link=...]`` makes a terminal hyperlink, ``[conceal]`` hides text, ``:smile:`` becomes an emoji.
Each test here fails when any of them is given to Rich as a ``str``: the text must come out
verbatim, with no traceback and no escape sequence a tag would have made.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.run import RunProgress
from byok_plugin.core.errors import InvalidInput
from byok_plugin.core.key_format import check_label, check_workspace_id
from byok_plugin.host.run_result import BlockResult, BlockStatus
from byok_plugin.host.runner import RunEvent
from byok_plugin.host.workflow import load_workflow
from byok_plugin.settings import Settings

ATTACKS = (
    "[/]",
    "[/]evil",
    "[link=https://evil.example/]support[/link]",
    "[conceal]hidden[/conceal]",
    "[bold red]alarm",
    "[@click=app.bell]x[/]",
    ":smile: :thumbs_up:",
    "\\[bold]escaped",
    "trailing backslash \\",
    "[#ff0000]red",
)

_FRAGMENTS = st.sampled_from(
    ["[", "]", "/", "\\", "link=", "https://evil.example/", "conceal", "bold", "@", "#", ":",
     "smile", "=", " ", "a", "é", "中", "😀", "[/]", "[b]", "[/b]"]
)  # fmt: skip
#: markup-like strings, and arbitrary printable text
HOSTILE = st.one_of(
    st.sampled_from(ATTACKS),
    st.lists(_FRAGMENTS, min_size=1, max_size=12).map("".join),
    st.text(
        st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
        min_size=1,
        max_size=40,
    ),
)


def _valid(check, value: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        check(value)
    except InvalidInput:
        return False
    return True


def _environ(home: Path) -> dict[str, str]:
    # wide enough that no cell is cut, so the text must come out whole
    return {
        "BYOK_HOME": str(home),
        "BYOK_DATABASE_URL": f"sqlite:///{home / 'byok.db'}",
        "COLUMNS": "1000",
    }


def _invoke(environ: dict[str, str], *args: str, terminal: bool = False) -> Result:
    env = dict(environ)
    if terminal:  # Rich writes styles and hyperlinks as it would to a terminal
        env["FORCE_COLOR"] = "1"
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def _assert_shown(result: Result, *texts: str) -> None:
    assert result.exit_code == 0, result.output
    for text in texts:
        assert text in result.output, (text, result.output)


def test_the_reported_attacks_are_shown_as_text_in_keys_list(tmp_path: Path) -> None:
    environ = _environ(tmp_path)
    result = _invoke(environ, "init")
    assert result.exit_code == 0, result.output
    for i, label in enumerate(ATTACKS):
        stored = CliRunner().invoke(
            main,
            ["keys", "set", "-w", "tenant", "-p", "mistral", "--label", label, "--no-test"],
            env=environ,
            input=f"{i:032d}",
        )
        assert stored.exit_code == 0, stored.output
    plain = _invoke(environ, "keys", "list", "-w", "tenant")
    _assert_shown(plain, *ATTACKS)
    coloured = _invoke(environ, "keys", "list", "-w", "tenant", terminal=True)
    assert coloured.exit_code == 0, coloured.output
    assert "\x1b]8;" not in coloured.output  # no hyperlink
    assert "\x1b[8m" not in coloured.output  # nothing concealed
    assert "😄" not in coloured.output
    assert "👍" not in coloured.output


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workspace=HOSTILE, label=HOSTILE)
@example(workspace="[/]evil", label="[link=https://evil.example/]support[/link]")
def test_any_label_and_workspace_id_come_out_verbatim_in_keys_list(
    tmp_path: Path, workspace: str, label: str
) -> None:
    assume(_valid(check_workspace_id, workspace) and _valid(check_label, label))
    environ = _environ(tmp_path)
    if not (tmp_path / "master.keys").exists():
        assert _invoke(environ, "init").exit_code == 0
    app = App(Settings.from_environ(environ))
    try:
        service = app.key_service(_pm(app))
        service.set_key(OPERATOR, workspace, "mistral", "A" * 32, label=label, test=False)
    finally:
        app.close()
    _assert_shown(_invoke(environ, "keys", "list", "-w", workspace), workspace, label)
    assert _invoke(environ, "keys", "list", "-w", workspace, terminal=True).exit_code == 0
    deleted = _invoke(environ, "keys", "delete", "-w", workspace, "-p", "mistral", "--label", label)
    _assert_shown(deleted, repr(label))  # click.echo: never markup; quoted like Python


def _pm(app: App):  # type: ignore[no-untyped-def]
    from byok_plugin.manager import plugin_manager_for

    return plugin_manager_for(app)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workspace=HOSTILE, model=HOSTILE)
@example(workspace="[/]", model="[conceal]gpt-4o[/conceal]")
def test_any_workspace_id_and_model_come_out_verbatim_in_usage(
    tmp_path: Path, workspace: str, model: str
) -> None:
    assume(_valid(check_workspace_id, workspace) and model.strip() == model and model)
    environ = _environ(tmp_path)
    app = App(Settings.from_environ(environ))
    try:
        app.ledger.record(
            UsageRecord(
                idempotency_key=f"markup:{workspace}:{model}",
                workspace_id=workspace,
                usage=Usage("openai", model, input_tokens=10, output_tokens=5),
                charge=Charge(amount=Decimal("0.01"), reason="platform", list_cost=Decimal("0.01")),
                source=CredentialSource.PLATFORM,
                occurred_at=datetime(2026, 11, 3, tzinfo=UTC),
            )
        )
    finally:
        app.close()
    _assert_shown(_invoke(environ, "usage", "-w", workspace), workspace, model)
    assert _invoke(environ, "usage", "-w", workspace, terminal=True).exit_code == 0


def _workflow(path: Path, name: str) -> Path:
    document = {
        "name": name,
        "version": "1.0.0",
        "inputs": {"text": {"type": "string"}},
        "blocks": {"result": {"type": "output", "fields": {"text": "{{inputs.text}}"}}},
        "edges": [],
    }
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(workspace=HOSTILE, name=HOSTILE, text=HOSTILE)
@example(workspace="[/]evil", name="[bold]flow[/]", text="[/]")
def test_any_workflow_name_workspace_id_and_output_come_out_verbatim_in_run(
    tmp_path: Path, workspace: str, name: str, text: str
) -> None:
    assume(_valid(check_workspace_id, workspace) and len(name) <= 200 and text.strip())
    flow = _workflow(tmp_path / "flow.json", name)
    environ = _environ(tmp_path)
    result = _invoke(environ, "run", str(flow), "-w", workspace, "-i", f"text={text}")
    _assert_shown(result, json.dumps(text, ensure_ascii=False))
    # the table's title wraps at the table's width: each word that fits comes out whole
    title = f"{name} for workspace {workspace!r}"
    _assert_shown(result, *(word for word in title.split() if len(word) < 40))
    coloured = _invoke(environ, "run", str(flow), "-w", workspace, "-i", "text=x", terminal=True)
    assert coloured.exit_code == 0, coloured.output
    assert "\x1b]8;" not in coloured.output
    assert "\x1b[8m" not in coloured.output


@settings(max_examples=40, deadline=None)
@given(message=HOSTILE)
@example(message="refused: [link=https://evil.example/]rotate your key here[/link] [/]")
def test_any_provider_message_is_shown_verbatim_in_the_live_display(message: str) -> None:
    workflow = load_workflow(
        Path(__file__).resolve().parents[1] / "sample_workflows" / "support-ticket-triage.json"
    )
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=1000, color_system="truecolor")
    failed = BlockResult(
        block_id="classify", type="agent", status=BlockStatus.FAILED, error=message
    )
    with RunProgress(workflow, console, live=True) as progress:
        progress(RunEvent("finished", "classify", "agent", result=failed))
    screen = buffer.getvalue()
    assert "\x1b]8;" not in screen
    plain = Console(file=io.StringIO(), width=1000)
    with plain.capture() as captured:
        plain.print(progress.render())
    assert message.strip() in captured.get()
    # piped: one plain line per event, the message as it is (no emoji codes either)
    lines = io.StringIO()
    piped = Console(file=lines, width=1000)
    with RunProgress(workflow, piped, live=False) as progress:
        progress(RunEvent("finished", "classify", "agent", result=failed))
    assert message.strip() in lines.getvalue()


def test_a_key_id_with_emoji_codes_and_markup_comes_out_verbatim_in_reconcile(
    tmp_path: Path,
) -> None:
    environ = _environ(tmp_path)
    key_id = ":smile: [bold]pool[/bold] :thumbs_up:"
    app = App(Settings.from_environ(environ))
    try:
        app.ledger.record(
            UsageRecord(
                idempotency_key="markup:reconcile",
                workspace_id="acme",
                usage=Usage("openai", "gpt-4o-mini", input_tokens=10, output_tokens=5),
                charge=Charge(amount=Decimal("0.01"), reason="platform", list_cost=Decimal("0.01")),
                source=CredentialSource.PLATFORM,
                key_id=key_id,
                occurred_at=datetime(2026, 11, 3, tzinfo=UTC),
            )
        )
    finally:
        app.close()
    result = _invoke(environ, "reconcile", "--since", "2026-11-01")
    _assert_shown(result, key_id)
    assert "😄" not in result.output
