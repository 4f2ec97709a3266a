"""How the runner calls the (synchronous) ``byok`` hooks: in a worker thread, or inline on the
event loop when every implementation of the hooks a call goes through declares that it never
waits on the network (:mod:`byok_hookspecs.blocking`). :class:`HookCalls` is the base of
:class:`~byok_plugin.host.runner.WorkflowRunner`: it declares the state the runner's parts share
(set by ``WorkflowRunner.__init__``)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import pluggy
from byok_hookspecs import blocking_implementations, calling_inline

from byok_plugin.host.env_keys import EnvKeyAllowance
from byok_plugin.host.run_state import RunnerOptions
from byok_plugin.host.workflow import AgentBlock, ToolBlock, Workflow
from byok_plugin.host.workflow.providers import TOOL_PROVIDERS

log = logging.getLogger("byok.host.runner")  # one logger for the whole runner

_T = TypeVar("_T")
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
#: the hooks a budget reservation goes through (its worst case priced, the hold, a refusal's
#: audit event): called on the event loop when they declare they never block; an implementation
#: that would wait there gives up, and the runner reserves in a worker thread instead
RESERVE_HOOKS = ("byok_compute_charge", "byok_reserve_budget", "byok_audit")


class HookCalls:
    """The runner's shared state and its way of calling a hook (a base of ``WorkflowRunner``)."""

    pm: pluggy.PluginManager
    clients: dict[str, Any]
    environ: Mapping[str, str]
    env_keys: EnvKeyAllowance | None
    options: RunnerOptions
    _clock: Callable[[], float]
    #: provider calls in flight at once
    _limit: asyncio.Semaphore
    _known: dict[tuple[str, str], bool | None]
    _threading: tuple[set[object], bool] | None
    #: jobs in a worker thread that a cancelled run does not stop (``drain`` waits for them)
    _recording: set[asyncio.Future[Any]]

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

    def thread_for(self, hooks: tuple[str, ...]) -> bool:
        """Whether ``hooks`` are called in a worker thread: as :meth:`hooks_in_thread` says, but
        on the event loop when the hooks run in threads only because of others (recording on
        PostgreSQL) and none of ``hooks`` may block now (asked at each call: a declaration may
        change, as the default plugin's does when its PostgreSQL listener connects or drops)."""
        if not self.hooks_in_thread():
            return False
        return self.options.hooks_in_thread is not None or bool(
            blocking_implementations(self.pm, hooks)
        )

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

    async def _recording_job(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread, as a job that a cancelled run does not stop (the call
        has completed: its usage must land) and that :meth:`drain` waits for."""
        job = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._recording.add(job)
        job.add_done_callback(self._recording.discard)
        return await asyncio.shield(job)
