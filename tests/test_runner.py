"""The asyncio runner, over real HTTP against the emulator, with a small stand-in plugin for the
resolution, charge and ledger hooks (the real ones are exercised in test_samples.py).

What is shown here is the runner's own behaviour: scheduling, branches, concurrency and its limit,
the resolve -> call -> charge -> record sequence, re-resolution after a refused key, block retries
charged once, failures charged nothing and reported cleanly.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pluggy
import pytest
from byok_hookspecs import (
    PROJECT_NAME,
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    NoCredential,
    Usage,
    UsageRecord,
    add_to,
    hookimpl,
)

from byok_plugin.cli.context import OPERATOR
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.host.env_keys import EnvKeyAllowance
from byok_plugin.host.providers import RetryPolicy, create_clients, new_http_client
from byok_plugin.host.run_result import BlockStatus, RunResult, RunStatus
from byok_plugin.host.runner import RunEvent, RunnerOptions, WorkflowRunner
from byok_plugin.host.workflow import (
    InputsError,
    Workflow,
    WorkflowError,
    load_workflow,
    parse_workflow,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_workflows"
FAST_RETRY = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.005)
PER_TOKEN = Decimal("0.000001")


def mask(key: str) -> str:
    return f"{key[:6]}...{key[-4:]}"


class StandIn:
    """Resolution (block key, else workspace key, else platform key; on a refused workspace key
    the platform only under ``on_error``), a per-token charge for platform calls, and an
    idempotent in-memory ledger. Counts the provider calls in flight between resolve and record."""

    def __init__(
        self, workspace_keys: dict[str, str], platform_keys: dict[str, str], policy: str = "never"
    ):
        self.workspace_keys = workspace_keys
        self.platform_keys = platform_keys
        self.policy = policy
        self.requests: list[CredentialRequest] = []
        #: (provider, label) -> the stored key a block may name by label
        self.labelled: dict[tuple[str, str], str] = {}
        #: answer a labelled request with the platform key (a plugin that ignores key_label)
        self.ignore_labels = False
        self.ledger: dict[str, UsageRecord] = {}
        self.record_calls = 0
        self.fail_records = 0
        self.refuse_records = False  # a record refused for its own sake (a ValueError)
        self.charge_answers = True
        self.currency = "USD"
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    @hookimpl
    def byok_is_hosted(self, provider: str, model: str) -> bool | None:
        return None if model.endswith("-unknown") else True

    @hookimpl
    def byok_resolve_credential(self, request: CredentialRequest) -> Credential | None:
        self.requests.append(request)
        if request.failure is None:
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
        p = request.provider
        if request.key_label is not None and not self.ignore_labels:
            if request.failure is not None:
                raise NoCredential(request.workspace_id, p, request.model, "labelled key refused")
            key = self.labelled[(p, request.key_label)]
            return Credential(
                key,
                p,
                CredentialSource.WORKSPACE,
                key_id=f"label-{request.key_label}",
                hint=mask(key),
            )
        if request.key_label is not None:
            key = self.platform_keys[p]
            return Credential(key, p, CredentialSource.PLATFORM, key_id="pool-0", hint=mask(key))
        if request.block_key and request.failure is None:
            return Credential(
                request.block_key, p, CredentialSource.BLOCK, hint=mask(request.block_key)
            )
        if request.failure is not None:
            if request.failure.source is CredentialSource.WORKSPACE and self.policy == "on_error":
                key = self.platform_keys[p]
                return Credential(
                    key,
                    p,
                    CredentialSource.PLATFORM,
                    key_id="pool-0",
                    hint=mask(key),
                    fallback=True,
                )
            raise NoCredential(
                request.workspace_id, p, request.model, f"fallback policy is {self.policy!r}"
            )
        if p in self.workspace_keys:
            key = self.workspace_keys[p]
            return Credential(key, p, CredentialSource.WORKSPACE, key_id=f"ws-{p}", hint=mask(key))
        key = self.platform_keys[p]
        return Credential(key, p, CredentialSource.PLATFORM, key_id="pool-0", hint=mask(key))

    @hookimpl
    def byok_compute_charge(self, usage: Usage, credential: Credential) -> Charge | None:
        if not self.charge_answers:
            return None
        if credential.billed_by_platform:
            amount = PER_TOKEN * usage.total_tokens + Decimal("0.005") * usage.tool_requests
            return Charge(amount, currency=self.currency, reason="platform", list_cost=amount)
        return Charge(Decimal(0), currency=self.currency, reason=credential.source.value)

    @hookimpl
    def byok_record_usage(self, record: UsageRecord) -> None:
        with self._lock:
            self.record_calls += 1
            if self.refuse_records:
                raise ValueError("the ledger refuses this record's workflow_id")
            if self.fail_records:
                self.fail_records -= 1
                raise RuntimeError("ledger briefly unavailable")
            self.ledger.setdefault(record.idempotency_key, record)
            self.in_flight -= 1


@pytest.fixture
def keys(emulator: EmulatorServer) -> dict[str, dict[str, str]]:
    providers = ("openai", "anthropic", "google", "mistral", "exa")
    return {
        "workspace": {p: emulator.new_key(p, label=f"workspace-{p}") for p in providers},
        "platform": {p: emulator.new_key(p, label=f"platform-{p}") for p in providers},
        "block": {"anthropic": emulator.new_key("anthropic", label="block-anthropic")},
    }


@pytest.fixture
def plugin(keys: dict[str, dict[str, str]]) -> StandIn:
    stand_in = StandIn(keys["workspace"], keys["platform"])
    stand_in.labelled[("anthropic", "localization")] = keys["block"]["anthropic"]
    return stand_in


@pytest.fixture
def pm(plugin: StandIn) -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT_NAME)
    add_to(manager, load_entrypoints=False)
    manager.register(plugin)
    return manager


class Harness:
    def __init__(self, pm: pluggy.PluginManager, emulator: EmulatorServer, environ: dict[str, str]):
        self.pm = pm
        self.emulator = emulator
        self.environ = environ
        self.env_keys: EnvKeyAllowance | None = None
        self.events: list[RunEvent] = []

    def run(
        self,
        workflow: Workflow,
        inputs: dict[str, Any] | None = None,
        *,
        options: RunnerOptions | None = None,
        **kwargs: Any,
    ) -> RunResult:
        async def go() -> RunResult:
            async with WorkflowRunner.open(
                self.pm,
                environ=self.environ,
                env_keys=self.env_keys,
                options=options,
                retry=FAST_RETRY,
            ) as runner:
                return await runner.run(
                    workflow,
                    actor=OPERATOR,
                    workspace_id="acme",
                    inputs=inputs,
                    on_event=self.events.append,
                    **kwargs,
                )

        return asyncio.run(go())


@pytest.fixture
def harness(
    pm: pluggy.PluginManager, emulator: EmulatorServer, keys: dict[str, dict[str, str]]
) -> Harness:
    return Harness(pm, emulator, {**emulator.environ()})


def sample(name: str) -> Workflow:
    return load_workflow(SAMPLES / f"{name}.json")


def sample_doc(name: str) -> dict[str, Any]:
    return json.loads((SAMPLES / f"{name}.json").read_text())


TICKET = {"ticket": "I was charged twice for my March invoice, please help."}


# --- the happy path -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_triage_runs_every_block_on_the_workspace_keys(
    harness: Harness, plugin: StandIn, keys, stream: bool
) -> None:
    result = harness.run(sample("support-ticket-triage"), TICKET, stream=stream)
    assert result.status is RunStatus.COMPLETED, result.error
    assert [b.status for b in result.blocks.values()] == [BlockStatus.COMPLETED] * 6
    classify = result.blocks["classify"]
    assert classify.output is not None
    assert (
        classify.output["json"]["urgency"] == "high"
    )  # the emulator answers the enum's first value
    assert result.blocks["is_urgent"].output == {"result": True, "value": "high", "content": "true"}
    fields = result.outputs["result"]
    assert fields["category"] == "billing"
    assert fields["reply"].startswith("Emulated anthropic reply from claude-haiku-4-5")
    assert fields["escalation"].startswith("Emulated anthropic reply from claude-sonnet-4-5")
    # every call: resolve -> call -> charge -> record, on the workspace's key, charged nothing
    assert len(result.calls) == 3
    assert {c.source for c in result.calls} == {CredentialSource.WORKSPACE}
    assert result.total_charge == Decimal(0)
    assert {c.idempotency_key for c in result.calls} == set(plugin.ledger)
    assert all(key.startswith(result.run_id + ":") and key.endswith(":1") for key in plugin.ledger)
    for call in result.calls:
        record = plugin.ledger[call.idempotency_key]
        assert record.usage == call.usage
        assert record.usage.total_tokens > 0
        assert record.source is CredentialSource.WORKSPACE
        assert call.streamed is stream
    seen = harness.emulator.calls()
    assert len(seen) == 3
    assert {c.key_label for c in seen} == {"workspace-openai", "workspace-anthropic"}
    assert all(c.stream is stream for c in seen)
    # streamed text arrived as it came
    texts = [e for e in harness.events if e.kind == "text"]
    assert bool(texts) is stream


def test_streamed_and_plain_runs_report_the_same_usage(harness: Harness) -> None:
    plain = harness.run(sample("support-ticket-triage"), TICKET, stream=False)
    streamed = harness.run(sample("support-ticket-triage"), TICKET, stream=True)
    assert [c.usage for c in plain.calls] == [c.usage for c in streamed.calls]


def test_a_branch_not_taken_is_skipped_and_reads_as_empty(harness: Harness) -> None:
    doc = sample_doc("support-ticket-triage")
    doc["blocks"]["is_urgent"]["in"] = ["critical"]
    result = harness.run(parse_workflow(doc), TICKET)
    assert result.status is RunStatus.COMPLETED
    escalate = result.blocks["escalate"]
    assert escalate.status is BlockStatus.SKIPPED
    assert escalate.reason == "on a branch not taken"
    assert escalate.calls == ()
    assert result.outputs["result"]["escalation"] is None  # null in an output, "" inside a prompt
    assert len(harness.emulator.calls()) == 2


def test_a_key_named_by_label_serves_its_block(harness: Harness, plugin: StandIn, keys) -> None:
    result = harness.run(sample("release-notes-translation"), {"changelog": "fix: login loop"})
    assert result.ok, result.error
    translate = result.blocks["translate"]
    assert translate.source == "workspace"
    assert translate.calls[0].key_id == "label-localization"
    assert result.blocks["notes"].source == "workspace"
    asked = {r.block_id: r for r in plugin.requests}
    assert asked["translate"].key_label == "localization"
    assert asked["translate"].block_key is None
    assert asked["notes"].key_label is None
    (call,) = harness.emulator.calls("anthropic")
    assert call.used_key(keys["block"]["anthropic"])


def test_a_labelled_block_never_runs_on_a_platform_key_a_plugin_answers(
    harness: Harness, plugin: StandIn
) -> None:
    plugin.ignore_labels = True  # a resolution plugin that does not know about labels
    result = harness.run(sample("release-notes-translation"), {"changelog": "fix: login loop"})
    assert not result.ok
    assert "asks for the anthropic key labelled 'localization' of workspace 'acme'" in result.error
    assert "answered a platform key" in result.error
    assert harness.emulator.calls("anthropic") == []
    assert not [k for k in plugin.ledger if ":translate:" in k]


def with_env_key(name: str, tool_key: bool = False) -> Workflow:
    doc = sample_doc("release-notes-translation")
    doc["blocks"]["translate"]["key"] = {"env": name}
    if tool_key:
        doc["blocks"]["notes"]["tools"] = [{"type": "exa_search", "key": {"env": name}}]
    return parse_workflow(doc)


def test_an_env_block_key_serves_its_block_when_the_operator_allowed_it(
    harness: Harness, keys
) -> None:
    harness.environ["LOCALIZATION_ANTHROPIC_KEY"] = keys["block"]["anthropic"]
    harness.env_keys = EnvKeyAllowance(("LOCALIZATION_",))
    result = harness.run(with_env_key("LOCALIZATION_ANTHROPIC_KEY"), {"changelog": "fix: x"})
    assert result.ok, result.error
    assert result.blocks["translate"].source == "block"
    (call,) = harness.emulator.calls("anthropic")
    assert call.used_key(keys["block"]["anthropic"])


def test_an_embedded_runner_refuses_every_env_reference_with_its_path(
    harness: Harness, keys
) -> None:
    harness.environ["LOCALIZATION_ANTHROPIC_KEY"] = keys["block"]["anthropic"]
    with pytest.raises(WorkflowError) as info:
        harness.run(with_env_key("LOCALIZATION_ANTHROPIC_KEY", tool_key=True), {"changelog": "x"})
    assert sorted(p.path for p in info.value.problems) == [
        "$.blocks.notes.tools[0].key.env",
        "$.blocks.translate.key.env",
    ]
    assert all("reads no block key from the environment" in p.message for p in info.value.problems)
    assert harness.emulator.calls() == []


def test_a_search_block_feeds_the_summary_and_is_charged_per_request(
    harness: Harness, plugin: StandIn
) -> None:
    plugin.workspace_keys.pop("exa")  # the search runs on the platform's Exa key
    result = harness.run(sample("research-brief"), {"topic": "heat pumps in cold climates"})
    assert result.ok, result.error
    search = result.blocks["search"]
    assert search.source == "platform"
    assert search.charge == Decimal("0.005")
    assert search.output is not None
    assert len(search.output["results"]) == 5
    assert "heat pumps in cold climates" in harness.emulator.calls("exa")[0].body["query"]
    assert result.outputs["report"]["first_source"] == search.output["results"][0]["url"]
    assert isinstance(result.outputs["report"]["claims_to_check"], list)
    (brief_call,) = harness.emulator.calls("openai")
    prompt = json.dumps(brief_call.body)
    assert search.output["results"][0]["url"] in prompt  # the sources reached the model
    assert result.total_charge == Decimal("0.005")


def test_an_agent_may_search_with_exa_before_it_answers(harness: Harness) -> None:
    doc = {
        "name": "fact-check",
        "version": "1",
        "inputs": {"claim": {}},
        "blocks": {
            "check": {
                "type": "agent",
                "model": "gpt-4o-mini",
                "prompt": "Is this true? {{inputs.claim}}",
                "tools": [{"type": "exa_search", "required": True, "num_results": 2}],
            }
        },
    }
    result = harness.run(parse_workflow(doc), {"claim": "the moon is made of cheese"})
    assert result.ok, result.error
    check = result.blocks["check"]
    assert [c.provider for c in check.calls] == ["openai", "exa", "openai"]
    assert [c.idempotency_key.split(":", 1)[1] for c in check.calls] == [
        "check:1",
        "check:1:2",
        "check:1:3",
    ]
    first, second = harness.emulator.calls("openai")
    assert first.body["tool_choice"] == "required"
    assert any(m.get("role") == "tool" for m in second.body["messages"])
    assert check.output is not None
    assert check.output["content"].startswith("Emulated openai reply")


def test_independent_blocks_run_concurrently(harness: Harness, plugin: StandIn) -> None:
    for provider in ("openai", "anthropic", "google", "mistral"):
        harness.emulator.add_fault(Fault(FaultKind.SLOW, provider=provider, delay=0.3, times=1))
    result = harness.run(sample("multi-provider-comparison"), {"question": "Why is the sky blue?"})
    assert result.ok, result.error
    branches = {"openai", "anthropic", "google", "mistral"}
    order = [
        (e.kind, e.block_id)
        for e in harness.events
        if e.block_id in branches and e.kind in {"started", "finished"}
    ]
    first_finish = next(i for i, (kind, _) in enumerate(order) if kind == "finished")
    assert {b for kind, b in order[:first_finish] if kind == "started"} == branches
    assert plugin.max_in_flight == 4
    judge_prompt = json.dumps(harness.emulator.calls("openai")[-1].body)
    for provider in ("anthropic", "google", "mistral"):
        assert f"Emulated {provider} reply" in judge_prompt


class CountingClient:
    """A provider client that counts the calls in flight through it (shared counter)."""

    def __init__(self, inner: Any, counter: dict[str, int]) -> None:
        self.inner = inner
        self.counter = counter

    async def _counted(self, call: Any) -> Any:
        self.counter["now"] += 1
        self.counter["max"] = max(self.counter["max"], self.counter["now"])
        try:
            return await call
        finally:
            self.counter["now"] -= 1

    def complete(self, request: Any, *, api_key: str) -> Any:
        return self._counted(self.inner.complete(request, api_key=api_key))

    def complete_streamed(self, request: Any, *, api_key: str, on_text: Any = None) -> Any:
        return self._counted(
            self.inner.complete_streamed(request, api_key=api_key, on_text=on_text)
        )

    def search(self, request: Any, *, api_key: str) -> Any:
        return self._counted(self.inner.search(request, api_key=api_key))


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_the_limit_on_concurrent_provider_calls_holds(harness: Harness, limit: int) -> None:
    for provider in ("openai", "anthropic", "google", "mistral"):
        harness.emulator.add_fault(Fault(FaultKind.SLOW, provider=provider, delay=0.05, times=1))
    counter = {"now": 0, "max": 0}

    async def go() -> RunResult:
        async with new_http_client() as http:
            clients = create_clients(http, environ=harness.environ, retry=FAST_RETRY)
            runner = WorkflowRunner(
                harness.pm,
                {name: CountingClient(c, counter) for name, c in clients.items()},
                environ=harness.environ,
                options=RunnerOptions(max_concurrent_calls=limit),
            )
            return await runner.run(
                sample("multi-provider-comparison"),
                actor=OPERATOR,
                workspace_id="acme",
                inputs={"question": "Why?"},
            )

    result = asyncio.run(go())
    assert result.ok, result.error
    assert counter["max"] == limit
    assert counter["now"] == 0


# --- refused keys and the fallback policy ------------------------------------------------------


def test_a_refused_workspace_key_under_never_fails_the_block_naming_workspace_provider_and_masked_key(
    harness: Harness, plugin: StandIn, keys
) -> None:
    harness.emulator.state.remove_key("anthropic", keys["workspace"]["anthropic"])
    result = harness.run(sample("support-ticket-triage"), TICKET)
    assert result.status is RunStatus.FAILED
    failed = result.failed_block
    assert failed is not None
    assert failed.block_id in {"draft_reply", "escalate"}
    message = failed.error or ""
    assert "workspace 'acme'" in message
    assert "anthropic refused the workspace key" in message
    assert mask(keys["workspace"]["anthropic"]) in message
    assert "HTTP 401" in message
    assert keys["workspace"]["anthropic"] not in message
    assert result.error is not None
    assert keys["workspace"]["anthropic"] not in result.error
    # the policy was asked, with the failure
    (asked,) = [
        r for r in plugin.requests if r.failure is not None and r.block_id == failed.block_id
    ]
    assert asked.failure.source is CredentialSource.WORKSPACE
    assert asked.failure.status == 401
    # no platform key was used, and nothing was charged for the refused call
    assert not [c for c in harness.emulator.calls() if (c.key_label or "").startswith("platform")]
    assert failed.calls == ()
    assert not [k for k in plugin.ledger if f":{failed.block_id}:" in k]
    assert result.blocks["result"].status is BlockStatus.SKIPPED


def test_a_refused_workspace_key_under_on_error_is_served_by_the_platform(
    harness: Harness, plugin: StandIn, keys
) -> None:
    plugin.policy = "on_error"
    harness.emulator.state.remove_key("anthropic", keys["workspace"]["anthropic"])
    result = harness.run(sample("support-ticket-triage"), TICKET)
    assert result.ok, result.error
    for block_id in ("draft_reply", "escalate"):
        (call,) = result.blocks[block_id].calls
        assert call.source is CredentialSource.PLATFORM
        assert call.fallback is True
        assert [(r.source, r.status, r.hint) for r in call.rejected] == [
            (CredentialSource.WORKSPACE, 401, mask(keys["workspace"]["anthropic"]))
        ]
        record = plugin.ledger[call.idempotency_key]
        assert record.source is CredentialSource.PLATFORM
        assert record.fallback is True
        assert record.charge.amount == PER_TOKEN * call.usage.total_tokens > 0
    labels = [c.key_label for c in harness.emulator.calls("anthropic")]
    assert sorted(labels, key=str) == [None, None, "platform-anthropic", "platform-anthropic"]


def test_a_rate_limited_key_is_reported_to_the_policy_as_a_rate_limit(
    harness: Harness, plugin: StandIn, keys
) -> None:
    harness.emulator.add_fault(
        Fault.for_key(FaultKind.RATE_LIMIT, keys["workspace"]["openai"], times=None, retry_after=0)
    )
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc))
    assert not result.ok
    assert "rate limit" in (result.blocks["a"].error or "")
    (asked,) = [r for r in plugin.requests if r.failure is not None]
    assert asked.failure.reason.value == "rate_limit"
    assert asked.failure.status == 429


# --- retries are charged once, failures nothing -------------------------------------------------


def test_a_retried_block_is_charged_once(harness: Harness, plugin: StandIn, keys) -> None:
    harness.emulator.add_fault(
        Fault.for_key(FaultKind.TRUNCATED_STREAM, keys["block"]["anthropic"], times=1)
    )
    result = harness.run(
        sample("release-notes-translation"), {"changelog": "feat: dark mode"}, stream=True
    )  # the translate block runs on the stored key labelled "localization"
    assert result.ok, result.error
    translate = result.blocks["translate"]
    assert translate.attempts == 2
    (call,) = translate.calls
    assert call.idempotency_key.endswith(":translate:2")
    # the cut first try is recorded once, flagged interrupted, with what the provider billed
    first = call.idempotency_key.removesuffix(":2") + ":1"
    assert sorted(k for k in plugin.ledger if ":translate:" in k) == [first, call.idempotency_key]
    interrupted = plugin.ledger[first]
    assert interrupted.status == "interrupted"
    assert interrupted.usage.total_tokens > 0
    assert interrupted.charge.amount == 0  # the block's own key
    assert plugin.ledger[call.idempotency_key].status == "complete"
    assert len(harness.emulator.calls("anthropic")) == 2  # the provider saw both tries
    assert [e.kind for e in harness.events if e.block_id == "translate"][-2:] == [
        "text",
        "finished",
    ]
    assert any(e.kind == "retrying" for e in harness.events)


def test_a_rerun_with_the_same_run_id_records_nothing_twice(
    harness: Harness, plugin: StandIn
) -> None:
    first = harness.run(sample("support-ticket-triage"), TICKET, run_id="run-fixed")
    second = harness.run(sample("support-ticket-triage"), TICKET, run_id="run-fixed")
    assert [c.idempotency_key for c in first.calls] == [c.idempotency_key for c in second.calls]
    assert plugin.record_calls == 6
    assert len(plugin.ledger) == 3


def test_a_ledger_hiccup_is_retried_under_the_same_idempotency_key(
    harness: Harness, plugin: StandIn
) -> None:
    plugin.fail_records = 2
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc))
    assert result.ok, result.error
    assert plugin.record_calls == 3
    assert list(plugin.ledger) == [result.calls[0].idempotency_key]


def test_a_ledger_that_stays_down_fails_the_block(
    harness: Harness, plugin: StandIn, pm: pluggy.PluginManager
) -> None:
    plugin.fail_records = 99
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc), options=RunnerOptions(record_attempts=2))
    assert not result.ok
    assert "could not be recorded" in (result.error or "")
    assert plugin.ledger == {}
    # the call completed: the result carries its usage, charge and key for the host to re-submit
    (call,) = result.unrecorded
    assert call.recorded is False
    assert call.usage.total_tokens > 0
    assert (call.charge.reason, call.source.value) == ("workspace", "workspace")
    plugin.fail_records = 0
    pm.hook.byok_record_usage(record=call.usage_record())
    assert list(plugin.ledger) == [call.idempotency_key]
    assert plugin.ledger[call.idempotency_key].charge == call.charge


def test_a_record_refused_for_its_own_sake_is_not_tried_again(
    harness: Harness, plugin: StandIn
) -> None:
    # a ValueError (the default plugin's StoreRefusedValue is one) fails the same way on every
    # try: the block fails at once, without the retries and their back-off meant for an outage
    plugin.refuse_records = True
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc), options=RunnerOptions(record_attempts=3))
    assert not result.ok
    assert "could not be recorded" in (result.error or "")
    assert "refuses this record's workflow_id" in (result.error or "")
    assert plugin.record_calls == 1
    (call,) = result.unrecorded
    assert call.recorded is False


def test_a_failed_block_is_charged_nothing_and_the_rest_is_skipped(
    harness: Harness, plugin: StandIn
) -> None:
    harness.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="openai", times=None))
    result = harness.run(
        sample("support-ticket-triage"), TICKET, options=RunnerOptions(block_retries=1)
    )
    assert result.status is RunStatus.FAILED
    classify = result.blocks["classify"]
    assert classify.status is BlockStatus.FAILED
    assert classify.attempts == 2
    assert "openai server error (HTTP 500)" in (classify.error or "")
    assert classify.calls == ()
    assert classify.charge == Decimal(0)
    assert plugin.ledger == {}
    assert result.blocks["start"].status is BlockStatus.COMPLETED
    for block_id in ("is_urgent", "draft_reply", "escalate", "result"):
        skipped = result.blocks[block_id]
        assert skipped.status is BlockStatus.SKIPPED
        assert skipped.reason == "not started: block 'classify' failed"
    # the client retried (2 attempts) within each of the block's 2 tries
    assert len(harness.emulator.calls("openai")) == 4
    assert result.error == f"block 'classify' failed: {classify.error}"


def test_a_running_sibling_finishes_and_is_recorded_when_another_block_fails(
    harness: Harness, plugin: StandIn
) -> None:
    harness.emulator.add_fault(Fault(FaultKind.SERVER_ERROR, provider="google", times=None))
    harness.emulator.add_fault(Fault(FaultKind.SLOW, provider="mistral", delay=0.2, times=1))
    result = harness.run(
        sample("multi-provider-comparison"),
        {"question": "q"},
        options=RunnerOptions(block_retries=0),
    )
    assert result.status is RunStatus.FAILED
    assert result.blocks["google"].status is BlockStatus.FAILED
    assert result.blocks["mistral"].status is BlockStatus.COMPLETED
    assert result.blocks["judge"].status is BlockStatus.SKIPPED
    assert {r.block_id for r in plugin.ledger.values()} == {"openai", "anthropic", "mistral"}


def test_a_malformed_answer_fails_the_block_and_is_charged_nothing(
    harness: Harness, plugin: StandIn
) -> None:
    harness.emulator.add_fault(Fault(FaultKind.MALFORMED_JSON, provider="openai", times=None))
    result = harness.run(
        sample("support-ticket-triage"), TICKET, options=RunnerOptions(block_retries=0)
    )
    assert not result.ok
    assert "openai protocol error" in (result.blocks["classify"].error or "")
    # the garbage came with a 200: executed by the provider, so recorded, uncertain and uncharged
    (row,) = plugin.ledger.values()
    assert (row.status, row.charge.amount) == ("uncertain", 0)


# --- refused before anything runs ------------------------------------------------------------


def test_a_missing_input_is_refused_before_anything_runs(harness: Harness) -> None:
    with pytest.raises(InputsError) as info:
        harness.run(sample("support-ticket-triage"), {})
    assert [p.path for p in info.value.problems] == ["$.inputs.ticket"]
    assert harness.emulator.calls() == []


def test_an_env_block_key_is_checked_again_at_run_time(
    pm: pluggy.PluginManager, emulator: EmulatorServer, keys
) -> None:
    """The preflight is done once per workflow: a variable changed since (now holding a platform
    key) is refused at the call, before the provider sees it."""
    platform = keys["platform"]["anthropic"]
    environ = {**emulator.environ(), "LOCALIZATION_ANTHROPIC_KEY": keys["block"]["anthropic"]}
    allowance = EnvKeyAllowance(("LOCALIZATION_",), reserved=lambda value: value == platform)
    workflow = with_env_key("LOCALIZATION_ANTHROPIC_KEY")

    async def go() -> tuple[RunResult, RunResult]:
        async with WorkflowRunner.open(
            pm, environ=environ, env_keys=allowance, retry=FAST_RETRY
        ) as runner:
            first = await runner.run(
                workflow, actor=OPERATOR, workspace_id="acme", inputs={"changelog": "x"}
            )
            environ["LOCALIZATION_ANTHROPIC_KEY"] = platform
            second = await runner.run(
                workflow, actor=OPERATOR, workspace_id="acme", inputs={"changelog": "x"}
            )
            return first, second

    first, second = asyncio.run(go())
    assert first.ok, first.error
    assert not second.ok
    assert "holds one of the platform's keys" in (second.error or "")
    assert [c.key_label for c in emulator.calls("anthropic")] == ["block-anthropic"]
    assert platform not in (second.error or "")


def test_an_unset_block_key_variable_is_refused_before_anything_runs(harness: Harness) -> None:
    harness.env_keys = EnvKeyAllowance(("LOCALIZATION_",))
    with pytest.raises(WorkflowError) as info:
        harness.run(with_env_key("LOCALIZATION_ANTHROPIC_KEY"), {"changelog": "x"})
    (problem,) = info.value.problems
    assert problem.path == "$.blocks.translate.key.env"
    assert "LOCALIZATION_ANTHROPIC_KEY is not set" in problem.message
    assert harness.emulator.calls() == []


def test_an_unknown_model_is_refused_before_anything_runs(harness: Harness) -> None:
    doc = copy.deepcopy(sample_doc("multi-provider-comparison"))
    doc["blocks"]["mistral"]["model"] = "mistral-huge-unknown"
    with pytest.raises(WorkflowError) as info:
        harness.run(parse_workflow(doc), {"question": "q"})
    assert [p.path for p in info.value.problems] == ["$.blocks.mistral.model"]
    assert harness.emulator.calls() == []


def test_no_charge_answer_is_recorded_as_uncharged_with_a_reason(
    harness: Harness, plugin: StandIn
) -> None:
    plugin.charge_answers = False
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc))
    (record,) = plugin.ledger.values()
    assert record.charge.amount == 0
    assert record.charge.reason == "no billing plugin answered"
    assert result.ok


def test_a_charge_that_fails_after_the_call_is_recorded_uncharged_and_fails_the_block(
    harness: Harness, plugin: StandIn, pm: pluggy.PluginManager, emulator: EmulatorServer
) -> None:
    class BrokenBilling:
        @hookimpl(tryfirst=True)
        def byok_compute_charge(self, usage, credential):
            raise RuntimeError("billing backend down")

    pm.register(BrokenBilling())
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    result = harness.run(parse_workflow(doc))
    assert not result.ok
    assert "byok_compute_charge failed (RuntimeError: billing backend down)" in (result.error or "")
    (record,) = plugin.ledger.values()  # the completed call is never lost
    assert (record.charge.amount, record.charge.reason) == (0, "charge_failed")
    (call,) = result.calls  # and the result lists it, recorded
    assert call.recorded is True
    assert call.idempotency_key == record.idempotency_key
    assert len(emulator.calls("openai")) == 1  # and not called again


def test_a_hook_error_that_quotes_the_key_is_redacted_in_the_result_events_and_logs(
    harness: Harness,
    plugin: StandIn,
    pm: pluggy.PluginManager,
    keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class LeakyHooks:
        @hookimpl(tryfirst=True)
        def byok_compute_charge(self, usage, credential):
            raise RuntimeError(f"billing saw key={credential.api_key}")

    class Crashing:
        @hookimpl(tryfirst=True)
        def byok_record_usage(self, record):
            raise KeyError(f"Bearer {keys['workspace']['openai'].upper()}")

    pm.register(LeakyHooks())
    doc = {
        "name": "one",
        "version": "1",
        "blocks": {"a": {"type": "agent", "model": "gpt-4o-mini", "prompt": "hi"}},
    }
    key = keys["workspace"]["openai"]
    with caplog.at_level(logging.DEBUG):
        first = harness.run(parse_workflow(doc))
        pm.register(Crashing())
        second = harness.run(parse_workflow(doc), options=RunnerOptions(record_attempts=1))
    for result in (first, second):
        assert not result.ok
        assert "[redacted]" in (result.error or "")
    texts = [
        json.dumps(first.to_dict()),
        json.dumps(second.to_dict()),
        caplog.text,
        *(e.text for e in harness.events),
    ]
    for text in texts:
        assert key.lower() not in text.lower()
        assert key[-12:].lower() not in text.lower()


def test_the_result_serialises_to_json(harness: Harness) -> None:
    result = harness.run(sample("research-brief"), {"topic": "x"})
    document = json.loads(json.dumps(result.to_dict()))
    assert document["status"] == "completed"
    assert [b["block"] for b in document["blocks"]] == ["search", "brief", "claims", "report"]
    assert document["totals"]["calls"] == 3
    assert document["blocks"][1]["calls"][0]["source"] == "workspace"


def test_a_billing_plugin_may_charge_in_another_currency(harness: Harness, plugin: StandIn) -> None:
    plugin.currency = "EUR"
    plugin.workspace_keys.clear()
    result = harness.run(sample("multi-provider-comparison"), {"question": "q"})
    assert result.ok, result.error
    assert result.currency == "EUR"
    assert result.charges_by_currency == {"EUR": result.total_charge}
    assert result.to_dict()["totals"]["currency"] == "EUR"
    from byok_plugin.cli.run import cost_table, money

    assert money(result.total_charge, "EUR").endswith(" EUR")
    assert cost_table(result).columns[5].header == "charge"
