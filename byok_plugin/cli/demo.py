"""``byok demo``: BYOK against platform billing, on a fresh machine, offline, nothing configured.

It builds a throwaway installation (:class:`DemoStack`): a temporary ``BYOK_HOME`` with its own
SQLite store, a master key generated in this process (given to the plugin as
``BYOK_ENCRYPTION_KEYS`` in an in-memory environment: never printed, never written to disk), and
the provider emulator on a free loopback port. Two workspaces:

- ``acme-byok`` stores its own keys for every provider (BYOK);
- ``globex-platform`` stores none, so hosted models run on the platform's key pool.

It runs the same sample workflow in each, through the same hooks a real host uses, and shows the
two cost tables side by side: the BYOK workspace is charged $0.00, the platform workspace the
priced amount; then what the ledger recorded and which keys the emulator actually received.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import string
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import pluggy
from byok_hookspecs import ByokError

from byok_plugin.app import App, utc_now
from byok_plugin.cli.context import OPERATOR
from byok_plugin.cli.run import (
    RunProgress,
    console_for,
    cost_spec,
    load_checked,
    run_workflow,
)
from byok_plugin.cli.tables import Column, TableSpec, show
from byok_plugin.cli.text import money, plain
from byok_plugin.core.crypto import generate_master_key
from byok_plugin.host.run_result import RunResult
from byok_plugin.host.workflow import AgentBlock, KeyRef, ToolBlock, Workflow, WorkflowError
from byok_plugin.host.workflow.providers import TOOL_PROVIDERS
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

if TYPE_CHECKING:  # the emulator needs starlette and uvicorn, from the ``server`` extra
    from byok_plugin.host.emulator import EmulatorServer

__all__ = ["BYOK_WORKSPACE", "PLATFORM_WORKSPACE", "DemoStack", "demo_command", "sample_path"]

BYOK_WORKSPACE = "acme-byok"
PLATFORM_WORKSPACE = "globex-platform"
PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")
#: the label of the stored key the translate block of release-notes-translation.json names
LOCALIZATION_LABEL = "localization"
DEFAULT_WORKFLOW = "support-ticket-triage"
DEMO_INPUTS: Mapping[str, Mapping[str, str]] = {
    "support-ticket-triage": {
        "ticket": "Hi, I was charged twice for my March invoice (INV-2291) and our finance team "
        "needs a corrected receipt before Friday.",
        "customer_tier": "enterprise",
    },
    "research-brief": {"topic": "heat pumps in cold climates"},
    "multi-provider-comparison": {"question": "Explain in two sentences why the sky is blue."},
    "release-notes-translation": {
        "changelog": "feat: dark mode\nfix: login loop on Safari\nperf: 30% faster exports",
        "language": "German",
    },
}


def _samples_dirs() -> list[Path]:
    dirs = []
    packaged = resources.files("byok_plugin").joinpath("sample_workflows")
    if packaged.is_dir():
        dirs.append(Path(str(packaged)))
    dirs.append(Path(__file__).resolve().parents[2] / "sample_workflows")  # a source checkout
    return dirs


def sample_path(name: str) -> Path:
    """A sample workflow by name (``support-ticket-triage``) or a path to any workflow file."""
    given = Path(name)
    if given.suffix == ".json" and given.exists():
        return given
    for directory in _samples_dirs():
        candidate = directory / f"{name.removesuffix('.json')}.json"
        if candidate.exists():
            return candidate
    known = sorted({p.stem for d in _samples_dirs() if d.is_dir() for p in d.glob("*.json")})
    raise click.BadParameter(
        f"no sample workflow {name!r}; samples: {', '.join(known) or 'none found'}",
        param_hint="--workflow",
    )


def realistic_key(provider: str) -> str:
    """A random key shaped like the provider's real ones (so the key store has nothing to flag)."""
    if provider == "openai":
        return "sk-proj-" + secrets.token_urlsafe(36)
    if provider == "anthropic":
        return "sk-ant-api03-" + secrets.token_urlsafe(70)
    if provider == "google":
        return "AIza" + secrets.token_urlsafe(27)[:35]
    if provider == "mistral":
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    if provider == "exa":
        return str(uuid.uuid4())
    return secrets.token_urlsafe(32)


