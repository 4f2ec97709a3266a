"""The asyncio runner of the reference host engine.

It reaches byok-plugin only through the hooks of a pluggy ``PluginManager`` (``byok_hookspecs``),
as any third-party engine would::

    async with WorkflowRunner.open(pm, environ=os.environ) as runner:
        result = await runner.run(load_workflow("triage.json"), workspace_id="acme",
                                  inputs={"ticket": "..."})
    print(result.total_charge, result.blocks["classify"].source)

Blocks start as soon as every block with an edge into them has finished; independent branches run
concurrently; at most ``max_concurrent_calls`` provider calls are in flight at once (the hooks
around a call do not hold a slot). Every provider
call goes through the same four steps:

1. ``byok_resolve_credential(request)``: which key (block, workspace or platform);
2. the call itself, over the provider client (streamed or not);
3. ``byok_compute_charge(usage, credential)``: what the platform charges for it; ``usage.model``
   is the model the block asked for (the one resolution checked the price of), not the dated
   snapshot the provider may name in its reply (that name is the block output's ``model``);
4. ``byok_record_usage(record)``, with the idempotency key ``run:block:attempt``.

Around the call, budgets: after step 1 the runner holds the call's worst case with
``byok_reserve_budget`` (its cost by ``byok_compute_charge`` of a worst-case usage: the request's
text as input tokens, one per UTF-8 byte, ``max_tokens`` output tokens, one request for a tool
call); a call that does not fit a hard budget fails its block before anything is sent
(``BudgetExceeded``). After step 4 it settles the actual charge with ``byok_settle_budget``; a
call that does not complete releases its hold.

When the provider refuses a key (an authentication or rate-limit error that outlived the client's
own retries), or fails on a workspace key (a 5xx, a timeout, unreachable, after the client's own
retries: reason ``error``), the runner asks ``byok_resolve_credential`` again with
``request.failure`` set, so the workspace's fallback policy decides whether another key (or the
platform's, under ``on_error``) serves the call. A call that does not complete is not charged as
a completed one: a stream cut after it started is recorded once, ``interrupted``, with what the
provider is known to bill (charged as any call); a request sent and never answered is recorded
``uncertain`` (not charged) and, on the platform's key, not tried again; a call the provider
never received leaves no row. A failed block fails the run: blocks
already running finish (their completed calls are recorded), blocks not started are reported as
skipped.

The hooks are synchronous and may wait on a database or a remote service, so by default they run
in a worker thread and never stall the event loop, unless every implementation of the hooks a call
goes through declares that it never waits on the network (:mod:`byok_hookspecs.blocking`): then
they are called inline, which saves two thread switches per call. byok-plugin's own
implementations declare it on a local SQLite store, not on PostgreSQL, except resolution (and its
audit events) while its key-change listener is connected. Resolution is asked on the loop whenever
the hooks it goes through (:data:`RESOLVE_HOOKS`) are declared, even when recording is not.
``RunnerOptions.hooks_in_thread`` forces either way (see ``benchmarks/bench_runner.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import secrets
import time
import traceback
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import pluggy
from byok_hookspecs import (
    USAGE_COUNTS,
    Actor,
    BudgetExceeded,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    ByokError,
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    FailureReason,
    NoCredential,
    ProviderFailure,
    Usage,
    UsageRecord,
    blocking_implementations,
    calling_inline,
    redact,
)
from jsonschema import Draft202012Validator

from byok_plugin.host.env_keys import EnvKeyAllowance, env_key_problems, env_key_refusal
from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    FunctionTool,
    Message,
    SearchHit,
    SearchRequest,
    SearchResult,
    WebSearchTool,
)
from byok_plugin.host.providers.errors import (
    AuthError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimitError,
    ServerError,
    UnsupportedRequest,
)
from byok_plugin.host.providers.registry import create_clients, new_http_client
from byok_plugin.host.providers.retry import (
    RetryPolicy,
    RetryWait,
    retry_listener,
    retrying_once_sent,
)
from byok_plugin.host.run_result import (
    BlockResult,
    BlockStatus,
    CallResult,
    Rejection,
    RunResult,
    RunStatus,
)
from byok_plugin.host.workflow import (
    AgentBlock,
    AgentTool,
    Block,
    ConditionBlock,
    InputBlock,
    KeyRef,
    OutputBlock,
    Problem,
    Ref,
    RenderError,
    ToolBlock,
    Workflow,
    WorkflowError,
    bind_inputs,
    check_models,
    json_path,
)
from byok_plugin.host.workflow.providers import TOOL_PROVIDERS, WEB_SEARCH_TOOLS
from byok_plugin.host.workflow.templates import step_into, to_text

__all__ = [
    "BlockFailed",
    "RunEvent",
    "RunIdInUse",
    "RunIdInvalid",
    "RunnerOptions",
    "WorkflowRunner",
]

log = logging.getLogger("byok.host.runner")
_T = TypeVar("_T")

EXA_TOOL = "exa_search"
#: the reason of the zero charge recorded for a completed call whose byok_compute_charge failed
CHARGE_FAILED = "charge_failed"
#: the longest idempotency key the usage ledger stores (``run:block:attempt[:seq][:uncertain:n]``)
IDEMPOTENCY_KEY_ROOM = 255
#: the longest run id: with a block id (at most 64 characters) and what a call's key adds after
#: it (``:attempt:seq:uncertain:n``, under 40 characters), every key fits the ledger's 255
MAX_RUN_ID = 150
_SEARCH_FUNCTION = FunctionTool(
    name=EXA_TOOL,
    description="Search the web with Exa. Returns the most relevant pages: title, URL and text.",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string", "description": "What to search for."}},
        "required": ["query"],
    },
)
#: the hooks a provider call goes through, with those the default resolution asks in turn
RUN_HOOKS = (
    "byok_resolve_credential",
    "byok_unwrap_data_key",  # resolution asks it on a cold data-key cache (a KMS: the network)
    "byok_is_hosted",
    "byok_platform_key",
    "byok_authorize",
    "byok_audit",
    "byok_compute_charge",
    "byok_record_usage",
    "byok_recorded_calls",
    "byok_reserve_budget",
    "byok_settle_budget",
)
#: the hooks a resolution goes through: called on the event loop when they declare they never
#: block, even when recording blocks (PostgreSQL, with the resolver served from memory)
RESOLVE_HOOKS = (
    "byok_resolve_credential",
    "byok_unwrap_data_key",
    "byok_is_hosted",
    "byok_platform_key",
    "byok_authorize",
    "byok_audit",
)
#: a completed call waiting to be charged and recorded: (usage, credential, make_record, and
#: what makes its budget settlement of the charge, when it holds one)
_Settling = tuple[
    Any,
    Credential,
    Callable[[Charge], UsageRecord],
    Callable[[Charge], BudgetSettlement] | None,
]
#: what settling it gave: (charge, record, record error, charge error)
_Settled = tuple[Charge, UsageRecord, Exception | None, Exception | None]
#: errors worth trying the block again for: the call did not complete, and may next time
_TRANSIENT = (ServerError, ProviderTimeout, ProviderUnreachable, ProtocolError)
#: failures of a workspace key after which resolution is asked again (reason ``error``): the
#: fallback policy ``on_error`` may then serve the call with the platform key
_ASK_AGAIN_ON_ERROR = (ServerError, ProviderTimeout, ProviderUnreachable)


class BlockFailed(Exception):
    """A block could not complete. The message is safe to show: it never carries a key.

    :param retryable: trying the block again may succeed (a broken stream, a malformed reply).
    :param call: a provider call that completed before the block failed (its usage not
        recorded, or its charge failed): the block's result lists it.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, call: CallResult | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.call = call


class RunIdInUse(ByokError):
    """A run id the caller gave that already has calls in the usage ledger, for a new execution
    (or for another workspace). Raised before anything runs. The message names the run id and
    the workspace, never another workspace."""


