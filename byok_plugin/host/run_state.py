"""What a run of the reference host engine carries: the runner's options
(:class:`RunnerOptions`), the events it emits (:class:`RunEvent`), the error a block fails with
(:class:`BlockFailed`), one run's state (``_Run``: its results, the keys its calls used, of
which every text that leaves the runner is redacted, and the lookup of block references), and
which provider call of the run a call is (``_CallSite``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from byok_hookspecs import Actor, redact

from byok_plugin.host.providers.retry import RetryWait
from byok_plugin.host.run_result import BlockResult, BlockStatus, CallResult
from byok_plugin.host.workflow import Ref, Workflow
from byok_plugin.host.workflow.templates import step_into

log = logging.getLogger("byok.host.runner")  # one logger for the whole runner


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
    :param budget_search_input_tokens: the input tokens each web search a block's
        ``web_search`` may make is assumed to add at most (its results, fed back to the model as
        input), for its budget hold: nothing bounds them beforehand. A real Anthropic stream
        that searched twice (pydantic-ai's recorded cassette) billed 22,397 input tokens, 2,068
        of them before searching: about 10,000 a search.
    :param group_commit: when the hooks run in a worker thread, charge and record the calls that
        finish together as one group (``byok_record_usage_batch``: one transaction on the
        default plugin), by one writer per runner; each call awaits its own group without
        holding a thread. ``False``: one worker-thread job per call.
    :param run_claim_seconds: how long a run id its caller chose stays claimed for the run
        (``byok_claim_run``) unless extended: the runner extends it every third of that while
        the run goes on, and a worker that dies mid-run leaves a claim that lapses then.
    """

    max_concurrent_calls: int = 16
    block_retries: int = 1
    max_key_rounds: int = 4
    record_attempts: int = 3
    hooks_in_thread: bool | None = None
    budget_hold_seconds: float = 900.0
    budget_output_tokens: int = 4096
    budget_search_input_tokens: int = 25_000
    group_commit: bool = True
    run_claim_seconds: float = 300.0

    def __post_init__(self) -> None:
        if self.max_concurrent_calls < 1:
            raise ValueError("max_concurrent_calls must be at least 1")
        if self.block_retries < 0 or self.max_key_rounds < 1 or self.record_attempts < 1:
            raise ValueError("block_retries >= 0, max_key_rounds >= 1 and record_attempts >= 1")
        if not self.budget_hold_seconds > 0 or self.budget_output_tokens < 1:
            raise ValueError("budget_hold_seconds > 0 and budget_output_tokens >= 1")
        if self.budget_search_input_tokens < 0:
            raise ValueError("budget_search_input_tokens >= 0")
        if not 1 <= self.run_claim_seconds <= 86_400:
            raise ValueError("run_claim_seconds is between 1 and 86400")


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


@dataclass(frozen=True)
class _CallSite:
    """Which provider call of a run: the block, the block's attempt, the call's place in that
    attempt (``seq``: a block's tool rounds make more than one call), and the provider and model
    (or tool) it asks."""

    run: _Run
    block_id: str
    attempt: int
    seq: int
    provider: str
    model: str

    @property
    def idempotency_key(self) -> str:
        """``run:block:attempt``, and ``:seq`` for an attempt's second and later calls."""
        key = f"{self.run.run_id}:{self.block_id}:{self.attempt}"
        return key + (f":{self.seq}" if self.seq > 1 else "")
