"""``byok validate WORKFLOW`` and ``byok run WORKFLOW``: check a JSON workflow, run it.

A bad workflow exits with status 2 and one line per problem, each naming the JSON path of the
value at fault; never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import pluggy

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.host.workflow import Workflow, WorkflowError, check_models, load_workflow

__all__ = ["WorkflowInvalid", "load_checked", "validate_command"]


class WorkflowInvalid(click.ClickException):
    """A workflow (or its inputs) that must not run: exit status 2, like a usage error."""

    exit_code = 2


def hook_model_check(pm: pluggy.PluginManager) -> Callable[[str, str], bool | None]:
    """``byok_is_hosted`` as the ``is_known`` question of :func:`check_models`."""

    def is_known(provider: str, model: str) -> bool | None:
        return pm.hook.byok_is_hosted(provider=provider, model=model)

    return is_known


def load_checked(path: Path, pm: pluggy.PluginManager) -> Workflow:
    """The workflow in ``path``, checked against the schema, its graph and the known models."""
    workflow = load_workflow(path)
    problems = check_models(workflow, hook_model_check(pm))
    if problems:
        raise WorkflowError(problems, str(path))
    return workflow


def _problems_json(exc: WorkflowError) -> str:
    return json.dumps(
        {
            "valid": False,
            "source": exc.source,
            "problems": [{"path": p.path, "message": p.message} for p in exc.problems],
        },
        indent=2,
    )


@click.command("validate")
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def validate_command(cli: CliContext, workflow: Path, as_json: bool) -> None:
    """Check WORKFLOW (a JSON file) without running it.

    Checks the JSON Schema, the graph (no cycle, references only to upstream blocks, declared
    inputs) and that every model is known. Exits 2 and names the JSON path of each problem.
    """
    try:
        checked = load_checked(workflow, cli.pm)
    except WorkflowError as exc:
        if as_json:
            click.echo(_problems_json(exc))
            raise SystemExit(2) from None
        raise WorkflowInvalid(str(exc)) from None
    agents = checked.agent_blocks
    if as_json:
        click.echo(
            json.dumps(
                {
                    "valid": True,
                    "source": str(workflow),
                    "name": checked.name,
                    "version": checked.version,
                    "blocks": len(checked.blocks),
                    "agents": [
                        {"block": a.id, "provider": a.provider, "model": a.model} for a in agents
                    ],
                },
                indent=2,
            )
        )
        return
    models = ", ".join(sorted({f"{a.provider}/{a.model}" for a in agents})) or "none"
    click.echo(
        f"{workflow}: valid: {checked.name} {checked.version}, {len(checked.blocks)} blocks, "
        f"{len(checked.inputs)} inputs; models: {models}"
    )