class RunIdInvalid(ByokError):
    """A run id the caller gave that the ledger could not store under (too long for this
    workflow's idempotency keys, or with control characters). Raised before anything runs."""


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner behaves.

    :param max_concurrent_calls: provider calls in flight at once, across all blocks of all runs
        of this runner.
    :param block_retries: extra attempts of an agent or tool block after a transient failure,
        unless the block sets its own ``retries``.
    :param max_key_rounds: keys tried for one call (the first included) when the provider refuses
        them, before the block fails.
    :param record_attempts: tries of ``byok_record_usage`` (idempotent) before the block fails;
        a failure on the event loop always gets one more try in a worker thread.
    :param hooks_in_thread: ``True`` calls the hooks in a worker thread, ``False`` on the event
        loop; ``None`` (the default) on the event loop when every implementation of
        :data:`RUN_HOOKS` declares it never waits on the network
        (:func:`byok_hookspecs.blocking_implementations`), else in a worker thread.
    :param budget_hold_seconds: how long a call's budget hold lasts if it is never settled (a
        crashed worker); longer than any provider call.
    :param budget_output_tokens: the output tokens a block without ``max_tokens`` is assumed to
        use at most, for its budget hold (Anthropic's client sends the same default).
    :param group_commit: when the hooks run in a worker thread, charge and record the calls that
        finish together as one group (``byok_record_usage_batch``: one transaction on the
        default plugin), by one writer per runner; each call awaits its own group without
        holding a thread. ``False``: one worker-thread job per call.
    """

    max_concurrent_calls: int = 16
    block_retries: int = 1
    max_key_rounds: int = 4
    record_attempts: int = 3
    hooks_in_thread: bool | None = None
    budget_hold_seconds: float = 900.0
    budget_output_tokens: int = 4096
    group_commit: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrent_calls < 1:
            raise ValueError("max_concurrent_calls must be at least 1")
        if self.block_retries < 0 or self.max_key_rounds < 1 or self.record_attempts < 1:
            raise ValueError("block_retries >= 0, max_key_rounds >= 1 and record_attempts >= 1")
        if not self.budget_hold_seconds > 0 or self.budget_output_tokens < 1:
            raise ValueError("budget_hold_seconds > 0 and budget_output_tokens >= 1")


@dataclass(frozen=True, slots=True)
class RunEvent:
    """Progress of a run, for a live display. ``kind``: ``started``, ``text`` (a streamed piece),
    ``waiting`` (a provider client waits before trying a call again: ``wait`` set, ``text`` says
    attempt n of m and why), ``retrying`` (the block runs again), ``finished`` (``result`` set,
    completed, failed or skipped)."""

    kind: str
    block_id: str
    block_type: str
    text: str = ""
    result: BlockResult | None = None
    wait: RetryWait | None = None


EventHandler = Callable[[RunEvent], None]


@dataclass
class _Run:
    workflow: Workflow
    workspace_id: str
    run_id: str
    inputs: Mapping[str, Any]
    actor: Actor | None
    stream: bool | None
    on_event: EventHandler | None
    results: dict[str, BlockResult] = field(default_factory=dict)
    #: replayed: the earlier results of blocks whose calls completed, taken as they were
    reused: Mapping[str, BlockResult] = field(default_factory=dict)
    #: replayed: the highest attempt already recorded per block; new attempts come after it
    recorded_attempts: Mapping[str, int] = field(default_factory=dict)
    #: the keys this run's calls used (block keys and resolved credentials): every text that
    #: leaves the runner (block errors, events, logs) is redacted of them
    keys_used: set[str] = field(default_factory=set, repr=False)

    def redact(self, text: str) -> str:
        return redact(text, *self.keys_used)

    def emit(
        self,
        kind: str,
        block_id: str,
        block_type: str,
        text: str = "",
        result: BlockResult | None = None,
    ) -> None:
        if self.on_event is not None:
            self.on_event(RunEvent(kind, block_id, block_type, text, result))

    def emit_wait(self, block_id: str, block_type: str, wait: RetryWait) -> None:
        text = self.redact(wait.describe())
        log.info("block %s: %s", block_id, text)
        if self.on_event is not None:
            self.on_event(RunEvent("waiting", block_id, block_type, text, wait=wait))

    def lookup(self, ref: Ref) -> Any:
        if ref.is_input:
            return self.inputs[str(ref.path[0])]
        result = self.results.get(ref.root)
        if result is None or result.status is not BlockStatus.COMPLETED or result.output is None:
            return None  # a block not run: null in an output field, empty text in a prompt
        return step_into(result.output, ref, ref.path)


class WorkflowRunner:
    """Runs workflows against provider clients, through the ``byok`` hooks of ``pm``.

    :param pm: a plugin manager with the ``byok`` hook specs (``byok_hookspecs.add_to``) and an
        implementation of at least ``byok_resolve_credential``.
    :param clients: provider name -> client (``openai``, ``anthropic``, ``google``, ``mistral``,
        ``exa``); see :meth:`open` for the default set over one shared ``httpx.AsyncClient``.
    :param environ: the process environment: provider base URLs, and the variables of
        ``{"env": "VAR"}`` block keys when ``env_keys`` allows them.
    :param env_keys: which variables ``{"env": ...}`` block keys may read (a local, single-user
        ``byok run`` whose operator allowed them); ``None`` (a runner embedded in a server)
        refuses every ``env`` reference before anything runs. ``{"label": ...}`` block keys name
        a stored key and are always allowed.
    :param options: concurrency, retries, hook threading.
    :param clock: a monotonic clock, for latencies.
    :param model_check: ``(provider, model) -> True/False`` for a known model or tool (hosted or
        not), ``None`` for an unknown one; ``byok_is_hosted`` by default.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        clients: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        env_keys: EnvKeyAllowance | None = None,
        options: RunnerOptions | None = None,
        clock: Callable[[], float] = time.perf_counter,
        model_check: Callable[[str, str], bool | None] | None = None,
    ) -> None:
        self.pm = pm
        self.clients = dict(clients)
        self.environ: Mapping[str, str] = environ if environ is not None else {}
        self.env_keys = env_keys
        self.options = options or RunnerOptions()
        self._clock = clock
        self._limit = asyncio.Semaphore(self.options.max_concurrent_calls)
        self._model_check = model_check
        self._known: dict[tuple[str, str], bool | None] = {}
        self._checked: dict[int, weakref.ref[Workflow]] = {}
        # (the plugins the decision was made for, held so that none is freed and its id reused;
        # whether the hooks go to a worker thread)
        self._threading: tuple[set[object], bool] | None = None
        # records still being tried in a worker thread (they outlive a cancelled run)
        self._recording: set[asyncio.Future[Any]] = set()
        # group commit: the calls waiting for the writer, and the writer (one per runner)
        self._group: list[tuple[_Settling, asyncio.Future[_Settled]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._prepared = False
        self._preparing = asyncio.Lock()
        # the run ids the caller gave of the runs in flight, and their workspaces: another run
        # under one of them would make calls under the same idempotency keys
        self._running: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"WorkflowRunner(providers={sorted(self.clients)}, options={self.options})"

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        pm: pluggy.PluginManager,
        *,
        environ: Mapping[str, str] | None = None,
        env_keys: EnvKeyAllowance | None = None,
        options: RunnerOptions | None = None,
        http: httpx.AsyncClient | None = None,
        base_urls: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        model_check: Callable[[str, str], bool | None] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[WorkflowRunner]:
        """A runner with a client for every provider over one pooled ``httpx.AsyncClient``.

        Base URLs come from ``base_urls``, else ``BYOK_<PROVIDER>_BASE_URL`` in ``environ``, else
        the providers' public APIs. The HTTP client is closed on exit unless it was given.
        ``timeout``: seconds each provider request may take (connect, send, each read), instead
        of the clients' default.
        """
        opts = options or RunnerOptions()
        own = http is None
        if http is None:
            size = max(opts.max_concurrent_calls, 20)
            http = new_http_client(max_connections=size, max_keepalive=size)
        runner: WorkflowRunner | None = None
        try:
            clients = create_clients(
                http, environ=environ, base_urls=base_urls, retry=retry, timeout=timeout
            )
            runner = cls(
                pm,
                clients,
                environ=environ,
                env_keys=env_keys,
                options=opts,
                model_check=model_check,
            )
            await runner.prepare()
            yield runner
        finally:
            try:
                if runner is not None:
                    await runner.drain()
            finally:
                if own:
                    await http.aclose()

    async def prepare(self) -> None:
        """``byok_prepare`` once, in a worker thread: the plugins load their store, catalog and
        prices there, not on the event loop during a first run. :meth:`open` calls it, and so
        does the first :meth:`run` of a runner built otherwise. A failure is logged: the hooks
        that need what was not loaded report it."""
        async with self._preparing:
            if self._prepared:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.pm.hook.byok_prepare)
            except Exception as exc:
                log.warning("byok_prepare failed: %s: %s", type(exc).__name__, exc)
            self._prepared = True

    async def drain(self) -> None:
        """Wait for the records still being tried in a worker thread (those of runs cancelled
        after their call completed); :meth:`open` does on exit. Cancelling the wait does not
        cancel them."""
        while self._recording:
            await asyncio.wait(set(self._recording))

    # --- before anything runs --------------------------------------------------------------------
    def is_known(self, provider: str, model: str) -> bool | None:
        """``model_check``'s (else ``byok_is_hosted``'s) answer, cached per runner: ``None`` means
        nobody knows the model."""
        key = (provider, model)
        if key not in self._known:
            if self._model_check is not None:
                self._known[key] = self._model_check(provider, model)
            else:
                self._known[key] = self.pm.hook.byok_is_hosted(provider=provider, model=model)
        return self._known[key]

    def preflight(self, workflow: Workflow) -> list[Problem]:
        """What stops ``workflow`` from running here: unknown models or tools, ``env`` block keys
        this runner may not read (or whose variable is not set), providers without a client."""
        problems = check_models(workflow, self.is_known)
        for block in workflow.blocks.values():
            base = ("blocks", block.id)
            if isinstance(block, AgentBlock | ToolBlock):
                provider = (
                    block.provider
                    if isinstance(block, AgentBlock)
                    else TOOL_PROVIDERS[block.tool][0]
                )
                if provider not in self.clients:
                    problems.append(
                        Problem(json_path(base), f"this runner has no {provider} client")
                    )
            if isinstance(block, AgentBlock):
                for i, tool in enumerate(block.tools):
                    if TOOL_PROVIDERS[tool.type][0] not in self.clients:
                        problems.append(
                            Problem(json_path((*base, "tools", i)), "this runner has no exa client")
                        )
        problems.extend(env_key_problems(workflow, self.env_keys, self.environ))
        return problems

    def check(self, workflow: Workflow) -> None:
        """Raise :class:`WorkflowError` with every :meth:`preflight` problem."""
        problems = self.preflight(workflow)
        if problems:
            raise WorkflowError(problems, workflow.source)

    # --- a run -----------------------------------------------------------------------------------
    async def run(
        self,
        workflow: Workflow,
        *,
        workspace_id: str,
        inputs: Mapping[str, Any] | None = None,
        actor: Actor | None = None,
        run_id: str | None = None,
        stream: bool | None = None,
        on_event: EventHandler | None = None,
        replay: RunResult | None = None,
    ) -> RunResult:
        """Run ``workflow`` for ``workspace_id``.

        :param inputs: the workflow's inputs (strings are converted to the declared types).
        :param run_id: the run's id; a new one by default. An id given here that already has
            calls in the usage ledger (``byok_recorded_calls``) is refused with
            :class:`RunIdInUse` unless ``replay`` is given: a call made again under the same
            idempotency key would be neither recorded nor charged.
        :param replay: the earlier :class:`RunResult` of this ``run_id`` (same workspace and
            workflow), to finish it: agent and tool blocks it completed, whose calls the ledger
            holds, are taken as they were, their calls not made again; the other blocks run, their
            attempts numbered after those the ledger holds, so every new call is recorded.
        :param stream: ``True``/``False`` streams every agent block, or none; ``None`` follows
            each block's ``stream``.
        :param on_event: called with each :class:`RunEvent`, on the event loop.
        :raises WorkflowError: before anything runs: a missing input, an unknown model, an ``env``
            block key this runner may not read or whose variable is not set.
        :raises RunIdInUse: before anything runs: see ``run_id``; also a run id of a run of this
            runner still in flight (in any workspace).
        :raises RunIdInvalid: before anything runs: an empty run id, one longer than
            :data:`MAX_RUN_ID` or with control characters.
        """
        values = bind_inputs(workflow, inputs or {})
        if not self._prepared:
            await self.prepare()
        checked = self._checked.get(id(workflow))
        if checked is None or checked() is not workflow:
            problems = (
                await self._hook(self.preflight, workflow)
                if self._needs_thread(workflow)
                else self.preflight(workflow)
            )
            if problems:
                raise WorkflowError(problems, workflow.source)
            # a workflow is frozen and so is this runner's environment: checked once is enough
            # (each call checks its env block key again before it reads it)
            self._checked[id(workflow)] = weakref.ref(workflow)
        if run_id is None:
            if replay is not None:
                raise ValueError("replay= needs the run_id of the run it replays")
            return await self._run(workflow, workspace_id, None, values, actor, stream, on_event)
        _check_run_id_form(run_id)
        if run_id in self._running:  # checked and taken with no await in between: atomic
            raise RunIdInUse(
                f"run id {run_id!r} is in use by a run still in flight: give workspace "
                f"{workspace_id!r} a run id of its own"
            )
        self._running[run_id] = workspace_id
        try:
            reused, recorded_attempts = await self._check_run_id(
                workflow, workspace_id, run_id, replay
            )
            return await self._run(
                workflow,
                workspace_id,
                run_id,
                values,
                actor,
                stream,
                on_event,
                reused,
                recorded_attempts,
            )
        finally:
            del self._running[run_id]

    async def _run(
        self,
        workflow: Workflow,
        workspace_id: str,
        run_id: str | None,
        values: dict[str, Any],
        actor: Actor | None,
        stream: bool | None,
        on_event: EventHandler | None,
        reused: dict[str, BlockResult] | None = None,
        recorded_attempts: dict[str, int] | None = None,
    ) -> RunResult:
        run = _Run(
            workflow=workflow,
            workspace_id=workspace_id,
            run_id=run_id or f"run_{secrets.token_hex(8)}",
            inputs=values,
            actor=actor,
            stream=stream,
            on_event=on_event,
            reused=reused or {},
            recorded_attempts=recorded_attempts or {},
        )
        started = self._clock()
        failed = await self._schedule(run)
        results = {b: run.results[b] for b in workflow.order}
        outputs: dict[str, Any] = {}
        for block in workflow.output_blocks:
            result = results[block.id]
            if result.status is BlockStatus.COMPLETED and result.output is not None:
                outputs[block.id] = (
                    result.output["value"] if block.value is not None else result.output["fields"]
                )
        error = None
        if failed is not None:
            error = f"block {failed.block_id!r} failed: {failed.error}"
        return RunResult(
            run_id=run.run_id,
            workflow=workflow.name,
            workflow_version=workflow.version,
            workspace_id=workspace_id,
            status=RunStatus.FAILED if failed is not None else RunStatus.COMPLETED,
            blocks=results,
            outputs=outputs,
            error=error,
            latency=self._clock() - started,
        )

    async def _check_run_id(
        self, workflow: Workflow, workspace_id: str, run_id: str, replay: RunResult | None
    ) -> tuple[dict[str, BlockResult], dict[str, int]]:
        """What a replay takes as it was, and the attempts already recorded per block; or
        :class:`RunIdInUse` for an id with recorded calls and no replay, or another workspace's."""
        recorded = await self._hook(self.pm.hook.byok_recorded_calls, run_id=run_id) or ()
        if any(call.workspace_id != workspace_id for call in recorded):
            raise RunIdInUse(
                f"run id {run_id!r} is already used by another workspace: give workspace "
                f"{workspace_id!r} a run id of its own"
            )
        if replay is not None and (
            replay.run_id != run_id
            or replay.workspace_id != workspace_id
            or replay.workflow != workflow.name
        ):
            raise ValueError(
                "replay= must be the earlier result of the same run id, workspace and workflow"
            )
        if recorded and replay is None:
            raise RunIdInUse(
                f"run id {run_id!r} already has {len(recorded)} recorded calls in workspace "
                f"{workspace_id!r}: give a new run id, or replay that run with its earlier result "
                "(its completed calls are not made again)"
            )
        attempts: dict[str, int] = {}
        for call in recorded:
            if call.block_id is not None:
                attempts[call.block_id] = max(attempts.get(call.block_id, 0), call.attempt)
        reused = {}
        if replay is not None:
            # a block is taken as it was only when the ledger holds every call it reports: the
            # run's result then adds up to what was recorded, and a result from elsewhere (another
            # store, an edited file) cannot skip a call that was never made here
            keys = {call.idempotency_key for call in recorded}
            for block_id, result in replay.blocks.items():
                block = workflow.blocks.get(block_id)
                if (
                    isinstance(block, AgentBlock | ToolBlock)
                    and result.status is BlockStatus.COMPLETED
                    and result.calls
                    and all(call.idempotency_key in keys for call in result.calls)
                ):
                    reused[block_id] = result
        return reused, attempts

    def hooks_in_thread(self) -> bool:
        """Whether the hooks are called in a worker thread: ``options.hooks_in_thread``, else
        whether an implementation of :data:`RUN_HOOKS` may block (decided again when the
        manager's plugins change)."""
        if self.options.hooks_in_thread is not None:
            return self.options.hooks_in_thread
        plugins = self.pm.get_plugins()
        if self._threading is None or self._threading[0] != plugins:
            blocking = blocking_implementations(self.pm, RUN_HOOKS)
            if blocking:
                log.debug("hooks called in a worker thread: these may block: %s", blocking)
            self._threading = (plugins, bool(blocking))
        return self._threading[1]

    def _needs_thread(self, workflow: Workflow) -> bool:
        """Whether the preflight will call a hook (a model not yet in the cache)."""
        if not self.hooks_in_thread():
            return False
        for block in workflow.blocks.values():
            if isinstance(block, AgentBlock) and (block.provider, block.model) not in self._known:
                return True
            if isinstance(block, ToolBlock | AgentBlock):
                tools = (
                    [block.tool] if isinstance(block, ToolBlock) else [t.type for t in block.tools]
                )
                if any(TOOL_PROVIDERS[t] not in self._known for t in tools):
                    return True
        return False

    async def _schedule(self, run: _Run) -> BlockResult | None:
        """Start each block when its predecessors are done; the first failed block, if any."""
        workflow = run.workflow
        waiting = {b: len(workflow.incoming[b]) for b in workflow.blocks}
        ready = collections.deque(b for b in workflow.order if waiting[b] == 0)
        done: asyncio.Queue[tuple[str, asyncio.Task[BlockResult]]] = asyncio.Queue()
        tasks: dict[str, asyncio.Task[BlockResult]] = {}
        failed: BlockResult | None = None

        def release(block_id: str) -> None:
            for edge in workflow.outgoing[block_id]:
                waiting[edge.target] -= 1
                if waiting[edge.target] == 0:
                    ready.append(edge.target)

        try:
            while True:
                while ready and failed is None:
                    block_id = ready.popleft()
                    if not self._activated(run, block_id):
                        skipped = _skipped(workflow.blocks[block_id], "on a branch not taken")
                        run.results[block_id] = skipped
                        run.emit("finished", block_id, skipped.type, result=skipped)
                        release(block_id)
                        continue
                    if not ready and not tasks:
                        # the only block that can run now: awaited here, without a task and a
                        # trip through the queue (a one-block run, or a chain of blocks)
                        result = await self._run_block(run, workflow.blocks[block_id])
                        failed = self._finished(run, block_id, result, failed, release)
                        continue
                    task = asyncio.create_task(self._run_block(run, workflow.blocks[block_id]))
                    task.add_done_callback(lambda t, b=block_id: done.put_nowait((b, t)))
                    tasks[block_id] = task
                if not tasks:
                    break
                block_id, task = await done.get()
                del tasks[block_id]
                failed = self._finished(run, block_id, task.result(), failed, release)
        finally:
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        if failed is not None:
            for block_id in workflow.order:
                if block_id not in run.results:
                    skipped = _skipped(
                        workflow.blocks[block_id], f"not started: block {failed.block_id!r} failed"
                    )
                    run.results[block_id] = skipped
                    run.emit("finished", block_id, skipped.type, result=skipped)
        return failed

    @staticmethod
    def _finished(
        run: _Run,
        block_id: str,
        result: BlockResult,
        failed: BlockResult | None,
        release: Callable[[str], None],
    ) -> BlockResult | None:
        """Keep a finished block's result; the run's first failed block so far."""
        run.results[block_id] = result
        run.emit("finished", block_id, result.type, result=result)
        if result.status is BlockStatus.FAILED:
            return failed or result
        release(block_id)
        return failed

    def _activated(self, run: _Run, block_id: str) -> bool:
        incoming = run.workflow.incoming[block_id]
        if not incoming:
            return True
        for edge in incoming:
            source = run.results[edge.source]
            if source.status is not BlockStatus.COMPLETED:
                continue
            branch = (
                source.output.get("result")
                if source.type == "condition" and source.output
                else None
            )
            if edge.follows(branch):
                return True
        return False

    # --- one block -------------------------------------------------------------------------------
    async def _run_block(self, run: _Run, block: Block) -> BlockResult:
        earlier = run.reused.get(block.id)
        if earlier is not None:  # a replay: its calls completed and are recorded
            return earlier
        run.emit("started", block.id, block.type)
        recorded = run.recorded_attempts.get(block.id, 0)
        started = self._clock()
        calls: list[CallResult] = []
        provider, model = _target(block)
        attempts = 0
        max_attempts = 1
        if isinstance(block, AgentBlock | ToolBlock):
            retries = block.retries if block.retries is not None else self.options.block_retries
            max_attempts = 1 + retries
        # the provider clients' waits before a retry, told as this block's events
        listening = retry_listener.set(functools.partial(run.emit_wait, block.id, block.type))
        try:
            while True:
                attempts += 1
                try:
                    output = await self._execute(run, block, recorded + attempts, calls)
                    break
                except (BlockFailed, *_TRANSIENT) as exc:
                    if isinstance(exc, BlockFailed) and exc.call is not None:
                        calls.append(exc.call)  # completed: the result must carry its usage
                    retryable = exc.retryable if isinstance(exc, BlockFailed) else True
                    if not retryable or attempts >= max_attempts:
                        raise
                    text = run.redact(str(exc))
                    log.info(
                        "block %s attempt %d failed, trying again: %s", block.id, attempts, text
                    )
                    run.emit("retrying", block.id, block.type, text=text)
        except (BlockFailed, ProviderError, UnsupportedRequest, ByokError, RenderError) as exc:
            return BlockResult(
                block.id,
                block.type,
                BlockStatus.FAILED,
                calls=tuple(calls),
                error=run.redact(str(exc)),
                latency=self._clock() - started,
                attempts=attempts,
                provider=provider,
                model=model,
            )
        except Exception as exc:  # a hook or client bug must fail the run, not crash the engine
            # the traceback, redacted: a hook's exception text may quote a key
            log.error(
                "block %s failed unexpectedly:\n%s",
                block.id,
                run.redact("".join(traceback.format_exception(exc))),
            )
            return BlockResult(
                block.id,
                block.type,
                BlockStatus.FAILED,
                calls=tuple(calls),
                error=run.redact(f"unexpected {type(exc).__name__}: {exc}"),
                latency=self._clock() - started,
                attempts=attempts,
                provider=provider,
                model=model,
            )
        finally:
            retry_listener.reset(listening)
        return BlockResult(
            block.id,
            block.type,
            BlockStatus.COMPLETED,
            output=output,
            calls=tuple(calls),
            latency=self._clock() - started,
            attempts=attempts,
            provider=provider,
            model=model,
        )

    async def _execute(
        self, run: _Run, block: Block, attempt: int, calls: list[CallResult]
    ) -> Mapping[str, Any]:
        if isinstance(block, InputBlock):
            return {name: run.inputs[name] for name in block.fields}
        if isinstance(block, ConditionBlock):
            text = block.value.render(run.lookup)
            result = block.test(text)
            return {"result": result, "value": text, "content": "true" if result else "false"}
        if isinstance(block, OutputBlock):
            if block.value is not None:
                value = block.value.evaluate(run.lookup)
                return {"value": value, "content": to_text(value)}
            fields = {name: t.evaluate(run.lookup) for name, t in block.fields.items()}
            return {"fields": fields, "content": to_text(fields)}
        if isinstance(block, ToolBlock):
            query = block.query.render(run.lookup).strip()
            if not query:
                raise BlockFailed("the search query is empty once its references are filled")
            hits, call = await self._search(
                run,
                block.id,
                attempt,
                1,
                query,
                block.num_results,
                block.search_type,
                block.include_text,
                block.key,
            )
            calls.append(call)
            return {"results": [_hit_dict(h) for h in hits.hits], "content": _hits_text(hits.hits)}
        assert isinstance(block, AgentBlock)
        return await self._agent(run, block, attempt, calls)

    async def _agent(
        self, run: _Run, block: AgentBlock, attempt: int, calls: list[CallResult]
    ) -> Mapping[str, Any]:
        system = block.system.render(run.lookup) if block.system is not None else None
        prompt = block.prompt.render(run.lookup)
        stream = run.stream if run.stream is not None else block.stream
        client = self.clients[block.provider]
        search: AgentTool | None = next((t for t in block.tools if t.type == EXA_TOOL), None)
        messages: list[Message] = [Message("user", prompt)]
        seq = 0
        rounds = block.max_tool_rounds if search is not None else 0
        result: CompletionResult | None = None
        for round_no in range(rounds + 1):
            tool_choice = None
            if search is not None:
                if round_no == rounds:
                    tool_choice = "none"
                elif round_no == 0 and search.required:
                    tool_choice = "required"
                else:
                    tool_choice = "auto"
            request = CompletionRequest(
                model=block.model,
                messages=tuple(messages),
                system=system,
                temperature=block.temperature,
                max_output_tokens=block.max_tokens,
                response_schema=block.response_schema,
                schema_name=_schema_name(block.id),
                tools=((_SEARCH_FUNCTION,) if search is not None else ())
                + ((WebSearchTool(block.web_search.max_uses),) if block.web_search else ()),
                tool_choice=tool_choice,
            )
            seq += 1

            def invoke(
                api_key: str, request: CompletionRequest = request
            ) -> Awaitable[CompletionResult]:
                if stream:
                    return client.complete_streamed(
                        request,
                        api_key=api_key,
                        on_text=lambda text: run.emit("text", block.id, "agent", text=text),
                    )
                return client.complete(request, api_key=api_key)

            worst = Usage(
                block.provider,
                block.model,
                input_tokens=_input_bound(request),
                output_tokens=block.max_tokens or self.options.budget_output_tokens,
                tool_uses=tuple(
                    (WEB_SEARCH_TOOLS[block.provider], t.max_uses or 1)
                    for t in request.tools
                    if isinstance(t, WebSearchTool)
                ),
            )
            result, call = await self._call(
                run,
                block.id,
                attempt,
                seq,
                block.provider,
                block.model,
                block.key,
                stream,
                invoke,
                worst,
            )
            calls.append(call)
            if not result.tool_calls or search is None:
                break
            messages.append(Message("assistant", result.content, tool_calls=result.tool_calls))
            for tool_call in result.tool_calls:
                query = _query_of(tool_call.arguments) or prompt
                seq += 1
                hits, call = await self._search(
                    run, block.id, attempt, seq, query, search.num_results, "auto", True, search.key
                )
                calls.append(call)
                messages.append(
                    Message(
                        "tool",
                        _hits_text(hits.hits) or "no results",
                        tool_call_id=tool_call.id,
                        name=tool_call.name,
                    )
                )
        assert result is not None
        output: dict[str, Any] = {
            "content": result.content,
            "model": result.model or block.model,
            "provider": block.provider,
            "finish_reason": result.finish_reason,
        }
        if block.response_schema is not None:
            output["json"] = _structured(block, result)
        return output

    async def _search(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        query: str,
        num_results: int,
        search_type: str,
        include_text: bool,
        key: KeyRef | None,
    ) -> tuple[SearchResult, CallResult]:
        provider, tool = TOOL_PROVIDERS[EXA_TOOL]
        client = self.clients[provider]
        request = SearchRequest(
            query=query[:2000],
            num_results=num_results,
            search_type=search_type,
            include_text=include_text,
            max_characters=1500 if include_text else None,
        )

        def invoke(api_key: str) -> Awaitable[SearchResult]:
            return client.search(request, api_key=api_key)

        worst = Usage(provider, tool, tool_requests=1)
        return await self._call(
            run, block_id, attempt, seq, provider, tool, key, False, invoke, worst
        )

    # --- one provider call: resolve, call, charge, record ---------------------------------------
    async def _call(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        provider: str,
        model: str,
        key: KeyRef | None,
        stream: bool,
        invoke: Callable[[str], Awaitable[Any]],
        worst: Usage | None = None,
    ) -> tuple[Any, CallResult]:
        """:meth:`_call_held`, whose budget hold is released if the call does not complete."""
        idempotency_key = _call_key(run.run_id, block_id, attempt, seq)
        budget = _Budget(idempotency_key, run.workspace_id, run.workflow.name, run.run_id, block_id)
        budget.estimate = _estimate_of(worst)
        budget.tools = tuple(name for name, _ in worst.tool_uses) if worst is not None else ()
        if self.pm.hook.byok_reserve_budget.get_hookimpls():  # else nothing to hold it against
            budget.worst = worst
        try:
            return await self._call_held(
                run, block_id, attempt, seq, provider, model, key, stream, invoke, budget
            )
        except BaseException:
            if budget.hold is not None and not budget.settled:
                self._release_soon(budget)
            raise

    async def _call_held(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        provider: str,
        model: str,
        key: KeyRef | None,
        stream: bool,
        invoke: Callable[[str], Awaitable[Any]],
        budget: _Budget,
    ) -> tuple[Any, CallResult]:
        block_key = None
        if key is not None and key.env is not None:
            # again: the allowance was checked once per workflow, the environment may change
            refused = env_key_refusal(key.env, self.env_keys, self.environ)
            if refused:
                raise BlockFailed(refused)
            block_key = self.environ[key.env].strip()
            run.keys_used.add(block_key)
        label = key.label if key is not None else None
        request = CredentialRequest(
            workspace_id=run.workspace_id,
            provider=provider,
            model=model,
            workflow_id=run.workflow.name,
            run_id=run.run_id,
            block_id=block_id,
            block_key=block_key,
            actor=run.actor,
            stream=stream,
            key_label=label,
            tools=budget.tools,
        )
        rejected: list[Rejection] = []
        credential = await self._resolve(request, budget)
        for _ in range(self.options.max_key_rounds):
            run.keys_used.add(credential.api_key)
            try:
                async with self._limit:  # the limit holds provider calls, not the hooks around them
                    started = self._clock()
                    # the platform pays each execution: its client does not retry a maybe-run one
                    with retrying_once_sent(not credential.billed_by_platform):
                        result = await invoke(credential.api_key)
                    latency = self._clock() - started
            except ProviderError as exc:
                if not isinstance(exc, AuthError | RateLimitError):
                    await self._record_unfinished(
                        run, block_id, attempt, seq, model, credential, exc, len(rejected), budget
                    )
                    if (
                        exc.maybe_executed
                        and exc.partial_usage is None
                        and credential.billed_by_platform
                    ):
                        raise BlockFailed(
                            f"the {provider} call on the platform key may have been executed by "
                            f"the provider without an answer ({exc}); it is recorded 'uncertain' "
                            f"and not tried again"
                        ) from None
                    # a workspace key whose provider failed after the client's own retries (5xx,
                    # timeout, unreachable): resolution decides, with reason 'error' (on_error)
                    if not (
                        credential.is_byok
                        and isinstance(exc, _ASK_AGAIN_ON_ERROR)
                        and exc.partial_usage is None
                    ):
                        raise
                refused = _refusal(run, provider, credential, exc)
                rejected.append(
                    Rejection(
                        source=credential.source,
                        hint=credential.hint,
                        key_id=credential.key_id,
                        status=exc.status,
                        reason=exc.kind,
                    )
                )
                failure = ProviderFailure(
                    reason=FailureReason.AUTH
                    if isinstance(exc, AuthError)
                    else FailureReason.RATE_LIMIT
                    if isinstance(exc, RateLimitError)
                    else FailureReason.ERROR,
                    source=credential.source,
                    key_id=credential.key_id,
                    status=exc.status,
                    retry_after=exc.retry_after if isinstance(exc, RateLimitError) else None,
                )
                try:
                    following = await self._resolve_hook(replace(request, failure=failure))
                except ByokError as policy:
                    if failure.reason is FailureReason.ERROR:
                        # no fallback: the provider's own (transient) error stands, and the
                        # block may be tried again as before
                        raise exc from None
                    raise BlockFailed(f"{refused}; {policy}") from None
                if following is None:
                    if failure.reason is FailureReason.ERROR:
                        raise exc from None
                    raise BlockFailed(f"{refused}; no other key may serve the call") from None
                _check_labelled(request, following)
                if any(
                    r.source is following.source
                    and r.key_id == following.key_id
                    and r.hint == following.hint
                    for r in rejected
                ):
                    raise BlockFailed(
                        f"{refused}; the fallback policy offered the same key again"
                    ) from None
                credential = following
                if budget.worst is not None:  # held again: a budget may apply to this key only
                    await self._reserve(credential, budget)
                continue
            except asyncio.CancelledError as exc:  # a stream cut by the run's cancellation
                partial = getattr(exc, "partial_usage", None)
                if isinstance(partial, Usage):
                    self._start_recording_unfinished(
                        run,
                        block_id,
                        attempt,
                        seq,
                        model,
                        credential,
                        partial,
                        "interrupted",
                        0,
                        budget,
                    )
                raise
            break
        else:
            raise BlockFailed(
                f"workspace {run.workspace_id!r}: {provider} refused {len(rejected)} keys in a row; giving up"
            )
        idempotency_key = budget.idempotency_key
        # charged and recorded under the model resolution was asked about (and, for a platform
        # key, checked the price of), not the name the provider answered with: providers answer
        # with dated snapshots (gpt-4o-mini-2024-07-18) or versions (mistral-large-2411) that a
        # price table need not list. The reply's name stays in the block's output ("model").
        usage: Usage = result.usage
        if usage.model != model:
            usage = replace(usage, model=model)

        make_record = _recorder(run, block_id, attempt, idempotency_key, usage, credential)

        settle = None
        if budget.hold is not None and self.hooks_in_thread():
            # the recording job settles it with the charge: a cancelled run must not release it
            budget.settled = True
            settle = functools.partial(self._settlement, budget, credential)
        if self.hooks_in_thread() and self.options.group_commit:
            # charged, recorded and settled with the calls that finish meanwhile, by the
            # runner's writer, which a cancelled run does not stop
            charge, record, error, charge_error = await self._group_settle(
                (usage, credential, make_record, settle)
            )
        elif self.hooks_in_thread():
            # charge, record, budget settlement and any retries of the record in one job in a
            # worker thread, which a cancelled run does not stop
            charge, record, error, charge_error = await self._recording_job(
                self._settle_and_retry, usage, credential, make_record, settle
            )
        else:
            with calling_inline():
                charge, record, error, charge_error = self._settle(usage, credential, make_record)
            # settled before the record's retries are awaited (a cancelled run would stop there)
            if budget.hold is not None:
                await self._settle_budget(budget, charge, credential)
            if error is not None:
                error = await self._record_again(record, error, credential.api_key)
        call = CallResult(
            provider=provider,
            model=model,
            source=credential.source,
            key_id=credential.key_id,
            hint=credential.hint,
            fallback=credential.fallback,
            usage=usage,
            charge=charge,
            latency=latency,
            attempt=attempt,
            idempotency_key=idempotency_key,
            streamed=stream,
            rejected=tuple(rejected),
            recorded=error is None,
            record=record,
        )
        if error is not None:
            # the call completed: the result carries its usage and charge, for the host to
            # re-submit (CallResult.recorded is False)
            raise BlockFailed(
                f"the {provider} call completed but its usage could not be recorded "
                f"({type(error).__name__}: {redact(str(error), credential.api_key)})",
                call=call,
            )
        if charge_error is not None:
            raise BlockFailed(
                f"the {provider} call completed but byok_compute_charge failed "
                f"({type(charge_error).__name__}: {charge_error}); it is recorded uncharged, "
                f"with reason {CHARGE_FAILED!r}",
                call=call,
            )
        return result, call

    async def _record_unfinished(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        model: str,
        credential: Credential,
        exc: ProviderError,
        round_no: int = 0,
        budget: _Budget | None = None,
    ) -> None:
        """The row of a call that failed after the provider may have acted on it: ``interrupted``
        (a stream that broke after it started: what the provider is known to bill, charged as
        any call) or ``uncertain`` (sent, no answer: not charged, for reconciliation). A failure
        the provider certainly did not act on leaves no row. Never raises: the call's own error
        is what the block reports.

        An interrupted call takes the key the completed call would have had (the block is tried
        again under the next attempt's); an uncertain one adds ``:uncertain:<round>``, because
        another key may still complete the same call under the call's own key (``on_error``).
        An interrupted call settles ``budget`` with its charge (it is spent, as a completed
        call's); an uncertain one leaves the hold to be released (it is charged nothing)."""
        if exc.partial_usage is not None:
            usage, status = exc.partial_usage, "interrupted"
        elif exc.maybe_executed:
            usage, status = Usage(provider=exc.provider, model=model), "uncertain"
        else:
            return
        job = self._start_recording_unfinished(
            run, block_id, attempt, seq, model, credential, usage, status, round_no, budget
        )
        with contextlib.suppress(Exception):
            await asyncio.shield(job)

    def _start_recording_unfinished(
        self,
        run: _Run,
        block_id: str,
        attempt: int,
        seq: int,
        model: str,
        credential: Credential,
        usage: Usage,
        status: str,
        round_no: int = 0,
        budget: _Budget | None = None,
    ) -> asyncio.Future[Any]:
        """Charge and record an unfinished call in a worker thread, as a job a cancelled run does
        not stop and :meth:`drain` waits for; under the key the completed call would have had."""
        idempotency_key = _call_key(run.run_id, block_id, attempt, seq)
        if status == "uncertain":
            idempotency_key += f":uncertain:{round_no}"
        estimated: tuple[str, ...] = ()
        estimate = budget.estimate if budget is not None else None
        if status == "uncertain" and estimate is not None:
            # not charged, but its estimated input's list cost is kept for reconciliation
            usage = estimate
            estimated = tuple(name for name in USAGE_COUNTS if getattr(estimate, name))
        elif (
            status == "interrupted"
            and not usage.input_tokens
            and estimate
            and estimate.input_tokens
        ):
            # an OpenAI-shaped stream reports its input only in its last chunk: estimated
            usage = replace(usage, input_tokens=estimate.input_tokens)
            estimated = ("input_tokens",)
        if usage.model != model:
            usage = replace(usage, model=model)

        make_record = _recorder(
            run, block_id, attempt, idempotency_key, usage, credential, status, estimated
        )

        settle = None
        if status == "interrupted" and budget is not None and budget.hold is not None:
            # charged as a completed call: its hold is settled with the charge, in the same job
            budget.settled = True  # so that the failing block does not release it instead
            settle = functools.partial(self._settlement, budget, credential)
        job = asyncio.get_running_loop().run_in_executor(
            None, self._settle_and_retry, usage, credential, make_record, settle
        )
        self._recording.add(job)
        job.add_done_callback(self._recording.discard)
        return job

    async def _resolve(
        self, request: CredentialRequest, budget: _Budget | None = None
    ) -> Credential:
        """The credential for the call, then its budget hold (in one trip to a worker thread when
        the hooks run there)."""
        held = budget is not None and budget.worst is not None
        if held and self.hooks_in_thread():
            credential = await self._hook(self._resolve_and_reserve, request, budget)
        else:
            credential = await self._resolve_hook(request)
            if held and credential is not None and credential.provider == request.provider:
                assert budget is not None
                await self._reserve(credential, budget)
        if credential is None:
            raise NoCredential(
                request.workspace_id,
                request.provider,
                request.model,
                "no installed plugin answered byok_resolve_credential",
            )
        if credential.provider != request.provider:
            raise BlockFailed(
                f"byok_resolve_credential answered a {credential.provider} key for a {request.provider} call"
            )
        _check_labelled(request, credential)
        return credential

    # --- budgets: hold the worst case before the call, settle the charge after it ---------------
    def _resolve_and_reserve(
        self, request: CredentialRequest, budget: _Budget
    ) -> Credential | None:
        credential: Credential | None = self.pm.hook.byok_resolve_credential(request=request)
        if credential is not None and credential.provider == request.provider:
            self._reserve_now(credential, budget)
        return credential

    def _reserve_now(self, credential: Credential, budget: _Budget) -> None:
        """``byok_reserve_budget`` of the call's worst case, priced by ``byok_compute_charge``;
        raises ``BudgetExceeded`` when it does not fit."""
        assert budget.worst is not None
        estimate = self.pm.hook.byok_compute_charge(usage=budget.worst, credential=credential)
        amount = estimate.amount if estimate is not None else Decimal(0)
        list_cost = estimate.list_cost if estimate is not None else None
        budget.hold = self.pm.hook.byok_reserve_budget(
            reservation=BudgetReservation(
                idempotency_key=budget.idempotency_key,
                workspace_id=budget.workspace_id,
                provider=credential.provider,
                model=budget.worst.model,
                source=credential.source,
                amount=amount,
                list_cost=list_cost or Decimal(0),
                hold_seconds=self.options.budget_hold_seconds,
                key_id=credential.key_id,
                workflow_id=budget.workflow_id,
                run_id=budget.run_id,
                block_id=budget.block_id,
            )
        )

    async def _resolve_hook(self, request: CredentialRequest) -> Credential | None:
        """``byok_resolve_credential``: on the event loop when :data:`RESOLVE_HOOKS` do not block
        (asked at each call: a declaration may change, as the default plugin's does when its
        PostgreSQL listener connects or drops), else as :meth:`_hook` decides."""
        if (
            self.hooks_in_thread()
            and self.options.hooks_in_thread is None
            and not blocking_implementations(self.pm, RESOLVE_HOOKS)
        ):
            with calling_inline():
                credential: Credential | None = self.pm.hook.byok_resolve_credential(
                    request=request
                )
                return credential
        return await self._hook(self.pm.hook.byok_resolve_credential, request=request)

    async def _reserve(self, credential: Credential, budget: _Budget) -> None:
        """:meth:`_reserve_now`; on the event loop, a failure other than a refusal (a SQLite
        store locked by another writer) is tried once more in a worker thread, where it waits."""
        if self.hooks_in_thread():
            await self._hook(self._reserve_now, credential, budget)
            return
        try:
            with calling_inline():
                self._reserve_now(credential, budget)
        except Exception as exc:
            if isinstance(exc, ByokError) and not _store_trouble(exc):
                raise  # a decision (the budget refuses the call), not a store that did not answer
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._reserve_now, credential, budget)

    async def _settle_budget(self, budget: _Budget, charge: Charge, credential: Credential) -> None:
        """``byok_settle_budget`` of what the completed call was charged. A settlement that keeps
        failing is logged, not raised: the call is done and recorded, and its hold lapses."""
        budget.settled = True  # from here on, a cancelled run must not release the hold instead
        settlement = self._settlement(budget, credential, charge)
        if not self.hooks_in_thread():
            try:
                with calling_inline():
                    self.pm.hook.byok_settle_budget(settlement=settlement)
                return
            except Exception as exc:
                log.info(
                    "settling budget of %s on the loop failed: %s", settlement.idempotency_key, exc
                )
        await self._recording_job(self._settle_budget_now, settlement)

    @staticmethod
    def _settlement(budget: _Budget, credential: Credential, charge: Charge) -> BudgetSettlement:
        """The settlement of a call that was charged ``charge`` (a completed or interrupted one)."""
        return BudgetSettlement(
            idempotency_key=budget.idempotency_key,
            workspace_id=budget.workspace_id,
            amount=charge.amount,
            list_cost=charge.list_cost or Decimal(0),
            source=credential.source,
        )

    def _release_soon(self, budget: _Budget) -> None:
        """Release the hold of a call that did not complete, in a worker thread (not awaited: the
        block is failing or its run is cancelled)."""
        budget.settled = True
        settlement = BudgetSettlement(
            idempotency_key=budget.idempotency_key,
            workspace_id=budget.workspace_id,
            amount=Decimal(0),
            completed=False,
        )
        job = asyncio.get_running_loop().run_in_executor(None, self._settle_budget_now, settlement)
        self._recording.add(job)
        job.add_done_callback(self._recording.discard)

    def _settle_budget_now(self, settlement: BudgetSettlement) -> None:
        """``byok_settle_budget`` with up to ``record_attempts`` tries (idempotent), in a worker
        thread; the last failure is logged (the hold then lapses at its expiry)."""
        tries = max(self.options.record_attempts, 2)
        for attempt in range(1, tries + 1):
            try:
                self.pm.hook.byok_settle_budget(settlement=settlement)
                return
            except Exception as exc:
                if attempt == tries:
                    log.error(
                        "the budget hold of call %s of workspace %r is not settled after %d "
                        "tries (it lapses at its expiry): %s: %s",
                        settlement.idempotency_key,
                        settlement.workspace_id,
                        tries,
                        type(exc).__name__,
                        exc,
                    )
                    return
                time.sleep(0.05 * 2 ** (attempt - 1))

    async def _group_settle(self, item: _Settling) -> _Settled:
        """Hand a completed call to the runner's writer and wait for its group to be recorded
        (no thread held meanwhile). The writer takes everything that waits, charges and records
        it as one group in one worker-thread job, and takes what came meanwhile next: calls that
        finish together are committed together, with no timer. A cancelled run does not stop
        the writer (the call has completed: its usage must land); :meth:`drain` waits for it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_Settled] = loop.create_future()
        self._group.append((item, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_groups())
            self._recording.add(self._writer)
            self._writer.add_done_callback(self._recording.discard)
        return await asyncio.shield(done)

    async def _write_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while self._group:
            group, self._group = self._group, []
            try:
                settled = await loop.run_in_executor(
                    None, self._settle_group, [item for item, _ in group]
                )
            except BaseException as exc:  # pragma: no cover - _settle_group catches hook errors
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, done), result in zip(group, settled, strict=True):
                if not done.done():
                    done.set_result(result)

    def _settle_group(self, items: list[_Settling]) -> list[_Settled]:
        """:meth:`_settle_and_retry` for a group of calls (in a worker thread): every charge, then
        ``byok_record_usage_batch`` for all the records (and ``byok_record_usage`` for each on
        the plugins without the batch form); a record that fails is tried again on its own."""
        charged = [self._charge(usage, credential) for usage, credential, _, _ in items]
        records = [
            make_record(charge)
            for (_, _, make_record, _), (charge, _) in zip(items, charged, strict=True)
        ]
        # each call's own budget hold, settled with its own charge: in the group's transaction
        # when one plugin records and settles (byok_record_usage_and_settle), else one by one
        settlements = [
            settle(charge) if settle is not None else None
            for (_, _, _, settle), (charge, _) in zip(items, charged, strict=True)
        ]
        errors, together = self._record_group(records, [s for s in settlements if s is not None])
        settled: list[_Settled] = []
        for (_, credential, _, _), (charge, charge_error), record, error, settlement in zip(
            items, charged, records, errors, settlements, strict=True
        ):
            if settlement is not None and not together:
                self._settle_budget_now(settlement)
            if error is not None:
                error = self._record_retries(
                    record, error, self.options.record_attempts - 1, (credential.api_key,)
                )
            settled.append((charge, record, error, charge_error))
        return settled

    def _record_group(
        self, records: list[UsageRecord], settlements: list[BudgetSettlement]
    ) -> tuple[list[Exception | None], bool]:
        """Record a group: the batch form on the plugins that implement it, the single form on
        the others, record by record. If a batch implementation raises, no record of the group
        is taken as recorded: every plugin is asked again, record by record (idempotent).

        With ``settlements``, and one plugin that implements ``byok_record_usage_and_settle``
        and is the only one settling budgets, that plugin records and settles in one
        transaction. :returns: each record's error, and whether the settlements were made."""
        batch = getattr(self.pm.hook, "byok_record_usage_batch", None)
        batch_plugins = [impl.plugin for impl in batch.get_hookimpls()] if batch is not None else []
        single = self.pm.hook.byok_record_usage
        together = self._record_and_settle(records, settlements) if settlements else None
        if together is not None:  # the others still get every record, in their own form
            batch_plugins = [p for p in batch_plugins if p is not together]
            if batch_plugins:
                batch = self.pm.subset_hook_caller(
                    "byok_record_usage_batch", remove_plugins=[together]
                )
            single = self.pm.subset_hook_caller("byok_record_usage", remove_plugins=[together])
        if batch_plugins:
            try:
                batch(records=records)
            except Exception as exc:
                log.warning(
                    "recording a group of %d calls failed (%s); recording them one by one",
                    len(records),
                    type(exc).__name__,
                )
            else:
                single = self.pm.subset_hook_caller(
                    "byok_record_usage",
                    remove_plugins=batch_plugins + ([together] if together is not None else []),
                )
        errors: list[Exception | None] = []
        for record in records:
            try:
                single(record=record)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors, together is not None

    def _record_and_settle(
        self, records: list[UsageRecord], settlements: list[BudgetSettlement]
    ) -> object | None:
        """``byok_record_usage_and_settle`` when one plugin implements it and is the only one
        settling budgets; :returns: that plugin when it recorded and settled the group."""
        hook = getattr(self.pm.hook, "byok_record_usage_and_settle", None)
        if hook is None:
            return None
        plugins = [impl.plugin for impl in hook.get_hookimpls()]
        settling = [impl.plugin for impl in self.pm.hook.byok_settle_budget.get_hookimpls()]
        if len(plugins) != 1 or settling != plugins:
            return None
        try:
            done = hook(records=records, settlements=settlements)
        except Exception as exc:
            log.warning(
                "recording and settling a group of %d calls together failed (%s); doing both "
                "separately",
                len(records),
                type(exc).__name__,
            )
            return None
        return plugins[0] if done else None

    def _charge(self, usage: Any, credential: Credential) -> tuple[Charge, Exception | None]:
        """``byok_compute_charge``; a charge that fails is 0 with reason ``charge_failed``."""
        try:
            charge = self.pm.hook.byok_compute_charge(usage=usage, credential=credential)
        except Exception as exc:
            return Charge(amount=Decimal(0), reason=CHARGE_FAILED), exc
        if charge is None:
            charge = Charge(amount=Decimal(0), reason="no billing plugin answered")
        return charge, None

    def _settle(
        self, usage: Any, credential: Credential, make_record: Callable[[Charge], UsageRecord]
    ) -> tuple[Charge, UsageRecord, Exception | None, Exception | None]:
        """``byok_compute_charge`` then ``byok_record_usage``. The call has completed, so it is
        recorded whatever happens: a charge that fails is recorded as 0 with reason
        ``charge_failed`` (and the block fails), a record that fails is returned to be tried
        again."""
        charge_error: Exception | None = None
        try:
            charge = self.pm.hook.byok_compute_charge(usage=usage, credential=credential)
        except Exception as exc:
            charge_error = exc
            charge = Charge(amount=Decimal(0), reason=CHARGE_FAILED)
        if charge is None:
            charge = Charge(amount=Decimal(0), reason="no billing plugin answered")
        record = make_record(charge)
        try:
            self.pm.hook.byok_record_usage(record=record)
        except Exception as exc:
            return charge, record, exc, charge_error
        return charge, record, None, charge_error

    def _settle_and_retry(
        self,
        usage: Any,
        credential: Credential,
        make_record: Callable[[Charge], UsageRecord],
        settle: Callable[[Charge], BudgetSettlement] | None = None,
    ) -> tuple[Charge, UsageRecord, Exception | None, Exception | None]:
        """:meth:`_settle`, then the budget settlement ``settle`` makes of the charge, then the
        record's remaining tries (in a worker thread): the error returned is the last one, once
        every try has failed."""
        charge, record, error, charge_error = self._settle(usage, credential, make_record)
        if settle is not None:
            self._settle_budget_now(settle(charge))
        if error is not None:  # with no tries left, this only logs it (no one may be waiting)
            error = self._record_retries(
                record, error, self.options.record_attempts - 1, (credential.api_key,)
            )
        return charge, record, error, charge_error

    async def _record_again(
        self, record: UsageRecord, error: Exception, api_key: str
    ) -> Exception | None:
        """``byok_record_usage`` tried again after ``error`` on the event loop, in a worker
        thread: an implementation that gave up at once rather than stall the loop (a SQLite store
        locked by another writer) waits there as long as it must, so a failure on the loop always
        gets one try off it. The tries run as one job that goes on if the run
        is cancelled meanwhile (the call has completed: its usage must land). The ledger is
        idempotent on the record's key, so a write that did land before an error is not
        doubled. The last error, or ``None`` once a try succeeded."""
        tries = max(self.options.record_attempts - 1, 1)
        return await self._recording_job(self._record_retries, record, error, tries, (api_key,))

    async def _recording_job(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread, as a job that a cancelled run does not stop (the call
        has completed: its usage must land) and that :meth:`drain` waits for."""
        job = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._recording.add(job)
        job.add_done_callback(self._recording.discard)
        return await asyncio.shield(job)

    def _record_retries(
        self, record: UsageRecord, error: Exception, tries: int, keys: tuple[str, ...] = ()
    ) -> Exception | None:
        """Up to ``tries`` more ``byok_record_usage`` calls, backing off; the last error, or
        ``None`` once one succeeds. Runs in a worker thread. The errors are logged redacted of
        ``keys`` (the call's)."""
        last = error
        for attempt in range(1, tries + 1):
            log.warning(
                "recording %s failed (try %d): %s",
                record.idempotency_key,
                attempt,
                redact(str(last), *keys),
            )
            time.sleep(0.05 * 2 ** (attempt - 1))
            try:
                self.pm.hook.byok_record_usage(record=record)
                return None
            except Exception as exc:
                last = exc
        # said here, not only by the block's error: a cancelled run no longer awaits this job
        log.error(
            "the completed %s call %s of workspace %r is not recorded after %d tries: %s: %s",
            record.usage.provider,
            record.idempotency_key,
            record.workspace_id,
            tries + 1,
            type(last).__name__,
            redact(str(last), *keys),
        )
        return last

    async def _hook(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a (synchronous) hook, in the loop's default executor unless the hooks do not
        block (:meth:`hooks_in_thread`); inline, the call is marked as made on the event loop
        (:func:`byok_hookspecs.calling_inline`), so that an implementation gives up rather than
        wait."""
        if self.hooks_in_thread():
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        with calling_inline():
            return fn(*args, **kwargs)


# --- helpers -------------------------------------------------------------------------------------


def _call_key(run_id: str, block_id: str, attempt: int, seq: int) -> str:
    """A provider call's idempotency key: ``run:block:attempt``, and ``:seq`` for a block's
    second and later calls in one attempt."""
    return f"{run_id}:{block_id}:{attempt}" + (f":{seq}" if seq > 1 else "")


def _recorder(
    run: _Run,
    block_id: str,
    attempt: int,
    idempotency_key: str,
    usage: Usage,
    credential: Credential,
    status: str = "complete",
    estimated: tuple[str, ...] = (),
) -> Callable[[Charge], UsageRecord]:
    """What makes a call's :class:`UsageRecord` of its charge; an ``uncertain`` call is recorded
    uncharged (for reconciliation)."""

    def make_record(charge: Charge) -> UsageRecord:
        if status == "uncertain":
            charge = replace(charge, amount=Decimal(0), reason="uncertain")
        return UsageRecord(
            idempotency_key=idempotency_key,
            workspace_id=run.workspace_id,
            usage=usage,
            charge=charge,
            source=credential.source,
            key_id=credential.key_id,
            fallback=credential.fallback,
            workflow_id=run.workflow.name,
            run_id=run.run_id,
            block_id=block_id,
            attempt=attempt,
            status=status,
            estimated=estimated,
        )

    return make_record


def _check_labelled(request: CredentialRequest, credential: Credential) -> None:
    """A block that names a stored key by label runs on a workspace key, or not at all: never on
    a platform key (billed) or another block's key, whatever the installed plugins answer."""
    if request.key_label is not None and credential.source not in (
        CredentialSource.WORKSPACE,
        CredentialSource.ORGANIZATION,
    ):
        raise BlockFailed(
            f"the block asks for the {request.provider} key labelled {request.key_label!r} of "
            f"workspace {request.workspace_id!r}, but byok_resolve_credential answered a "
            f"{credential.source.value} key; the block does not run on it"
        )


def _check_run_id_form(run_id: str) -> None:
    """:class:`RunIdInvalid` for a run id the ledger could not record calls under."""
    if (
        not isinstance(run_id, str)
        or not run_id
        or any(ord(c) < 32 or ord(c) == 127 for c in run_id)
    ):
        raise RunIdInvalid("a run id is non-empty text without control characters")
    if len(run_id) > MAX_RUN_ID:
        raise RunIdInvalid(
            f"a run id has at most {MAX_RUN_ID} characters (its calls' idempotency keys must "
            f"fit the ledger's {IDEMPOTENCY_KEY_ROOM}); this one has {len(run_id)}"
        )


@dataclass
class _Budget:
    """One provider call's budget hold, as the call goes (the worst case, the hold, whether it
    has been settled or released)."""

    idempotency_key: str
    workspace_id: str
    workflow_id: str | None
    run_id: str | None
    block_id: str | None
    worst: Usage | None = None
    hold: BudgetHold | None = None
    settled: bool = False
    #: the request's estimated input (an ``uncertain`` row's usage), whether or not budgets apply
    estimate: Usage | None = None
    #: the provider's own tools the call may use (``CredentialRequest.tools``)
    tools: tuple[str, ...] = ()


def _estimate_of(worst: Usage | None) -> Usage | None:
    """What a call sent and never answered is estimated to have used: the input bound of the
    request (as its budget hold), or, for a call priced per request (a search), the request."""
    if worst is None:
        return None
    if worst.output_tokens:
        return Usage(worst.provider, worst.model, input_tokens=worst.input_tokens)
    return Usage(worst.provider, worst.model, tool_requests=worst.tool_requests)


def _input_bound(request: CompletionRequest) -> int:
    """An upper bound of a request's input tokens: one per UTF-8 byte of its text (a token is at
    least a byte in every provider's tokenizer), with its tools and schema, and some for each
    message's framing."""
    parts: list[str] = [request.system or ""]
    for message in request.messages:
        parts.append(message.content)
        parts.extend(call.arguments + call.name for call in message.tool_calls)
    for tool in request.tools:
        if isinstance(tool, FunctionTool):
            parts.append(tool.name + tool.description + json.dumps(tool.parameters, default=dict))
    if request.response_schema is not None:
        parts.append(json.dumps(request.response_schema, default=dict))
    return sum(len(p.encode("utf-8")) for p in parts) + 16 * (len(request.messages) + 2)


def _store_trouble(exc: ByokError) -> bool:
    """Whether a hook's error is a store that did not answer (worth a try off the loop), not a
    decision (a refused budget, a missing key)."""
    return isinstance(exc, CredentialUnavailable) and not isinstance(exc, BudgetExceeded)


def _skipped(block: Block, reason: str) -> BlockResult:
    provider, model = _target(block)
    return BlockResult(
        block.id, block.type, BlockStatus.SKIPPED, reason=reason, provider=provider, model=model
    )


def _target(block: Block) -> tuple[str | None, str | None]:
    if isinstance(block, AgentBlock):
        return block.provider, block.model
    if isinstance(block, ToolBlock):
        return TOOL_PROVIDERS[block.tool]
    return None, None


def _refusal(run: _Run, provider: str, credential: Credential, exc: ProviderError) -> str:
    """Which workspace, which provider, which key (masked), and what the provider said."""
    key = credential.hint or credential.key_id or "(no hint)"
    status = f"HTTP {exc.status} " if exc.status is not None else ""
    return (
        f"workspace {run.workspace_id!r}: {provider} refused the {credential.source.value} key "
        f"{key} ({status}{exc.kind}: {exc.message})"
    )


def _schema_name(block_id: str) -> str:
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in block_id)
    return name[:64] or "response"


def _structured(block: AgentBlock, result: CompletionResult) -> Any:
    assert block.response_schema is not None
    try:
        value = json.loads(result.content)
    except ValueError:
        cut = " (the reply was cut at max_tokens)" if result.finish_reason == "length" else ""
        raise BlockFailed(
            f"the reply is not the JSON its response_schema asks for{cut}", retryable=True
        ) from None
    error = next(iter(Draft202012Validator(dict(block.response_schema)).iter_errors(value)), None)
    if error is not None:
        where = json_path(error.absolute_path)
        raise BlockFailed(
            f"the reply does not match its response_schema at {where}: {error.message[:200]}",
            retryable=True,
        )
    return value


def _query_of(arguments: str) -> str | None:
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return None
    query = parsed.get("query") if isinstance(parsed, dict) else None
    return query if isinstance(query, str) and query.strip() else None


def _hit_dict(hit: SearchHit) -> dict[str, Any]:
    return {
        "title": hit.title,
        "url": hit.url,
        "published_date": hit.published_date,
        "author": hit.author,
        "text": hit.text,
    }


def _hits_text(hits: tuple[SearchHit, ...]) -> str:
    """Search results as a model reads them: numbered, with title, URL, date and text."""
    parts = []
    for n, hit in enumerate(hits, start=1):
        lines = [f"[{n}] {hit.title or hit.url}", f"URL: {hit.url}"]
        if hit.published_date:
            lines.append(f"Published: {hit.published_date}")
        if hit.text:
            lines.append(hit.text.strip())
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
