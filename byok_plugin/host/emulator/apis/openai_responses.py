"""OpenAI's Responses API (``POST /v1/responses``), streamed and not.

Wire format as in https://platform.openai.com/docs/api-reference/responses : ``input`` (a string or
a list of items), ``instructions``, ``max_output_tokens``, ``text.format`` (``json_schema``,
``json_object``), ``reasoning.effort``, ``tools`` (``{"type": "function", "name", "parameters"}``)
and ``tool_choice``. The answer is a ``response`` object whose ``output`` holds a ``reasoning``
item (reasoning models), then a ``message`` (``output_text`` content) or a ``function_call``;
``usage`` is ``{input_tokens, input_tokens_details.cached_tokens, output_tokens,
output_tokens_details.reasoning_tokens, total_tokens}`` with the cached tokens part of
``input_tokens`` and the reasoning tokens part of ``output_tokens``. A stream sends
``response.created``, ``response.in_progress``, per item ``response.output_item.added`` ... ``.done``
(with ``response.output_text.delta`` or ``response.function_call_arguments.delta`` events in
between), then ``response.completed`` carrying the whole response; every event has a
``sequence_number``. ``POST /v1/responses/input_tokens`` counts a request's input tokens. A reply
cut at ``max_output_tokens`` is ``status: "incomplete"`` with
``incomplete_details.reason: "max_output_tokens"`` and ends with ``response.incomplete``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from byok_plugin.host.emulator.apis.base import BadRequest, new_id, now, sse
from byok_plugin.host.emulator.synth import Reply, make_reply, schema_instance, text_of


def _input_texts(body: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(every text part of the prompt, the user messages' texts)."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise BadRequest("'input' must be a string or a non-empty array of input items")
    instructions = body.get("instructions")
    parts = [instructions] if isinstance(instructions, str) and instructions else []
    users = []
    for item in items:
        if not isinstance(item, Mapping):
            raise BadRequest("every item of 'input' must be an object")
        if item.get("type") == "function_call_output":
            parts.append(text_of(item.get("output")))
            continue
        text = text_of(item.get("content"))
        parts.append(text)
        if item.get("role") == "user":
            users.append(text)
    return parts, users


def responses_reply(body: Mapping[str, Any]) -> Reply:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Missing required parameter: 'model'.")
    parts, users = _input_texts(body)
    fmt = (body.get("text") or {}).get("format") or {}
    schema = None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema") or {}
    elif isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    max_tokens = body.get("max_output_tokens")
    reasoning = body.get("reasoning") or {}
    return make_reply(
        provider="openai",
        model=model,
        parts=parts,
        last_user=users[-1] if users else "",
        max_tokens=int(max_tokens) if max_tokens else None,
        schema=schema,
        reasoning=True if isinstance(reasoning, Mapping) and reasoning.get("effort") else None,
    )


def forced_function(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The function the request forces (``tool_choice`` ``required`` or a named function)."""
    tools = [
        t for t in body.get("tools") or [] if isinstance(t, Mapping) and t.get("type") == "function"
    ]
    choice = body.get("tool_choice")
    if not tools or choice in (None, "auto", "none"):
        return None
    if isinstance(choice, Mapping):
        return next((t for t in tools if t.get("name") == choice.get("name")), None)
    return tools[0] if choice == "required" else None


def usage(reply: Reply) -> dict[str, Any]:
    output = reply.output_tokens + reply.reasoning_tokens
    return {
        "input_tokens": reply.prompt_tokens,
        "input_tokens_details": {"cached_tokens": reply.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
        "total_tokens": reply.prompt_tokens + output,
    }


def build_response(body: Mapping[str, Any], model: str) -> tuple[dict[str, Any], Reply]:
    """The complete ``response`` object for ``body`` (model named ``model``)."""
    reply = responses_reply(body)
    output: list[dict[str, Any]] = []
    if reply.reasoning_tokens:
        output.append({"id": new_id("rs_"), "type": "reasoning", "summary": []})
    function = forced_function(body)
    if function is not None:
        arguments = schema_instance(function.get("parameters") or {"type": "object"})
        output.append(
            {
                "id": new_id("fc_"),
                "type": "function_call",
                "status": "completed",
                "arguments": json.dumps(arguments),
                "call_id": new_id("call_"),
                "name": function.get("name"),
            }
        )
    else:
        output.append(
            {
                "id": new_id("msg_"),
                "type": "message",
                "status": "completed" if reply.finish == "stop" else "incomplete",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
                ],
            }
        )
    complete = function is not None or reply.finish == "stop"
    response = {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": now(),
        "status": "completed" if complete else "incomplete",
        "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
        "service_tier": "default",
        "store": bool(body.get("store", True)),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage(reply),
        "metadata": body.get("metadata") or {},
    }
    return response, reply


def stream_events(response: dict[str, Any], reply: Reply) -> list[str]:
    """The events of a streamed ``response``; the last one is its terminal event."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    started = {
        **response,
        "status": "in_progress",
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    emit("response.created", response=started)
    emit("response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        ids = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            emit("response.output_item.added", output_index=index, item=item)
        elif item["type"] == "function_call":
            emit(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            emit("response.function_call_arguments.delta", delta=item["arguments"], **ids)
            emit("response.function_call_arguments.done", arguments=item["arguments"], **ids)
        else:
            emit(
                "response.output_item.added",
                output_index=index,
                item={**item, "content": [], "status": "in_progress"},
            )
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            emit("response.content_part.added", content_index=0, part=empty, **ids)
            for piece in reply.pieces:
                emit("response.output_text.delta", content_index=0, delta=piece, logprobs=[], **ids)
            part = item["content"][0]
            emit(
                "response.output_text.done",
                content_index=0,
                text=part["text"],
                logprobs=[],
                **ids,
            )
            emit("response.content_part.done", content_index=0, part=part, **ids)
        emit("response.output_item.done", output_index=index, item=item)
    terminal = "response.completed" if response["status"] == "completed" else "response.incomplete"
    emit(terminal, response=response)
    return [sse(event, event["type"]) for event in events]
