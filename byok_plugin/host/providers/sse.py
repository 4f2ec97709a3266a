"""A small server-sent events reader (https://html.spec.whatwg.org/multipage/server-sent-events.html).

Yields ``(event, data)`` pairs from an ``httpx`` streamed response; an event not closed by a blank
line before the body ends is dropped, as the specification says — so a cut stream never yields a
half event. Lines end at CR LF, LF or CR (and nowhere else: a U+2028 inside a JSON string is
text), and are read as UTF-8.

The reader is bounded: an event (its data lines together) or any one line longer than
``max_event`` bytes, or a stream longer than ``max_stream`` bytes in all, raises
:class:`StreamTooLarge` once the limit is passed, without reading (or keeping) more of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

__all__ = ["ServerSentEvent", "StreamTooLarge", "iter_sse"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str


class StreamTooLarge(Exception):
    """A stream passed one of the reader's limits (``what`` says which)."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        super().__init__(f"{what} larger than {limit} bytes")


async def _lines(response: httpx.Response, max_line: int, max_stream: int) -> AsyncIterator[bytes]:
    """The lines of the body, without their ends; a last line with no end is dropped (it cannot
    close an event)."""
    pending: list[bytes] = []  # the start of a line whose end has not arrived
    pending_size = 0
    after_cr = False  # the last chunk ended with CR: a LF opening the next one is the same end
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_stream:
            raise StreamTooLarge("the stream is", max_stream)
        if after_cr:
            after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            continue
        after_cr = chunk[-1:] == b"\r"
        if b"\n" not in chunk and b"\r" not in chunk:
            pending_size += len(chunk)
            if pending_size > max_line:
                raise StreamTooLarge("a line of the stream is", max_line)
            pending.append(chunk)
            continue
        if pending:
            pending.append(chunk)
            chunk = b"".join(pending)
            pending = []
        lines = chunk.splitlines()  # bytes split at CR LF, LF and CR only
        if chunk[-1:] not in (b"\n", b"\r"):
            last = lines.pop()
            pending, pending_size = [last], len(last)
        else:
            pending_size = 0
        for line in lines:
            if len(line) > max_line:
                raise StreamTooLarge("a line of the stream is", max_line)
            yield line
        if pending_size > max_line:
            raise StreamTooLarge("a line of the stream is", max_line)


async def iter_sse(
    response: httpx.Response, *, max_event: int, max_stream: int
) -> AsyncIterator[ServerSentEvent]:
    event = ""
    data: list[str] = []
    size = 0
    async for raw in _lines(response, max_event, max_stream):
        if not raw:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data))
            event, data, size = "", [], 0
            continue
        if raw[:1] == b":":
            continue
        line = raw.decode("utf-8", "replace")
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            size += len(raw)
            if size > max_event:
                raise StreamTooLarge("an event of the stream is", max_event)
            data.append(value)
        elif name == "event":
            event = value
