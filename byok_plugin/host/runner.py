"""The asyncio runner of the reference host engine.

It reaches byok-plugin only through the hooks of a pluggy ``PluginManager`` (``byok_hookspecs``),
as any third-party engine would::

    async with WorkflowRunner.open(pm, environ=os.environ) as runner:
        result = await runner.run(load_workflow("triage.json"), workspace_id="acme",
                                  actor=Actor("alice", roles={"acme": Role.MEMBER}),
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

This file holds the public API, the run-id checks, the scheduler and a block's retries; the rest
of ``WorkflowRunner`` is in its bases, one responsibility each, each calling only those below it:
:mod:`~byok_plugin.host.blocks` (what each block does), :mod:`~byok_plugin.host.calls` (one
provider call), :mod:`~byok_plugin.host.recording` (charge and record),
:mod:`~byok_plugin.host.budget_holds` (budget holds), :mod:`~byok_plugin.host.hook_calls` (hook
threading, the shared state). Options, events and a run's state: :mod:`~byok_plugin.host.run_state`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import secrets
import time
import traceback
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import pluggy
from byok_hookspecs import Actor, ByokError

from byok_plugin.host.blocks import EXA_TOOL as EXA_TOOL
from byok_plugin.host.blocks import Blocks, _skipped, _target
from byok_plugin.host.env_keys import EnvKeyAllowance, env_key_problems
from byok_plugin.host.hook_calls import RESOLVE_HOOKS as RESOLVE_HOOKS
from byok_plugin.host.hook_calls import RUN_HOOKS as RUN_HOOKS
from byok_plugin.host.providers.errors import (
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    ServerError,
    UnsupportedRequest,
)
from byok_plugin.host.providers.registry import create_clients, new_http_client
from byok_plugin.host.providers.retry import RetryPolicy, retry_listener
from byok_plugin.host.recording import CHARGE_FAILED as CHARGE_FAILED
from byok_plugin.host.recording import _Settled, _Settling
from byok_plugin.host.run_result import (
    BlockResult,
    BlockStatus,
    CallResult,
    RunResult,
    RunStatus,
)
from byok_plugin.host.run_state import BlockFailed as BlockFailed
from byok_plugin.host.run_state import EventHandler as EventHandler
from byok_plugin.host.run_state import RunEvent as RunEvent
from byok_plugin.host.run_state import RunnerOptions as RunnerOptions
from byok_plugin.host.run_state import _Run
from byok_plugin.host.workflow import (
    AgentBlock,
    Block,
    Problem,
    RenderError,
    ToolBlock,
    Workflow,
    WorkflowError,
    bind_inputs,
    check_models,
    json_path,
)
from byok_plugin.host.workflow.providers import TOOL_PROVIDERS

__all__ = [
    "BlockFailed",
    "RunEvent",
    "RunIdInUse",
    "RunIdInvalid",
    "RunnerOptions",
    "WorkflowRunner",
]

log = logging.getLogger("byok.host.runner")  # one logger for the whole runner

#: the longest idempotency key the usage ledger stores (``run:block:attempt[:seq][:uncertain:n]``)
IDEMPOTENCY_KEY_ROOM = 255
#: the longest run id: with a block id (at most 64 characters) and what a call's key adds after
#: it (``:attempt:seq:uncertain:n``, under 40 characters), every key fits the ledger's 255
MAX_RUN_ID = 150
#: errors worth trying the block again for: the call did not complete, and may next time
_TRANSIENT = (ServerError, ProviderTimeout, ProviderUnreachable, ProtocolError)


class RunIdInUse(ByokError):
    """A run id the caller gave that already has calls in the usage ledger, for a new execution
    (or for another workspace). Raised before anything runs. The message names the run id and
    the workspace, never another workspace."""


class RunIdInvalid(ByokError):
    """A run id the caller gave that the ledger could not store under (too long for this
    workflow's idempotency keys, or with control characters). Raised before anything runs."""


class WorkflowRunner(Blocks):
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
        :param actor: who started the run (for a scheduled job, an actor of its own with a role
            in the workspace). Resolution asks ``byok_authorize`` whether it may use the
            workspace before every call; the default rule answers nothing for ``None``, so each
            call of a run without an actor fails its block with ``NotAuthorized``, unless a
            plugin's ``byok_authorize`` allows the host's own runs.
        :param run_id: the run's id; a new one by default. An id given here that already has
            calls in the usage ledger (``byok_recorded_calls``) is refused with
            :class:`RunIdInUse` unless ``replay`` is given: a call made again under the same
            idempotency key would be neither recorded nor charged; so is an id that a run in
            flight in another worker holds (``byok_claim_run``).
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
            async with self._claimed(run_id, workspace_id):
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

    @contextlib.asynccontextmanager
    async def _claimed(self, run_id: str, workspace_id: str) -> AsyncIterator[None]:
        """The run id claimed for this run across the store's workers (``byok_claim_run``), the
        claim extended every third of ``run_claim_seconds`` meanwhile, and released at the end
        (``byok_release_run``); :class:`RunIdInUse` when another run in flight holds it. Both
        hooks write to the store: they are called in a worker thread."""
        loop = asyncio.get_running_loop()
        claimant = secrets.token_hex(16)
        seconds = self.options.run_claim_seconds

        def claim() -> bool | None:
            answer: bool | None = self.pm.hook.byok_claim_run(
                run_id=run_id, workspace_id=workspace_id, claimant=claimant, seconds=seconds
            )
            return answer

        if await loop.run_in_executor(None, claim) is False:
            raise RunIdInUse(
                f"run id {run_id!r} is in use by a run in flight in another worker: give "
                f"workspace {workspace_id!r} a run id of its own, or wait for that run to end (if "
                f"its worker died, its claim lapses within {seconds:g} s)"
            )

        extension: asyncio.Future[bool | None] | None = None  # in a worker thread

        async def extend() -> None:
            nonlocal extension
            while True:
                await asyncio.sleep(seconds / 3)
                extension = loop.run_in_executor(None, claim)
                try:
                    held = await asyncio.shield(extension)
                except Exception as exc:  # tried again a third of the claim later
                    log.warning("extending the claim of run id %r failed: %s", run_id, exc)
                    continue
                if held is False:
                    log.error(
                        "the claim of run id %r lapsed and another run took it: calls of both "
                        "may share idempotency keys",
                        run_id,
                    )
                    return

        extending = loop.create_task(extend())
        try:
            yield
        finally:
            extending.cancel()
            if extension is not None:
                # an extension already in its worker thread ends first: released before it, the
                # claim would be written again and outlive the run
                with contextlib.suppress(Exception):
                    await asyncio.shield(extension)
            release = functools.partial(
                self.pm.hook.byok_release_run, run_id=run_id, claimant=claimant
            )
            try:  # (a cancelled run still gives it back)
                await asyncio.shield(loop.run_in_executor(None, release))
            except Exception as exc:
                log.warning(
                    "releasing run id %r failed (its claim lapses within %g s): %s",
                    run_id,
                    seconds,
                    exc,
                )

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

        def finished(block_id: str, task: asyncio.Task[BlockResult]) -> None:
            done.put_nowait((block_id, task))

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
                    task.add_done_callback(functools.partial(finished, block_id))
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
