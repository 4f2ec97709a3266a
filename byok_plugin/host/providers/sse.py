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


class _LineSplitter:
    """Cuts the chunks of a body into lines, without their ends (CR LF, LF or CR), however the
    chunks break them; the start of a line whose end has not arrived is kept until it does."""

    __slots__ = ("after_cr", "max_line", "pending", "pending_size")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.after_cr = False  # the last chunk ended with CR: a LF opening the next is that end

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.after_cr:
            self.after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self.pending_size += len(chunk)
            if self.pending_size > self.max_line:
                raise StreamTooLarge("a line of the stream is", self.max_line)
            self.pending.append(chunk)
            return []
        self.after_cr = chunk[-1:] == b"\r"
        if self.pending:
            self.pending.append(chunk)
            chunk = b"".join(self.pending)
            self.pending = []
        lines = chunk.splitlines()  # bytes split at CR LF, LF and CR only
        self.pending_size = 0
        if chunk[-1:] not in (b"\n", b"\r"):
            last = lines.pop()
            self.pending, self.pending_size = [last], len(last)
        if self.pending_size > self.max_line or any(len(x) > self.max_line for x in lines):
            raise StreamTooLarge("a line of the stream is", self.max_line)
        return lines


async def iter_sse(
    response: httpx.Response, *, max_event: int, max_stream: int
) -> AsyncIterator[ServerSentEvent]:
    """The events of ``response``'s body; a last line with no end is dropped (it cannot close an
    event)."""
    lines = _LineSplitter(max_event)
    event = ""
    data: list[str] = []
    size = total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_stream:
            raise StreamTooLarge("the stream is", max_stream)
        for raw in lines.feed(chunk):
            if not raw:
                if data:
                    yield ServerSentEvent(event or "message", "\n".join(data))
                event, data, size = "", [], 0
                continue
            if raw.startswith(b"data:"):
                value = raw[6:] if raw[5:6] == b" " else raw[5:]
            elif raw[:1] == b":":
                continue
            else:
                name, _, rest = raw.partition(b":")
                if rest[:1] == b" ":
                    rest = rest[1:]
                if name == b"event":
                    event = rest.decode("utf-8", "replace")
                if name != b"data":
                    continue
                value = rest
            size += len(value)
            if size > max_event:
                raise StreamTooLarge("an event of the stream is", max_event)
            data.append(value.decode("utf-8", "replace"))
