"""What a run returns: for every block its output, key source, tokens, charge and latency, plus
the run's totals. Frozen values; :meth:`RunResult.to_dict` is the ``byok run --json`` document."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord

__all__ = ["BlockResult", "BlockStatus", "CallResult", "Rejection", "RunResult", "RunStatus"]


class BlockStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    #: never started: on a branch not taken, or after the run failed
    SKIPPED = "skipped"


class RunStatus(enum.StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A key the provider refused during a call, before another key served it (or none did)."""

    source: CredentialSource
    hint: str
    key_id: str | None
    status: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class CallResult:
    """One provider call that completed: it was charged and recorded exactly once, unless
    ``recorded`` is false.

    :param idempotency_key: ``run:block:attempt`` (``:n`` added for the n-th call of a block that
        called its tools); the ledger writes one row per key.
    :param recorded: ``byok_record_usage`` took it. ``False`` when every try failed: the block
        failed, and the host holds the only copy of the usage and charge (re-submit it with
        :meth:`usage_record`; the ledger ignores a key it already has).
    :param fallback: the platform served it after the workspace's key was refused.
    :param rejected: the keys refused before this one served the call.
    """

    provider: str
    model: str
    source: CredentialSource
    key_id: str | None
    hint: str
    fallback: bool
    usage: Usage
    charge: Charge
    latency: float
    attempt: int
    idempotency_key: str
    streamed: bool = False
    rejected: tuple[Rejection, ...] = ()
    recorded: bool = True
    #: the record given to ``byok_record_usage`` (the same fields, plus who and when)
    record: UsageRecord | None = field(default=None, repr=False, compare=False)

    def usage_record(self) -> UsageRecord:
        """The :class:`UsageRecord` ``byok_record_usage`` was (or should have been) given."""
        if self.record is None:
            raise ValueError(f"call {self.idempotency_key} carries no usage record")
        return self.record

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "source": self.source.value,
            "key_id": self.key_id,
            "key_hint": self.hint,
            "fallback": self.fallback,
            "streamed": self.streamed,
            "attempt": self.attempt,
            "idempotency_key": self.idempotency_key,
            "recorded": self.recorded,
            "latency_s": round(self.latency, 6),
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "cached_input_tokens": self.usage.cached_input_tokens,
                "cache_write_tokens": self.usage.cache_write_tokens,
                "output_tokens": self.usage.output_tokens,
                "reasoning_tokens": self.usage.reasoning_tokens,
                "tool_requests": self.usage.tool_requests,
                "total_tokens": self.usage.total_tokens,
            },
            "charge": {
                "amount": format(self.charge.amount, "f"),
                "currency": self.charge.currency,
                "reason": self.charge.reason,
                "list_cost": (
                    None if self.charge.list_cost is None else format(self.charge.list_cost, "f")
                ),
            },
            "rejected": [
                {
                    "source": r.source.value,
                    "key_hint": r.hint,
                    "status": r.status,
                    "reason": r.reason,
                }
                for r in self.rejected
            ],
        }


