"""Which hook implementations never wait on the network: what lets an asyncio host call them inline.

Hooks are synchronous. An asyncio host must not stall its event loop on an implementation that
waits on the network (a PostgreSQL store, a secrets vault, a metering API), so by default it calls
the hooks from a worker thread. That trip costs a thread switch each way, which is a large share
of a fast provider call. A plugin whose implementations never wait on the network (they compute
in memory, or read and write a local file in well under a millisecond) says so, and a host may
then call them on the event loop::

    class MyBilling:
        byok_nonblocking_hooks = frozenset({"byok_compute_charge"})

        @hookimpl(tryfirst=True)
        def byok_compute_charge(self, usage, credential): ...

A host that calls them on its loop says so for the duration of the call
(``with calling_inline(): pm.hook...``), and a declared implementation that would have to wait
(a lock another process holds) checks :func:`called_inline` and gives up at once, or hands the
work to a thread of its own, instead of stalling the loop. Off the loop it waits as usual.

The attribute holds the names of the plugin's hook implementations that do not block: a set,
frozenset, tuple or list of names. It may be a property, computed per plugin instance: the default
plugin's store hooks are non-blocking on a local SQLite file and blocking on PostgreSQL. A plugin
that does not set it blocks, as far as a host knows; so does one whose attribute is a plain string
or raises when read. A module registered as a plugin sets it at module level.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import pluggy

__all__ = [
    "NONBLOCKING_ATTRIBUTE",
    "blocking_implementations",
    "called_inline",
    "calling_inline",
    "declared_nonblocking",
]

#: the plugin attribute that names its non-blocking hook implementations
NONBLOCKING_ATTRIBUTE = "byok_nonblocking_hooks"

# (thread, task) of the inline call in progress: a task or a thread started from inside the call
# copies the context, but is not the call itself and may wait
_INLINE: ContextVar[tuple[int, object] | None] = ContextVar(
    "byok_hooks_called_inline", default=None
)


def _here() -> tuple[int, object]:
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        task = None
    return threading.get_ident(), task


@contextmanager
def calling_inline(inline: bool = True) -> Iterator[None]:
    """Mark the hook calls made inside the block, on this thread and in this task, as made on the
    host's event loop (``True``), or as free to wait (``False``: work started from such a call
    that may wait, a migration say).

    :param inline: what :func:`called_inline` answers inside the block.
    """
    token = _INLINE.set(_here() if inline else None)
    try:
        yield
    finally:
        _INLINE.reset(token)


def called_inline() -> bool:
    """Whether the hook being run was called on the host's event loop (:func:`calling_inline`):
    waiting for anything then stalls every task of the loop.

    :returns: ``False`` off the loop, in a worker thread or another task (even one started from
        inside the call), or when the host did not say.
    """
    marked = _INLINE.get()
    if marked is None:
        return False
    thread, task = marked
    return thread == threading.get_ident() and task is _here()[1]


def declared_nonblocking(plugin: object) -> frozenset[str]:
    """The hook names ``plugin`` declares non-blocking; empty when it declares none, or when its
    declaration is not a collection of names (a string, a property that raises)."""
    try:
        declared = getattr(plugin, NONBLOCKING_ATTRIBUTE, ())
    except Exception:  # a property that fails: the plugin may block, as far as anyone knows
        return frozenset()
    if not isinstance(declared, set | frozenset | tuple | list):
        return frozenset()
    return frozenset(name for name in declared if isinstance(name, str))


def blocking_implementations(
    pm: pluggy.PluginManager, hook_names: Iterable[str]
) -> list[tuple[str, str]]:
    """The implementations of ``hook_names`` in ``pm`` that may block (not declared otherwise).

    :param pm: a plugin manager with the byok hooks.
    :param hook_names: the hooks a host is about to call, including those their implementations
        call in turn (the default ``byok_resolve_credential`` asks ``byok_is_hosted``,
        ``byok_platform_key``, ``byok_authorize`` and ``byok_audit``).
    :returns: ``(hook name, plugin name)`` of each implementation that may block, in hook order;
        empty when every one may be called on an event loop.
    """
    found = []
    # each plugin's declaration read once per question: it may be a property that works it out
    # (the default plugin's does, a few microseconds), and most hooks have the same plugins
    declarations: dict[int, frozenset[str]] = {}
    for name in hook_names:
        caller = getattr(pm.hook, name, None)
        if caller is None:
            continue
        for impl in caller.get_hookimpls():
            declared = declarations.get(id(impl.plugin))
            if declared is None:
                declared = declarations[id(impl.plugin)] = declared_nonblocking(impl.plugin)
            if name not in declared:
                found.append((name, impl.plugin_name))
    return found
