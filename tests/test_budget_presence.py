"""Budget reservations on PostgreSQL answered from memory for a workspace without budgets (issue
18): while the key-change listener is connected, ``byok_reserve_budget`` is declared
non-blocking; a workspace known to have no budget is answered without a round trip, one that has
budgets (or is not known yet) gives up at once on the event loop and is reserved off it; a budget
set or deleted in another worker applies here once its notification has crossed (measured); while
the listener is down every reservation asks the store. Real PostgreSQL, statements counted on the
engine, two apps for two workers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    BudgetExceeded,
    BudgetReservation,
    calling_inline,
    declared_nonblocking,
)
from keys_support import make_app, master_key, service_for
from test_budgets import WS, reservation
from test_resolution_from_memory import statements

from byok_plugin.billing.budget_presence import BudgetPresence
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.defaults import DefaultPlugin


def _wait(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> float:
    """Wait for ``condition()``; how long it took (a deadline against a hung test, not a timed
    assertion)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.0005)
    return time.monotonic() - start


def _worker(postgres_url: str, home: Path) -> tuple[Any, Any]:
    """An app and its plugin manager, prepared and listening (one worker process's state)."""
    app = make_app(postgres_url, home, keys=[master_key()])
    _, pm = service_for(app)
    pm.hook.byok_prepare()
    assert app.resolver.listener.wait_listening()
    _wait(lambda: app.budgets.presence.listening, "the budget store to follow the listener")
    return app, pm


def _inline(pm: Any, request: BudgetReservation) -> tuple[int, Any]:
    """``byok_reserve_budget`` called on an event loop, as the runner calls a declared hook:
    the loop's thread, and the hold or the exception."""

    async def on_the_loop() -> tuple[int, Any]:
        with calling_inline():
            try:
                return threading.get_ident(), pm.hook.byok_reserve_budget(reservation=request)
            except Exception as exc:
                return threading.get_ident(), exc

    return asyncio.run(on_the_loop())


def test_a_workspace_without_budgets_reserves_from_memory_on_the_loop(
    postgres_url: str, tmp_path: Path
) -> None:
    app, pm = _worker(postgres_url, tmp_path / "one")
    try:
        plugin = next(p for p in pm.get_plugins() if isinstance(p, DefaultPlugin))
        assert "byok_reserve_budget" in declared_nonblocking(plugin)
        # not known yet: on the loop it gives up at once (no statement), off it one read
        with statements(app.engine) as seen:
            loop_thread, answer = _inline(pm, reservation("r:1:1", "0.50"))
        assert isinstance(answer, StoreUnavailable)
        assert "acme" in str(answer)
        assert "off the event loop" in str(answer)
        assert [s for thread, s in seen if thread == loop_thread] == []
        with statements(app.engine) as seen:
            assert pm.hook.byok_reserve_budget(reservation=reservation("r:1:1", "0.50")) is None
        assert len(seen) == 1, seen
        assert "EXISTS" in seen[0][1]
        assert app.budgets.presence.has_budgets(WS) is False
        # known now: no statement at all, on the loop or off it
        with statements(app.engine) as seen:
            loop_thread, answer = _inline(pm, reservation("r:2:1", "0.50"))
            assert pm.hook.byok_reserve_budget(reservation=reservation("r:3:1", "0.50")) is None
        assert answer is None
        assert seen == []
        # a workspace with budgets: on the loop it gives up (reserved off it), off it is held
        app.budgets.set_budget("other", "monthly", limit="10")
        with statements(app.engine) as seen:
            loop_thread, answer = _inline(pm, reservation("r:4:1", "0.50", workspace_id="other"))
        assert isinstance(answer, StoreUnavailable)
        assert [s for thread, s in seen if thread == loop_thread] == []
        hold = pm.hook.byok_reserve_budget(
            reservation=reservation("r:4:1", "0.50", workspace_id="other")
        )
        assert hold is not None
        assert hold.budgets == ("monthly",)
        assert app.budgets.presence.has_budgets("other") is True
    finally:
        app.close()


