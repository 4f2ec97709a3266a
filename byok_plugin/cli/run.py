"""``byok validate WORKFLOW`` and ``byok run WORKFLOW``: check a JSON workflow, run it.

A bad workflow (or bad inputs) exits with status 2 and one line per problem, each naming the JSON
path of the value at fault; never a traceback. A run whose block fails exits with status 1.

``byok run`` shows each block as it starts and finishes: a live display on a terminal, plain
lines when its error stream is piped; then a table of blocks (provider, model, key source, tokens,
charge) and the run's total, on standard output (or the whole result as JSON with ``--json``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import pluggy
from byok_hookspecs import ByokError, Charge, CredentialSource, Usage
from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import JSON_VERSION, echo_json
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.cli.text import money, plain, printable
from byok_plugin.core.errors import InvalidInput
from byok_plugin.core.key_format import check_workspace_id
from byok_plugin.host.env_keys import EnvKeyAllowance, env_key_problems
from byok_plugin.host.run_result import (
    BlockResult,
    BlockStatus,
    CallResult,
    RunResult,
    RunStatus,
)
from byok_plugin.host.runner import (
    RunEvent,
    RunIdInUse,
    RunIdInvalid,
    RunnerOptions,
    WorkflowRunner,
)
from byok_plugin.host.workflow import (
    AgentBlock,
    InputsError,
    ToolBlock,
    Workflow,
    WorkflowError,
    check_models,
    load_workflow,
)
from byok_plugin.settings import SettingsError

__all__ = [
    "RunProgress",
    "WorkflowInvalid",
    "console_for",
    "cost_spec",
    "cost_table",
    "load_checked",
    "money",
    "run_command",
    "run_workflow",
    "validate_command",
]


class WorkflowInvalid(click.ClickException):
    """A workflow (or its inputs) that must not run: exit status 2, like a usage error.

    The message may quote the workflow file (a template's text): it is shown with the
    characters a terminal would act on escaped."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(printable(message, lines=True))


def load_checked(path: Path, pm: pluggy.PluginManager) -> Workflow:
    """The workflow in ``path``, checked against the schema, its graph and the known models
    (a model no ``byok_is_hosted`` implementation answers for is unknown)."""
    workflow = load_workflow(path)
    problems = check_models(
        workflow, lambda provider, model: pm.hook.byok_is_hosted(provider=provider, model=model)
    )
    if problems:
        raise WorkflowError(problems, str(path))
    return workflow


def _problems_json(exc: WorkflowError) -> str:
    return json.dumps(
        {
            "version": JSON_VERSION,
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
    inputs), that every model is known and that every {"env": ...} block key may be read here
    (BYOK_BLOCK_KEY_ENV_ALLOW). Exits 2 and names the JSON path of each problem.
    """
    try:
        checked = load_checked(workflow, cli.pm)
        refused = env_key_problems(checked, env_key_allowance(cli), cli.settings.environ)
        if refused:
            raise WorkflowError(refused, str(workflow))
    except WorkflowError as exc:
        if as_json:
            click.echo(_problems_json(exc))
            raise SystemExit(2) from None
        raise WorkflowInvalid(str(exc)) from None
    agents = checked.agent_blocks
    if as_json:
        echo_json(
            {
                "valid": True,
                "source": str(workflow),
                "name": checked.name,
                "workflow_version": checked.version,
                "blocks": len(checked.blocks),
                "agents": [
                    {"block": a.id, "provider": a.provider, "model": a.model} for a in agents
                ],
            }
        )
        return
    models = ", ".join(sorted({f"{a.provider}/{a.model}" for a in agents})) or "none"
    click.echo(
        printable(
            f"{workflow}: valid: {checked.name} {checked.version}, {len(checked.blocks)} blocks, "
            f"{len(checked.inputs)} inputs; models: {models}"
        )
    )


# --- byok run ------------------------------------------------------------------------------------


def _target(workflow: Workflow, block_id: str) -> str:
    block = workflow.blocks[block_id]
    if isinstance(block, AgentBlock):
        return f"{block.provider}/{block.model}"
    if isinstance(block, ToolBlock):
        return f"exa/{block.tool}"
    return block.type


class RunProgress:
    """Shows a run as it goes: a live table on a terminal, one plain line per event otherwise."""

    def __init__(self, workflow: Workflow, console: Console, *, live: bool) -> None:
        self.workflow = workflow
        self.console = console
        self.live = live
        self.started = time.monotonic()
        self.state: dict[str, str] = dict.fromkeys(workflow.order, "waiting")
        self.detail: dict[str, str] = dict.fromkeys(workflow.order, "")
        self.streamed: dict[str, int] = dict.fromkeys(workflow.order, 0)
        self._live: Live | None = None

    def __enter__(self) -> RunProgress:
        if self.live:
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=10,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(None, None, None)

    def __call__(self, event: RunEvent) -> None:
        block = event.block_id
        if event.kind == "started":
            self.state[block] = "running"
            self._line(block, "started", _target(self.workflow, block))
        elif event.kind == "text":
            self.streamed[block] += len(event.text)
            self.detail[block] = f"streaming: {self.streamed[block]} characters"
        elif event.kind == "waiting":
            # a provider client waits before trying the call again (Retry-After or backoff)
            self.detail[block] = event.text
            self._line(block, "waiting", event.text)
        elif event.kind == "retrying":
            self.detail[block] = f"retrying after: {event.text}"
            self._line(block, "retrying", event.text)
        elif event.kind == "finished" and event.result is not None:
            result = event.result
            self.state[block] = result.status.value
            self.detail[block] = _summary(result)
            self._line(block, result.status.value, self.detail[block])

    def _line(self, block: str, what: str, detail: str) -> None:
        if self.live:
            return
        elapsed = time.monotonic() - self.started
        self.console.print(plain(f"[{elapsed:7.2f}s] {block:<16} {what:<9} {detail}"))

    def render(self) -> Table:
        table = Table(
            title=plain(f"{self.workflow.name} {self.workflow.version}"),
            title_justify="left",
            box=None,
        )
        table.add_column("", width=2)
        table.add_column("block")
        table.add_column("runs")
        table.add_column("status")
        for block in self.workflow.order:
            state = self.state[block]
            if state == "running":
                mark: Any = Spinner("dots", style="cyan")
            elif state == "waiting":
                mark = Text("·", style="dim")
            else:
                mark = Text({"completed": "✓", "failed": "✗", "skipped": "–"}[state])
            style = {
                "completed": "green",
                "failed": "red",
                "skipped": "dim",
                "running": "cyan",
            }.get(state, "dim")
            table.add_row(
                mark,
                plain(block),
                plain(_target(self.workflow, block)),
                plain(self.detail[block] or state, style=style),
            )
        return table


def _summary(result: BlockResult) -> str:
    if result.status is BlockStatus.FAILED:
        return result.error or "failed"
    if result.status is BlockStatus.SKIPPED:
        return result.reason or "skipped"
    if not result.calls:
        return f"{result.latency * 1000:.0f} ms"
    return (
        f"{result.source} key, {result.total_tokens} tokens, {money(result.charge)}, "
        f"{result.latency * 1000:.0f} ms"
    )


def cost_spec(result: RunResult, title: str | None = None) -> TableSpec:
    """The blocks of a run that called a provider (or did not complete): provider, model, key
    source, tokens, charge; and the run's total."""
    unfinished = not result.ok
    columns = [
        Column("block", "id"),
        Column("provider", "id", priority=2),
        Column("model", "model"),
        Column("key", "text", priority=1),
        Column("tokens", "number", priority=3),
        Column("charge", "money"),
    ]
    if unfinished:
        columns.append(Column("status", "id"))
    rows: list[tuple[str | Text, ...]] = []
    for block in result.blocks.values():
        if block.provider is None and block.status is BlockStatus.COMPLETED:
            continue  # input, condition and output blocks call no provider
        source = block.source if block.calls else "-"
        if block.fallback:
            source += " (fallback)"
        tokens = str(block.total_tokens) if block.calls else "-"
        if block.calls and block.total_tokens == 0:
            requests = sum(c.usage.tool_requests for c in block.calls)
            tokens = f"{requests} req"
        row: list[str | Text] = [
            block.block_id,
            block.provider or "-",
            block.model or "-",
            source,
            tokens,
            money(block.charge, block.calls[0].charge.currency) if block.calls else "-",
        ]
        if unfinished:
            style = {"failed": "red", "skipped": "dim"}.get(block.status.value, "")
            row.append(plain(block.status.value, style=style))
        rows.append(tuple(row))
    if result.currency == "mixed":
        total_charge = ", ".join(money(v, k) for k, v in result.charges_by_currency.items())
    else:
        total_charge = money(result.total_charge, result.currency)
    total: list[str | Text] = ["total", "", "", "", str(result.total_tokens), total_charge]
    if unfinished:
        total.append(result.status.value)
    return TableSpec(
        columns=tuple(columns),
        rows=tuple(rows),
        footer=(tuple(total),),
        title=title or f"{result.workflow} for workspace {result.workspace_id!r}",
    )


def cost_table(result: RunResult, title: str | None = None) -> Table:
    """:func:`cost_spec` as a Rich table with every column (its title is the spec's)."""
    spec = cost_spec(result, title)
    table = spec.table()
    table.title = plain(spec.title or "")
    return table


def _parse_inputs(pairs: tuple[str, ...], inputs_file: Path | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if inputs_file is not None:
        try:
            loaded = json.loads(inputs_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise WorkflowInvalid(
                f"{inputs_file}: cannot be read ({exc.strerror or exc})"
            ) from None
        except ValueError as exc:
            raise WorkflowInvalid(f"{inputs_file}: $: not valid JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise WorkflowInvalid(f"{inputs_file}: $: must be a JSON object of input name -> value")
        values.update(loaded)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--input")
        values[name.strip()] = value
    return values


def _earlier_run(path: Path) -> RunResult:
    """The ``byok run --json`` document in ``path``, as the :class:`RunResult` a replay needs:
    each block's status and output, and its calls (usage and charge). :class:`WorkflowInvalid`
    names the file and the JSON path of what is wrong."""
    where = "$"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        blocks: dict[str, BlockResult] = {}
        for i, block in enumerate(document["blocks"]):
            where = f"$.blocks[{i}]"
            calls = []
            for j, call in enumerate(block["calls"]):
                where = f"$.blocks[{i}].calls[{j}]"
                usage, charge = call["usage"], call["charge"]
                list_cost = charge["list_cost"]
                calls.append(
                    CallResult(
                        provider=call["provider"],
                        model=call["model"],
                        source=CredentialSource(call["source"]),
                        key_id=call["key_id"],
                        hint=call["key_hint"],
                        fallback=bool(call["fallback"]),
                        usage=Usage(
                            call["provider"],
                            call["model"],
                            input_tokens=usage["input_tokens"],
                            cached_input_tokens=usage["cached_input_tokens"],
                            cache_write_tokens=usage["cache_write_tokens"],
                            output_tokens=usage["output_tokens"],
                            reasoning_tokens=usage["reasoning_tokens"],
                            tool_requests=usage["tool_requests"],
                        ),
                        charge=Charge(
                            amount=Decimal(charge["amount"]),
                            currency=charge["currency"],
                            reason=charge["reason"],
                            list_cost=None if list_cost is None else Decimal(list_cost),
                        ),
                        latency=float(call["latency_s"]),
                        attempt=int(call["attempt"]),
                        idempotency_key=call["idempotency_key"],
                        streamed=bool(call["streamed"]),
                    )
                )
            where = f"$.blocks[{i}]"
            blocks[block["block"]] = BlockResult(
                block_id=block["block"],
                type=block["type"],
                status=BlockStatus(block["status"]),
                output=block["output"],
                calls=tuple(calls),
                error=block["error"],
                reason=block["reason"],
                attempts=int(block["attempts"]),
                provider=block["provider"],
                model=block["model"],
            )
        where = "$"
        return RunResult(
            run_id=document["run_id"],
            workflow=document["workflow"],
            workflow_version=document["workflow_version"],
            workspace_id=document["workspace"],
            status=RunStatus(document["status"]),
            blocks=blocks,
            outputs=document["outputs"],
            error=document["error"],
        )
    except OSError as exc:
        raise WorkflowInvalid(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise WorkflowInvalid(f"{path}: $: not valid JSON ({exc})") from None
    except KeyError as exc:
        raise WorkflowInvalid(
            f"{path}: {where}: {exc.args[0]!r} is missing: give the `byok run --json` output "
            "of the run to replay"
        ) from None
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise WorkflowInvalid(
            f"{path}: {where}: not what `byok run --json` writes ({exc})"
        ) from None


async def run_workflow(
    pm: pluggy.PluginManager,
    workflow: Workflow,
    *,
    workspace_id: str,
    inputs: Mapping[str, Any],
    environ: Mapping[str, str],
    actor: Any = None,
    stream: bool | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
    options: RunnerOptions | None = None,
    model_check: Callable[[str, str], bool | None] | None = None,
    env_keys: EnvKeyAllowance | None = None,
    run_id: str | None = None,
    replay: RunResult | None = None,
    timeout: float | None = None,
) -> RunResult:
    """One run with a fresh runner (clients over one pooled HTTP client, closed afterwards).

    :param env_keys: the ``env`` block keys the run may read (none by default).
    :param timeout: seconds each provider request may take (default: the clients' own).
    ``run_id`` and ``replay``: see :meth:`WorkflowRunner.run`."""
    async with WorkflowRunner.open(
        pm,
        environ=environ,
        env_keys=env_keys,
        options=options,
        model_check=model_check,
        timeout=timeout,
    ) as runner:
        return await runner.run(
            workflow,
            workspace_id=workspace_id,
            inputs=inputs,
            actor=actor,
            stream=stream,
            on_event=on_event,
            run_id=run_id,
            replay=replay,
        )


def env_key_allowance(cli: CliContext) -> EnvKeyAllowance | None:
    """What ``BYOK_BLOCK_KEY_ENV_ALLOW`` allows this local run to read as ``env`` block keys
    (``None``: nothing); a variable holding one of the platform's keys is refused."""
    environ = cli.settings.environ
    return EnvKeyAllowance.from_environ(
        environ, reserved=lambda value: cli.app.platform_keys.lookup(api_key=value) is not None
    )


@click.command("run")
@click.argument("workflow", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--workspace", "-w", "workspace_id", required=True, help="The workspace the run is for."
)
@click.option(
    "--input",
    "-i",
    "pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A workflow input (repeatable).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A JSON object of inputs; --input values override it.",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Stream every agent block, or none (default: as each block says).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run's result as JSON.")
@click.option(
    "--run-id",
    default=None,
    help="The run's id (default: a new one), at most 150 characters. An id that already has "
    "recorded calls is refused.",
)
@click.option(
    "--replay",
    "replay_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Finish the run --run-id names: its `byok run --json` output; blocks it completed are "
    "not called again.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Provider calls in flight at once.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, 3600, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Seconds each provider request may take before it is retried or fails "
    "(default: 60, and 5 to connect).",
)
@pass_cli
def run_command(
    cli: CliContext,
    workflow: Path,
    workspace_id: str,
    pairs: tuple[str, ...],
    inputs_file: Path | None,
    stream: bool | None,
    as_json: bool,
    run_id: str | None,
    replay_file: Path | None,
    concurrency: int,
    timeout: float | None,
) -> None:
    """Run WORKFLOW (a JSON file) for a workspace, on its keys or the platform's.

    Each agent block's key is resolved by the installed plugins (the stored key a block names by
    label, or its own key; else the workspace's BYOK key, else a platform key for hosted models),
    charged and recorded in the usage ledger. A block reads its key from an environment variable
    only if BYOK_BLOCK_KEY_ENV_ALLOW allows that variable's name.
    Exits 2 for a bad workflow or inputs, 1 when a block fails.

    \b
    A --run-id that already has calls in the ledger is refused (exit 2): calls made again under
    it would not be recorded. To finish such a run, give its earlier --json output:
      byok run flow.json -w acme --run-id order-7 --replay order-7.json
    """
    try:
        check_workspace_id(workspace_id)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="--workspace") from None
    inputs = _parse_inputs(pairs, inputs_file)
    if replay_file is not None and run_id is None:
        raise click.BadParameter("give the --run-id of the run to replay", param_hint="--replay")
    replay = _earlier_run(replay_file) if replay_file is not None else None
    err = console_for(stderr=True)
    try:
        checked = load_checked(workflow, cli.pm)
        with RunProgress(checked, err, live=err.is_terminal and not as_json) as progress:
            result = asyncio.run(
                run_workflow(
                    cli.pm,
                    checked,
                    workspace_id=workspace_id,
                    inputs=inputs,
                    environ=cli.settings.environ,
                    actor=cli.actor,
                    stream=stream,
                    on_event=progress,
                    options=RunnerOptions(max_concurrent_calls=concurrency),
                    env_keys=env_key_allowance(cli),
                    run_id=run_id,
                    replay=replay,
                    timeout=timeout,
                )
            )
    except InputsError as exc:
        raise WorkflowInvalid(
            f"{exc}\n(give inputs with --input NAME=VALUE or --inputs FILE.json)"
        ) from None
    except WorkflowError as exc:
        raise WorkflowInvalid(str(exc)) from None
    except RunIdInUse as exc:
        raise WorkflowInvalid(str(exc)) from None
    except RunIdInvalid as exc:
        raise WorkflowInvalid(f"--run-id: {exc}") from None
    except ValueError as exc:
        if replay is None:
            raise
        # the runner's check: a replay file of another run, workspace or workflow
        raise WorkflowInvalid(f"--replay {replay_file}: {exc}") from None
    except (ByokError, SettingsError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo_json(result.to_dict())
    else:
        out = console_for()
        show(out, cost_spec(result))
        for name, value in result.outputs.items():
            shown = (
                value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
            )
            # soft wrap: the terminal folds long lines, no line break is written inside a value
            out.print(plain(f"output {name}:", style="bold"), soft_wrap=True)
            out.print(plain(shown, lines=True), soft_wrap=True)
    if not result.ok:
        click.echo(printable(f"Error: {result.error}"), err=True)
        raise SystemExit(1)
