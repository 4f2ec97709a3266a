"""Charging and recording a provider call (``byok_compute_charge``, ``byok_record_usage``): the
group-commit writer (calls that finish together are recorded as one group,
``byok_record_usage_batch``), the record's retries, and the rows of calls that did not complete
(``interrupted``, ``uncertain``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from byok_hookspecs import (
    USAGE_COUNTS,
    BudgetSettlement,
    Charge,
    Credential,
    Usage,
    UsageRecord,
    redact,
)

from byok_plugin.host.budget_holds import BudgetHolds, _Budget
from byok_plugin.host.providers.errors import ProviderError
from byok_plugin.host.run_state import _CallSite

log = logging.getLogger("byok.host.runner")  # one logger for the whole runner

#: the reason of the zero charge recorded for a completed call whose byok_compute_charge failed
CHARGE_FAILED = "charge_failed"
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


class Recording(BudgetHolds):
    """Charge and record completed (and unfinished) calls."""

    #: group commit: the calls waiting for the writer, and the writer (one per runner)
    _group: list[tuple[_Settling, asyncio.Future[_Settled]]]
    _writer: asyncio.Task[None] | None

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
            if batch_plugins and batch is not None:
                batch = self.pm.subset_hook_caller(
                    "byok_record_usage_batch", remove_plugins=[together]
                )
            single = self.pm.subset_hook_caller("byok_record_usage", remove_plugins=[together])
        if batch_plugins and batch is not None:
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

    def _settle_with_hold(
        self,
        usage: Any,
        credential: Credential,
        make_record: Callable[[Charge], UsageRecord],
        budget: _Budget,
    ) -> tuple[Charge, UsageRecord, Exception | None, Exception | None]:
        """:meth:`_settle` for a call that holds a budget: the charge, then its record and its
        budget settlement together (``byok_record_usage_and_settle``: one transaction) when one
        plugin does both, and ``byok_record_usage`` on the other plugins; else the record alone,
        as :meth:`_settle` does (``budget.settled`` stays false: the caller then settles)."""
        charge, charge_error = self._charge(usage, credential)
        record = make_record(charge)
        together = self._record_and_settle([record], [self._settlement(budget, credential, charge)])
        hook = self.pm.hook.byok_record_usage
        if together is not None:
            budget.settled = True
            if not any(impl.plugin is not together for impl in hook.get_hookimpls()):
                return charge, record, None, charge_error
            hook = self.pm.subset_hook_caller("byok_record_usage", remove_plugins=[together])
        try:
            hook(record=record)
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

    def _record_retries(
        self, record: UsageRecord, error: Exception, tries: int, keys: tuple[str, ...] = ()
    ) -> Exception | None:
        """Up to ``tries`` more ``byok_record_usage`` calls, backing off; the last error, or
        ``None`` once one succeeds. None after a ``ValueError``: the record refused for its own
        sake (a value the store cannot hold: the default plugin's ``StoreRefusedValue``, which it
        holds aside) fails the same way on every try. Runs in a worker thread. The errors are
        logged redacted of ``keys`` (the call's)."""
        last = error
        made = 1
        for attempt in range(1, tries + 1):
            if isinstance(last, ValueError):
                break
            made += 1
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
            made,
            type(last).__name__,
            redact(str(last), *keys),
        )
        return last

    async def _record_unfinished(
        self,
        site: _CallSite,
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
            usage, status = Usage(provider=exc.provider, model=site.model), "uncertain"
        else:
            return
        job = self._start_recording_unfinished(site, credential, usage, status, round_no, budget)
        with contextlib.suppress(Exception):
            await asyncio.shield(job)

    def _start_recording_unfinished(
        self,
        site: _CallSite,
        credential: Credential,
        usage: Usage,
        status: str,
        round_no: int = 0,
        budget: _Budget | None = None,
    ) -> asyncio.Future[Any]:
        """Charge and record an unfinished call in a worker thread, as a job a cancelled run does
        not stop and :meth:`drain` waits for; under the key the completed call would have had."""
        idempotency_key = site.idempotency_key
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
        if usage.model != site.model:
            usage = replace(usage, model=site.model)

        make_record = _recorder(site, idempotency_key, usage, credential, status, estimated)

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


def _recorder(
    site: _CallSite,
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
            workspace_id=site.run.workspace_id,
            usage=usage,
            charge=charge,
            source=credential.source,
            key_id=credential.key_id,
            fallback=credential.fallback,
            workflow_id=site.run.workflow.name,
            run_id=site.run.run_id,
            block_id=site.block_id,
            attempt=site.attempt,
            status=status,
            estimated=estimated,
        )

    return make_record
