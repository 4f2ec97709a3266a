"""One provider call, in four steps: resolve the credential (``byok_resolve_credential``, asked
again with ``request.failure`` when the provider refuses the key), hold its budget, make the call,
then charge and record it (:mod:`byok_plugin.host.recording`)."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from byok_hookspecs import (
    ByokError,
    Credential,
    CredentialRequest,
    CredentialSource,
    FailureReason,
    NoCredential,
    ProviderFailure,
    Usage,
    calling_inline,
    redact,
)

from byok_plugin.host.budget_holds import _Budget, _estimate_of
from byok_plugin.host.env_keys import env_key_refusal
from byok_plugin.host.hook_calls import RESERVE_HOOKS, RESOLVE_HOOKS
from byok_plugin.host.providers.common import CompletionRequest, FunctionTool
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
from byok_plugin.host.providers.retry import retrying_once_sent
from byok_plugin.host.recording import CHARGE_FAILED, Recording, _recorder
from byok_plugin.host.run_result import CallResult, Rejection
from byok_plugin.host.run_state import BlockFailed, _CallSite, _Run
from byok_plugin.host.workflow import KeyRef

#: failures of a workspace key after which resolution is asked again (reason ``error``): the
#: fallback policy ``on_error`` may then serve the call with the platform key
_ASK_AGAIN_ON_ERROR = (ServerError, ProviderTimeout, ProviderUnreachable)


class Calls(Recording):
    """The call pipeline: resolve, call, charge, record."""

    async def _call(
        self,
        site: _CallSite,
        key: KeyRef | None,
        stream: bool,
        invoke: Callable[[str], Awaitable[Any]],
        worst: Usage | None = None,
    ) -> tuple[Any, CallResult]:
        """:meth:`_call_held`, whose budget hold is released if the call does not complete."""
        run = site.run
        budget = _Budget(
            site.idempotency_key, run.workspace_id, run.workflow.name, run.run_id, site.block_id
        )
        budget.estimate = _estimate_of(worst)
        budget.tools = tuple(name for name, _ in worst.tool_uses) if worst is not None else ()
        if self.pm.hook.byok_reserve_budget.get_hookimpls():  # else nothing to hold it against
            budget.worst = worst
        try:
            return await self._call_held(site, key, stream, invoke, budget)
        except BaseException:
            if budget.hold is not None and not budget.settled:
                self._release_soon(budget)
            raise

    async def _call_held(
        self,
        site: _CallSite,
        key: KeyRef | None,
        stream: bool,
        invoke: Callable[[str], Awaitable[Any]],
        budget: _Budget,
    ) -> tuple[Any, CallResult]:
        run, block_id, provider, model = site.run, site.block_id, site.provider, site.model
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
                        result = await _called(provider, invoke, credential.api_key)
                    latency = self._clock() - started
            except ProviderError as exc:
                if not isinstance(exc, AuthError | RateLimitError):
                    await self._record_unfinished(site, credential, exc, len(rejected), budget)
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
                        site, credential, partial, "interrupted", 0, budget
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

        make_record = _recorder(site, idempotency_key, usage, credential)

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
                if budget.hold is not None:  # the record and the settlement in one transaction
                    charge, record, error, charge_error = self._settle_with_hold(
                        usage, credential, make_record, budget
                    )
                else:
                    charge, record, error, charge_error = self._settle(
                        usage, credential, make_record
                    )
            # settled before the record's retries are awaited (a cancelled run would stop there)
            if budget.hold is not None and not budget.settled:
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
            attempt=site.attempt,
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

    async def _resolve(
        self, request: CredentialRequest, budget: _Budget | None = None
    ) -> Credential:
        """The credential for the call, then its budget hold (in one trip to a worker thread when
        the hooks run there)."""
        held = budget is not None and budget.worst is not None
        if held and self.thread_for(RESOLVE_HOOKS + RESERVE_HOOKS):
            credential: Credential | None = await self._hook(
                self._resolve_and_reserve, request, budget
            )
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

    def _resolve_and_reserve(
        self, request: CredentialRequest, budget: _Budget
    ) -> Credential | None:
        credential: Credential | None = self.pm.hook.byok_resolve_credential(request=request)
        if credential is not None and credential.provider == request.provider:
            self._reserve_now(credential, budget)
        return credential

    async def _resolve_hook(self, request: CredentialRequest) -> Credential | None:
        """``byok_resolve_credential``: on the event loop when :data:`RESOLVE_HOOKS` do not block
        (:meth:`thread_for`), else in a worker thread."""
        if not self.thread_for(RESOLVE_HOOKS):
            with calling_inline():
                credential: Credential | None = self.pm.hook.byok_resolve_credential(
                    request=request
                )
                return credential
        loop = asyncio.get_running_loop()
        answer: Credential | None = await loop.run_in_executor(
            None, functools.partial(self.pm.hook.byok_resolve_credential, request=request)
        )
        return answer


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


def _refusal(run: _Run, provider: str, credential: Credential, exc: ProviderError) -> str:
    """Which workspace, which provider, which key (masked), and what the provider said."""
    key = credential.hint or credential.key_id or "(no hint)"
    status = f"HTTP {exc.status} " if exc.status is not None else ""
    return (
        f"workspace {run.workspace_id!r}: {provider} refused the {credential.source.value} key "
        f"{key} ({status}{exc.kind}: {exc.message})"
    )


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


async def _called(provider: str, invoke: Callable[[str], Awaitable[Any]], api_key: str) -> Any:
    """``invoke(api_key)``; a client's own failure other than a :class:`ProviderError` (a bug,
    an answer it did not foresee) is a :class:`ProtocolError` of a call that may have been
    executed: the request may have been sent, so the call is recorded ``uncertain`` as a lost
    answer is, never left unrecorded. A request the provider's API cannot express
    (:class:`UnsupportedRequest`) is refused before anything is sent, and passes as it is."""
    try:
        return await invoke(api_key)
    except (ProviderError, UnsupportedRequest):
        raise
    except Exception as exc:
        raise ProtocolError(
            provider,
            f"the {provider} client failed while calling ({type(exc).__name__})",
            maybe_executed=True,
        ) from exc