@pytest.fixture
def two_workers(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """Two workers on one database, ``here`` (with its plugin manager) knowing from one
    reservation that the workspace has no budget, and ``there``."""
    here, pm = _worker(postgres_url, tmp_path / "here")
    there, _ = _worker(postgres_url, tmp_path / "there")
    try:
        assert pm.hook.byok_reserve_budget(reservation=reservation("r:1:1", "0.50")) is None
        assert here.budgets.presence.has_budgets(WS) is False
        yield here, pm, there
    finally:
        there.close()
        here.close()


def test_a_budget_set_or_deleted_in_another_worker_applies_once_announced(
    two_workers: tuple[Any, Any, Any],
) -> None:
    here, pm, there = two_workers
    received = here.resolver.listener.received
    there.budgets.set_budget(WS, "tight", limit="1.00")
    latency = _wait(
        lambda: here.budgets.presence.has_budgets(WS) is None, "the budget's notification"
    )
    assert here.resolver.listener.received > received
    print(
        f"\nbudget set in another worker: forgotten here {latency * 1e3:.2f} ms after set_budget returned"
    )
    # from then on this worker asks the store: the budget holds, and refuses
    _loop_thread, answer = _inline(pm, reservation("r:2:1", "0.50"))
    assert isinstance(answer, StoreUnavailable)
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:2:1", "0.60")) is not None
    with pytest.raises(BudgetExceeded, match="tight"):
        pm.hook.byok_reserve_budget(reservation=reservation("r:3:1", "0.60"))
    assert here.budgets.presence.has_budgets(WS) is True
    # deleted there: forgotten here once announced, then known again to have none
    assert there.budgets.delete(WS, "tight")
    _wait(lambda: here.budgets.presence.has_budgets(WS) is None, "the deletion's notification")
    assert pm.hook.byok_reserve_budget(reservation=reservation("r:4:1", "5")) is None
    assert here.budgets.presence.has_budgets(WS) is False


def test_while_the_listener_is_down_every_reservation_asks_the_store(
    two_workers: tuple[Any, Any, Any], postgres_url: str
) -> None:
    here, pm, there = two_workers
    admin = sa.create_engine(postgres_url)
    try:
        listener = here.resolver.listener
        with admin.connect() as conn:  # the listening connection ends (a restart, say)
            conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": listener.backend_pid})
        _wait(lambda: listener.losses == 1, "the lost connection")
        plugin = next(p for p in pm.get_plugins() if isinstance(p, DefaultPlugin))
        assert not here.budgets.presence.listening
        assert "byok_reserve_budget" not in declared_nonblocking(plugin)
        # a budget set meanwhile is announced to no one here: the store is asked every time
        there.budgets.set_budget(WS, "tight", limit="1.00")
        assert here.budgets.presence.has_budgets(WS) is None
        with pytest.raises(BudgetExceeded, match="tight"):
            pm.hook.byok_reserve_budget(reservation=reservation("r:2:1", "1.50"))
        # listening again: forgotten everything once more, and remembered afresh
        assert listener.wait_listening(timeout=20)
        _wait(lambda: here.budgets.presence.listening, "the budget store listening again")
        assert pm.hook.byok_reserve_budget(reservation=reservation("r:3:1", "0.50")) is not None
        assert here.budgets.presence.has_budgets(WS) is True
    finally:
        admin.dispose()


def test_a_read_that_a_change_overtook_is_not_remembered() -> None:
    presence = BudgetPresence()
    presence.remember(WS, False, presence.generation)
    assert presence.has_budgets(WS) is None  # not listening: nothing is remembered
    presence.set_listening(True)
    before = presence.generation
    presence.changed_elsewhere(WS, None)  # a budget set while the read was on its way
    presence.remember(WS, False, before)
    assert presence.has_budgets(WS) is None
    presence.remember(WS, True, presence.generation)
    assert presence.has_budgets(WS) is True
    presence.changed_elsewhere("other", "openai")  # another workspace's news: kept
    assert presence.has_budgets(WS) is True
    presence.set_listening(False)
    assert presence.has_budgets(WS) is None
    presence.set_listening(True)
    assert presence.has_budgets(WS) is None  # forgotten on every change of the listener


def test_on_sqlite_nothing_is_remembered(sqlite_url: str, tmp_path: Path) -> None:
    app = make_app(sqlite_url, tmp_path, keys=[master_key()])
    _, pm = service_for(app)
    try:
        pm.hook.byok_prepare()
        assert pm.hook.byok_reserve_budget(reservation=reservation("r:1:1", "0.50")) is None
        assert not app.budgets.presence.listening
        assert app.budgets.presence.has_budgets(WS) is None
        app.budgets.set_budget(WS, "tight", limit="1.00")
        with pytest.raises(BudgetExceeded):
            pm.hook.byok_reserve_budget(reservation=reservation("r:2:1", "1.50"))
    finally:
        app.close()