@dataclass(frozen=True, slots=True)
class BlockResult:
    """One block of a run. ``calls`` lists every provider call that completed, across attempts."""

    block_id: str
    type: str
    status: BlockStatus
    output: Mapping[str, Any] | None = None
    calls: tuple[CallResult, ...] = ()
    error: str | None = None
    reason: str | None = None
    latency: float = 0.0
    attempts: int = 0
    provider: str | None = None
    model: str | None = None

    @property
    def sources(self) -> tuple[CredentialSource, ...]:
        """The key sources that served the block's calls, in order, without repeats."""
        return tuple(dict.fromkeys(c.source for c in self.calls))

    @property
    def source(self) -> str:
        """``workspace``, ``platform``, ``block``, or several joined with ``+``; ``-`` for none."""
        return "+".join(s.value for s in self.sources) or "-"

    @property
    def fallback(self) -> bool:
        return any(c.fallback for c in self.calls)

    @property
    def total_tokens(self) -> int:
        return sum(c.usage.total_tokens for c in self.calls)

    @property
    def input_tokens(self) -> int:
        return sum(
            c.usage.input_tokens + c.usage.cached_input_tokens + c.usage.cache_write_tokens
            for c in self.calls
        )

    @property
    def output_tokens(self) -> int:
        return sum(c.usage.output_tokens + c.usage.reasoning_tokens for c in self.calls)

    @property
    def charge(self) -> Decimal:
        return sum((c.charge.amount for c in self.calls), Decimal(0))

    @property
    def list_cost(self) -> Decimal:
        return sum(
            (c.charge.list_cost for c in self.calls if c.charge.list_cost is not None), Decimal(0)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block_id,
            "type": self.type,
            "status": self.status.value,
            "provider": self.provider,
            "model": self.model,
            "source": self.source if self.calls else None,
            "fallback": self.fallback,
            "tokens": self.total_tokens,
            "charge": format(self.charge, "f"),
            "latency_s": round(self.latency, 6),
            "attempts": self.attempts,
            "error": self.error,
            "reason": self.reason,
            "output": _jsonable(self.output),
            "calls": [c.to_dict() for c in self.calls],
        }


@dataclass(frozen=True, slots=True)
class RunResult:
    """A whole run: every block (in the workflow's order), the outputs, and the totals."""

    run_id: str
    workflow: str
    workflow_version: str
    workspace_id: str
    status: RunStatus
    blocks: Mapping[str, BlockResult]
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    latency: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.COMPLETED

    @property
    def calls(self) -> tuple[CallResult, ...]:
        return tuple(c for b in self.blocks.values() for c in b.calls)

    @property
    def unrecorded(self) -> tuple[CallResult, ...]:
        """Completed calls ``byok_record_usage`` did not take: re-submit their
        :meth:`CallResult.usage_record`."""
        return tuple(c for c in self.calls if not c.recorded)

    @property
    def charges_by_currency(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = {}
        for call in self.calls:
            totals[call.charge.currency] = (
                totals.get(call.charge.currency, Decimal(0)) + call.charge.amount
            )
        return totals

    @property
    def currency(self) -> str:
        """The currency of the charges (``USD`` when nothing was charged); ``mixed`` when a
        billing plugin charged in several, in which case read :attr:`charges_by_currency`."""
        currencies = {c.charge.currency for c in self.calls}
        if len(currencies) > 1:
            return "mixed"
        return currencies.pop() if currencies else "USD"

    @property
    def total_charge(self) -> Decimal:
        """The sum of the charges; meaningful in one :attr:`currency`."""
        return sum((c.charge.amount for c in self.calls), Decimal(0))

    @property
    def total_list_cost(self) -> Decimal:
        return sum(
            (c.charge.list_cost for c in self.calls if c.charge.list_cost is not None), Decimal(0)
        )

    @property
    def total_tokens(self) -> int:
        return sum(c.usage.total_tokens for c in self.calls)

    @property
    def failed_block(self) -> BlockResult | None:
        return next((b for b in self.blocks.values() if b.status is BlockStatus.FAILED), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "workflow_version": self.workflow_version,
            "workspace": self.workspace_id,
            "status": self.status.value,
            "error": self.error,
            "outputs": _jsonable(self.outputs),
            "blocks": [b.to_dict() for b in self.blocks.values()],
            "totals": {
                "calls": len(self.calls),
                "unrecorded": len(self.unrecorded),
                "tokens": self.total_tokens,
                "charge": format(self.total_charge, "f"),
                "list_cost": format(self.total_list_cost, "f"),
                "currency": self.currency,
                "by_currency": {k: format(v, "f") for k, v in self.charges_by_currency.items()},
                "latency_s": round(self.latency, 6),
            },
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return value
