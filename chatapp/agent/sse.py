"""A streamed answer: OpenAI's server-sent chunks read byte by byte as they arrive, each read
within the deadline that applies (the first piece, the gap between pieces, the whole stream)."""
import json
import logging
import time

import requests

from chatapp.agent.cancel import cancelled
from chatapp.agent.contract import finish_reason
from chatapp.agent.transport import AttemptFailed, FailureKind, read_some
from chatapp.values import FINISHED, reject_json_constant, storable_json, unstorable

log = logging.getLogger(__name__)

# After [DONE] a well-behaved agent ends the body at once; reading that end lets the connection be
# pooled again, and waiting longer for it would only delay the end of the answer.
DRAIN_SECONDS = 0.1


class AgentStream:
    """The pieces of a streamed answer (OpenAI's server-sent chunks) as they arrive, each within its
    deadline; `usage` is set once the agent sends it. Iterating to the end or failing closes it."""

    def __init__(
        self,
        response: requests.Response,
        *,
        attempts: int,
        first_deadline: float,
        gap: float,
        end: float,
        max_bytes: int,
        request_id: str | None = None,
    ):
        self.usage: dict | None = None
        self.finish_reason = FINISHED  # until a chunk says the agent hit its token limit
        self.attempts = attempts
        self._response = response
        self._first_deadline = first_deadline
        self._gap = gap
        self._end = end
        self._max_bytes = max_bytes
        self._request_id = request_id
        self._received = 0
        self._buffer = bytearray()
        self._parsed = 0  # bytes of the buffer already taken as lines
        self._scanned = 0  # bytes of the buffer known to hold no line end after _parsed
        self._data: list[bytes] = []  # the data lines of the event being read
        self._yielded = 0
        self._done = False  # [DONE] was read
        self._closed = False

    def __repr__(self) -> str:
        return f"<AgentStream attempts={self.attempts} pieces={self._yielded} closed={self._closed}>"

    def __iter__(self) -> "AgentStream":
        return self

    def __next__(self) -> str:
        """The next non-empty piece of content; StopIteration after [DONE], AgentUnavailable on a failure."""
        if self._done or self._closed:
            self.close()
            raise StopIteration
        try:
            piece = self._next_piece()
        except AttemptFailed as failure:
            self.close()
            if cancelled():  # the stop cut the connection: not the agent's failure
                raise AttemptFailed(FailureKind.STOPPED).unavailable(self.attempts) from None
            log.warning("agent stream failed: %s, attempt %d, after %d pieces",
                        failure.kind, self.attempts, self._yielded, extra={"request_id": self._request_id})
            raise failure.unavailable(self.attempts) from None
        except BaseException:
            self.close()
            raise
        if piece is None:
            self.close()
            raise StopIteration
        self._yielded += 1
        return piece

    def __enter__(self) -> "AgentStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the agent call now: its connection is closed, unless the answer was read to its end."""
        if not self._closed:
            self._closed = True
            self._response.close()

    def _next_piece(self) -> str | None:
        """The next piece, reading within the deadline that applies now; None after [DONE]."""
        if self._yielded:
            # The gap runs from when we ask again, so a slow reader of ours is not blamed on the agent.
            deadline = min(time.monotonic() + self._gap, self._end)
        else:
            deadline = min(self._first_deadline, self._end)
        # What has arrived is parsed before reading more: pieces before a bad event are still served.
        while (piece := self._parse_buffered()) is None and not self._done:
            data = read_some(self._response, deadline)
            if not data:
                raise AttemptFailed(FailureKind.MALFORMED)  # the body ended without [DONE]: the answer may be cut
            self._count(len(data))
            del self._buffer[:self._parsed]
            self._scanned -= self._parsed
            self._parsed = 0
            self._buffer += data
        if self._done:
            self._drain()
        return piece

    def _count(self, size: int) -> None:
        """Add to the bytes received; AttemptFailed past the cap."""
        self._received += size
        if self._received > self._max_bytes:
            raise AttemptFailed(FailureKind.TOO_LARGE)

    def _parse_buffered(self) -> str | None:
        """Parse the complete lines (LF or CRLF) received until a piece comes out or [DONE] is read."""
        while not self._done:
            newline = self._buffer.find(b"\n", max(self._parsed, self._scanned))
            if newline < 0:
                self._scanned = len(self._buffer)
                return None
            line = bytes(self._buffer[self._parsed:newline])
            self._parsed = self._scanned = newline + 1
            piece = self._line(line[:-1] if line.endswith(b"\r") else line)
            if piece:
                return piece
        return None

    def _line(self, line: bytes) -> str | None:
        """One line of server-sent events; a blank line ends an event. Only `data` fields matter."""
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None  # a comment, such as a keep-alive
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value[1:] if value.startswith(b" ") else value)
        return None

    def _dispatch(self) -> str | None:
        """The event just ended: [DONE], or a chunk whose usage is kept and whose piece is returned."""
        if not self._data:
            return None
        data, self._data = b"\n".join(self._data), []
        if data == b"[DONE]":
            self._done = True
            return None
        piece, usage, reason = parse_chunk(data)
        if usage is not None:
            self.usage = usage
        if reason is not None:
            self.finish_reason = finish_reason(reason)
        return piece

    def _drain(self) -> None:
        """After [DONE], read the end of the body briefly, so the connection goes back to the pool."""
        deadline = min(time.monotonic() + DRAIN_SECONDS, self._end)
        try:
            while data := read_some(self._response, deadline):
                self._count(len(data))  # whatever follows [DONE] is ignored, but not without limit
        except AttemptFailed:
            self.close()  # the answer is whole; only the connection is lost


def parse_chunk(data: bytes) -> tuple[str | None, dict | None, str | None]:
    """The content piece (None when the chunk has none), usage and finish_reason (None until the
    choice's last chunk) of a chat completion chunk, else AttemptFailed."""
    try:
        chunk = json.loads(data.decode("utf-8"), parse_constant=reject_json_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise AttemptFailed(FailureKind.MALFORMED) from None
    if not isinstance(chunk, dict):
        raise AttemptFailed(FailureKind.MALFORMED)
    if chunk.get("error") is not None:
        # Some servers report a failure mid-stream in the stream itself, then end it normally.
        raise AttemptFailed(FailureKind.AGENT_ERROR)
    # The usage chunk has no choice, and a choice's last chunk may have no delta.
    choices = chunk.get("choices", [])
    if not isinstance(choices, list) or choices and not isinstance(choices[0], dict):
        raise AttemptFailed(FailureKind.MALFORMED)
    delta = choices[0].get("delta") if choices else None
    if delta is None:
        delta = {}
    if not isinstance(delta, dict):
        raise AttemptFailed(FailureKind.MALFORMED)
    content = delta.get("content")
    if content is not None and not (isinstance(content, str) and unstorable(content) is None):
        raise AttemptFailed(FailureKind.MALFORMED)
    usage = chunk.get("usage")
    reason = choices[0].get("finish_reason") if choices else None
    return content, usage if isinstance(usage, dict) and storable_json(usage) else None, reason
