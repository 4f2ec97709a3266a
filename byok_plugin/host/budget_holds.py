"""Budgets around a provider call: hold the call's worst case before it
(``byok_reserve_budget``), settle the charge after it (``byok_settle_budget``), release the hold
of a call that did not complete."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from byok_hookspecs import (
    BudgetExceeded,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    ByokError,
    Charge,
    Credential,
    CredentialUnavailable,
    Usage,
    calling_inline,
)

from byok_plugin.host.hook_calls import RESERVE_HOOKS, HookCalls

log = logging.getLogger("byok.host.runner")  # one logger for the whole runner


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


def _store_trouble(exc: ByokError) -> bool:
    """Whether a hook's error is a store that did not answer (worth a try off the loop), not a
    decision (a refused budget, a missing key) nor a value the store refused (a ``ValueError``:
    the plugin's ``StoreRefusedValue``), which fails again wherever it is tried."""
    return (
        isinstance(exc, CredentialUnavailable)
        and not isinstance(exc, BudgetExceeded)
        and not isinstance(exc, ValueError)
    )


class BudgetHolds(HookCalls):
    """The budget holds of the runner's calls."""

    def _reservation(self, credential: Credential, budget: _Budget) -> BudgetReservation:
        """The call's worst case, priced by ``byok_compute_charge``, as a reservation."""
        assert budget.worst is not None
        estimate = self.pm.hook.byok_compute_charge(usage=budget.worst, credential=credential)
        amount = estimate.amount if estimate is not None else Decimal(0)
        list_cost = estimate.list_cost if estimate is not None else None
        return BudgetReservation(
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

    def _reserve_now(
        self, credential: Credential, budget: _Budget, reservation: BudgetReservation | None = None
    ) -> None:
        """``byok_reserve_budget`` of ``reservation`` (by default :meth:`_reservation`); raises
        ``BudgetExceeded`` when it does not fit."""
        if reservation is None:
            reservation = self._reservation(credential, budget)
        budget.hold = self.pm.hook.byok_reserve_budget(reservation=reservation)

    async def _reserve(self, credential: Credential, budget: _Budget) -> None:
        """:meth:`_reserve_now`, on the event loop when :data:`RESERVE_HOOKS` do not block; there
        a failure other than a refusal (a SQLite store locked by another writer, a PostgreSQL
        workspace that has budgets) is tried once more in a worker thread, where it waits (with
        the reservation already priced on the loop, when it was)."""
        loop = asyncio.get_running_loop()
        if self.thread_for(RESERVE_HOOKS):
            await loop.run_in_executor(None, self._reserve_now, credential, budget)
            return
        reservation: BudgetReservation | None = None
        try:
            with calling_inline():
                reservation = self._reservation(credential, budget)
                self._reserve_now(credential, budget, reservation)
        except Exception as exc:
            if isinstance(exc, ByokError) and not _store_trouble(exc):
                raise  # a decision (the budget refuses the call), not a store that did not answer
            await loop.run_in_executor(None, self._reserve_now, credential, budget, reservation)

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