@dataclass
class DemoStack:
    """A throwaway byok installation whose providers are an emulator.

    :param home: an empty directory for ``BYOK_HOME`` (the SQLite store lives there).
    :param emulator: a running emulator; the stack registers its keys with it.
    :param database_url: another store (PostgreSQL) instead of the SQLite file.
    :param extra_env: more variables for the plugin's environment.
    :param clock: the app's clock (what "now" is for budget periods, holds and cooldowns).
    """

    home: Path
    emulator: EmulatorServer
    database_url: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    clock: Callable[[], datetime] = field(default=utc_now, repr=False)
    workspace_keys: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    platform_keys: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    block_key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        for provider in PROVIDERS:
            self.workspace_keys[provider] = self._new_key(provider, f"{BYOK_WORKSPACE}-{provider}")
            self.platform_keys[provider] = self._new_key(provider, f"platform-{provider}")
        self.block_key = self._new_key("anthropic", "block-localization")
        master = generate_master_key()
        secret = base64.b64encode(master.secret).decode("ascii")
        env = {
            "BYOK_HOME": str(self.home),
            "BYOK_ENCRYPTION_KEYS": f"{master.id}:{secret}",
            # keys go in unchecked: the emulator would accept them, and the demo stays quick
            "BYOK_VALIDATE_KEYS": "0",
            # only the built-in plugin: a fee plugin installed on this machine would change totals
            "BYOK_LOAD_PLUGINS": "byok_plugin",
            **self.emulator.environ(),
            **{f"BYOK_PLATFORM_KEYS_{p.upper()}": key for p, key in self.platform_keys.items()},
        }
        if self.database_url:
            env["BYOK_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        self.environ: dict[str, str] = env

    def _new_key(self, provider: str, label: str) -> str:
        key = realistic_key(provider)
        self.emulator.add_key(provider, key, label=label)
        return key

    def __repr__(self) -> str:
        return f"DemoStack(home={str(self.home)!r}, emulator={self.emulator.url!r})"

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_environ(self.environ)

    @cached_property
    def app(self) -> App:
        return App(self.settings, clock=self.clock)

    @cached_property
    def pm(self) -> pluggy.PluginManager:
        return plugin_manager_for(self.app)

    def store_workspace_keys(
        self, workspace_id: str = BYOK_WORKSPACE, providers: tuple[str, ...] = PROVIDERS
    ) -> None:
        """Store the workspace's own key for each provider, as ``byok keys set`` does."""
        service = KeyService.for_app(self.app, self.pm)
        for provider in providers:
            service.set_key(
                OPERATOR, workspace_id, provider, self.workspace_keys[provider], test=False
            )

    def store_labelled_keys(
        self,
        workflow: Workflow,
        workspaces: tuple[str, ...] = (BYOK_WORKSPACE, PLATFORM_WORKSPACE),
    ) -> list[tuple[str, str]]:
        """Store, in each workspace, a key for every (provider, label) the workflow's blocks name
        (``"key": {"label": ...}``): the localisation team's key (:attr:`block_key`) for
        ``anthropic``/``localization``, a new emulator key for any other. Returns the pairs."""
        named = sorted(
            {
                (provider, ref.label)
                for provider, ref in _key_refs(workflow)
                if ref is not None and ref.label is not None
            }
        )
        service = KeyService.for_app(self.app, self.pm)
        for provider, label in named:
            if (provider, label) == ("anthropic", LOCALIZATION_LABEL):
                key = self.block_key
            else:
                key = self._new_key(provider, f"block-{label}")
            for workspace_id in workspaces:
                service.set_key(OPERATOR, workspace_id, provider, key, label=label, test=False)
        return named

    def set_fallback_policy(self, workspace_id: str, policy: str) -> None:
        self.app.workspace_settings.set_fallback_policy(workspace_id, policy, actor_id=OPERATOR.id)

    def run(
        self,
        workflow: Workflow,
        workspace_id: str,
        inputs: Mapping[str, Any],
        *,
        stream: bool | None = None,
        on_event: Any = None,
    ) -> RunResult:
        return asyncio.run(
            run_workflow(
                self.pm,
                workflow,
                workspace_id=workspace_id,
                inputs=inputs,
                environ=self.environ,
                actor=OPERATOR,
                stream=stream,
                on_event=on_event,
            )
        )

    def close(self) -> None:
        """Release the store (its connections, the resolver's pending writes)."""
        if "app" in self.__dict__:
            self.app.close()


def _key_refs(workflow: Workflow) -> Iterator[tuple[str, KeyRef | None]]:
    """(provider, key reference) of every block and agent tool that calls a provider."""
    for block in workflow.blocks.values():
        if isinstance(block, AgentBlock):
            yield block.provider, block.key
            yield from ((TOOL_PROVIDERS[t.type][0], t.key) for t in block.tools)
        elif isinstance(block, ToolBlock):
            yield TOOL_PROVIDERS[block.tool][0], block.key


@contextmanager
def demo_stack() -> Iterator[DemoStack]:
    """A :class:`DemoStack` in a temporary directory with its own emulator, removed afterwards."""
    try:
        from byok_plugin.host.emulator import EmulatorServer
    except ImportError as exc:
        raise click.ClickException(
            f"byok demo runs the provider emulator, which needs the server extra ({exc.name} is "
            "missing): pip install 'byok-plugin[server]'"
        ) from None
    with tempfile.TemporaryDirectory(prefix="byok-demo-") as tmp, EmulatorServer() as emulator:
        stack = DemoStack(Path(tmp) / "home", emulator)
        try:
            yield stack
        finally:
            stack.close()


def _ledger_table(stack: DemoStack, results: Mapping[str, RunResult]) -> TableSpec:
    rows = []
    for workspace_id, result in results.items():
        recorded = [
            r for r in stack.app.ledger.rows(workspaces=[workspace_id]) if r.run_id == result.run_id
        ]
        sources = ", ".join(sorted({r.source.value for r in recorded})) or "-"
        charged = sum((r.amount for r in recorded), Decimal(0))
        listed = sum((r.list_cost or Decimal(0) for r in recorded), Decimal(0))
        rows.append((workspace_id, str(len(recorded)), sources, money(charged), money(listed)))
    return TableSpec(
        columns=(
            Column("workspace", "id"),
            Column("calls", "number"),
            Column("key sources", "text", priority=1),
            Column("charged", "money"),
            Column("list cost", "money"),
        ),
        rows=tuple(rows),
        title="what the ledger recorded",
    )


def _emulator_table(stack: DemoStack) -> TableSpec:
    counts: dict[str, int] = {}
    for call in stack.emulator.calls():
        label = call.key_label or "unknown key"
        counts[label] = counts.get(label, 0) + 1
    return TableSpec(
        columns=(Column("key", "id"), Column("calls", "number")),
        rows=tuple((label, str(count)) for label, count in sorted(counts.items())),
        title="keys the emulated providers received",
    )


@click.command("demo")
@click.option(
    "--workflow",
    "workflow_name",
    default=DEFAULT_WORKFLOW,
    show_default=True,
    help="A sample workflow's name (or a workflow file) to run in both workspaces.",
)
@click.option("--stream/--no-stream", default=None, help="Stream every agent block, or none.")
def demo_command(workflow_name: str, stream: bool | None) -> None:
    """Run a sample workflow for a BYOK workspace and a platform-billed one, side by side.

    Offline and self-contained: a temporary store and master key, and the provider emulator on a
    free loopback port. Nothing on this machine is read or changed.
    """
    path = sample_path(workflow_name)
    console = console_for()
    err = console_for(stderr=True)
    try:
        with demo_stack() as stack:
            stack.store_workspace_keys(BYOK_WORKSPACE)
            workflow = load_checked(path, stack.pm)
            labelled = stack.store_labelled_keys(workflow)
            inputs = dict(DEMO_INPUTS.get(path.stem, {}))
            for name, spec in workflow.inputs.items():
                if name not in inputs and not spec.has_default:
                    inputs[name] = f"demo {name}"
            err.print(
                plain(
                    f"byok demo: temporary store in {stack.home}, "
                    f"provider emulator at {stack.emulator.url}"
                )
            )
            err.print(
                plain(
                    f"workspace {BYOK_WORKSPACE!r} stored its own keys for {', '.join(PROVIDERS)}; "
                    f"workspace {PLATFORM_WORKSPACE!r} has none (platform keys)"
                )
            )
            for provider, label in labelled:
                err.print(
                    f"both workspaces stored their {provider} key labelled {label!r}, which a block "
                    f"of {workflow.name} names",
                    highlight=False,
                )
            results: dict[str, RunResult] = {}
            for workspace_id in (BYOK_WORKSPACE, PLATFORM_WORKSPACE):
                err.print(plain(f"\nrunning {workflow.name} for {workspace_id}", lines=True))
                with RunProgress(workflow, err, live=err.is_terminal) as progress:
                    results[workspace_id] = stack.run(
                        workflow, workspace_id, inputs, stream=stream, on_event=progress
                    )
            for w in results:
                console.print()
                show(console, cost_spec(results[w], title=f"{w}: {workflow.name}"))
            byok, platform = results[BYOK_WORKSPACE], results[PLATFORM_WORKSPACE]
            console.print(
                f"\n{BYOK_WORKSPACE} charged [bold]{money(byok.total_charge)}[/bold] "
                f"(its own provider accounts paid the {money(byok.total_list_cost)} list cost); "
                f"{PLATFORM_WORKSPACE} charged [bold]{money(platform.total_charge)}[/bold] "
                f"at list price on the platform's keys.\n"
            )
            show(console, _ledger_table(stack, results))
            console.print()
            show(console, _emulator_table(stack))
            failed = [r for r in results.values() if not r.ok]
    except WorkflowError as exc:
        raise click.ClickException(str(exc)) from None
    except ByokError as exc:
        raise click.ClickException(str(exc)) from None
    if failed:
        for result in failed:
            click.echo(f"Error: {result.workspace_id}: {result.error}", err=True)
        raise SystemExit(1)
