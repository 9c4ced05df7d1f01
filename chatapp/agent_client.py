"""The agent: an OpenAI-compatible chat-completions client, whole or streamed, with deadlines; a development echo."""
import email.utils
import json
import logging
import random
import re
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, Protocol, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as TransportError, ReadTimeoutError

from chatapp.errors import AgentUnavailable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_SECONDS = 0.1
MAX_RETRY_AFTER = 60
# Enough connections for every gunicorn thread waiting on the agent at once.
POOL_MAXSIZE = 128
CHUNK_BYTES = 64 * 1024
# After [DONE] a well-behaved agent ends the body at once; reading that end lets the connection be
# pooled again, and waiting longer for it would only delay the end of the answer.
DRAIN_SECONDS = 0.1

_T = TypeVar("_T")

_DETAILS = {
    "timeout": "The agent did not answer in time",
    "connection": "The agent could not be reached",
    "http": "The agent answered with an error",
    "malformed": "The agent's answer was malformed",
    "too_large": "The agent's answer was too large",
    "agent_error": "The agent answered with an error",
}


class AgentReply(NamedTuple):
    """The assistant's answer, the agent's token usage (or None) and how many attempts it took."""

    content: str
    usage: dict | None
    attempts: int


class ReplyStream(Protocol):
    """An answer arriving piece by piece: iterate for its non-empty str pieces, then read `usage`."""

    usage: dict | None
    attempts: int

    def __iter__(self) -> "ReplyStream": ...

    def __next__(self) -> str: ...

    def close(self) -> None: ...

    def __enter__(self) -> "ReplyStream": ...

    def __exit__(self, *exc_info) -> None: ...


class AgentRunner(Protocol):
    """Anything that turns a list of chat messages into an AgentReply, whole or as a stream."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None) -> AgentReply:
        """Answer the conversation `messages` with `model`, or raise AgentUnavailable."""
        ...

    def stream(self, messages: list[dict], model: str, request_id: str | None = None) -> ReplyStream:
        """Start answering `messages` with `model` piece by piece, or raise AgentUnavailable."""
        ...


class _AttemptFailed(Exception):
    """One attempt failed; `kind` is what gets logged, never a URL, key or body."""

    def __init__(self, kind: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(kind)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


class OpenAIChatAgent:
    """Calls POST {base_url}/chat/completions with retries, backoff and deadlines, whole or streamed."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = 3.0,
        timeout: float = 30.0,
        max_retries: int = 2,
        max_response_bytes: int = 1048576,
        stream_timeout: float = 300.0,
    ):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        # Requests go straight to a pooled transport adapter, prepared from a template: a
        # requests.Session would merge settings, run hooks and keep cookies on every call (a tenth
        # of a turn's CPU), and no cookie may carry over between users' turns anyway.
        # max_retries=0: retries are ours, so they share the deadline and honour Retry-After.
        self._adapter = HTTPAdapter(pool_maxsize=POOL_MAXSIZE, max_retries=0)
        self._template = requests.Request("POST", self._url).prepare()
        # Proxy settings are read from the environment once, not on every call.
        self._proxies = requests.utils.get_environ_proxies(self._url)
        # Apps that never call close() still close their sockets when the agent is collected.
        self._close = weakref.finalize(self, self._adapter.close)

    def __repr__(self) -> str:
        # Never show the URL or the key, even in a debugger or a log line.
        return f"<OpenAIChatAgent timeout={self.timeout} max_retries={self.max_retries}>"

    def close(self) -> None:
        """Close the pooled connections."""
        self._close()

    def run(self, messages: list[dict], model: str, request_id: str | None = None) -> AgentReply:
        """Ask the agent for the next assistant message; raise AgentUnavailable on any failure."""
        deadline = time.monotonic() + self.timeout
        body = json.dumps({"model": model, "messages": messages}).encode()
        headers = self._headers(request_id)
        (content, usage), attempts = self._with_retries(
            lambda: self._attempt(body, headers, deadline), deadline, request_id
        )
        return AgentReply(content, usage, attempts)

    def stream(self, messages: list[dict], model: str, request_id: str | None = None) -> "AgentStream":
        """Ask the agent for the next assistant message as a stream of pieces; raise AgentUnavailable
        when it cannot start (connection, status), and from the stream when it fails later."""
        started = time.monotonic()
        # Connecting, retries and the status all count against the first-token deadline.
        first_deadline = started + min(self.timeout, self.stream_timeout)
        body = json.dumps(
            {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        ).encode()
        headers = self._headers(request_id)
        response, attempts = self._with_retries(
            lambda: self._open_stream(body, headers, first_deadline), first_deadline, request_id
        )
        return AgentStream(
            response,
            attempts=attempts,
            first_deadline=first_deadline,
            gap=self.timeout,
            end=started + self.stream_timeout,
            max_bytes=self.max_response_bytes,
            request_id=request_id,
        )

    def _headers(self, request_id: str | None) -> dict:
        """The request headers: JSON, the key when there is one, and the request's id for tracing."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request_id:
            headers["X-Request-ID"] = request_id
        return headers

    def _with_retries(self, attempt: Callable[[], _T], deadline: float, request_id: str | None) -> tuple[_T, int]:
        """The result of the first attempt that succeeds and the number of attempts; AgentUnavailable
        when one fails for good, or retries run out, or the deadline leaves no time for the next."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return attempt(), attempts
            except _AttemptFailed as failure:
                delay = _backoff(attempts) if failure.retry_after is None else failure.retry_after
                if (
                    failure.retryable
                    and attempts <= self.max_retries
                    and time.monotonic() + delay < deadline
                ):
                    log.warning("agent call failed: %s, attempt %d, retrying in %.2f s",
                                failure.kind, attempts, delay, extra={"request_id": request_id})
                    time.sleep(delay)
                    continue
                log.warning("agent call failed: %s, attempt %d, giving up",
                            failure.kind, attempts, extra={"request_id": request_id})
                raise _unavailable(failure, attempts) from None

    def _attempt(self, body: bytes, headers: dict, deadline: float) -> tuple[str, dict | None]:
        """One POST: the content and usage of a good answer, else _AttemptFailed."""
        # Closing a response that is not fully read drops its connection instead of pooling it.
        with self._post(body, headers, deadline) as response:
            raw = self._read_body(response, deadline)
        return _parse_completion(raw)

    def _open_stream(self, body: bytes, headers: dict, deadline: float) -> requests.Response:
        """One POST asking for a stream: the response, its events still unread, else _AttemptFailed."""
        response = self._post(body, headers, deadline)
        if _declared_too_large(response, self.max_response_bytes):
            response.close()
            raise _AttemptFailed("too_large")
        return response

    def _post(self, body: bytes, headers: dict, deadline: float) -> requests.Response:
        """One POST whose answer has a 2xx status, its body unread; else _AttemptFailed."""
        remaining = _remaining(deadline)
        request = self._template.copy()
        request.prepare_headers(headers)
        request.prepare_body(body, None)
        try:
            response = self._adapter.send(
                request,
                stream=True,
                # The read timeout is the rest of the deadline: one that fires means time is up.
                timeout=(min(self.connect_timeout, remaining), remaining),
                proxies=self._proxies,
            )
        except requests.exceptions.ConnectTimeout:
            raise _AttemptFailed("timeout", retryable=True) from None
        except requests.exceptions.Timeout:
            raise _AttemptFailed("timeout") from None
        except requests.exceptions.SSLError:
            raise _AttemptFailed("connection") from None  # a bad certificate does not heal in 0.1 s
        except requests.exceptions.ConnectionError:
            raise _AttemptFailed("connection", retryable=True) from None
        except requests.exceptions.RequestException:
            raise _AttemptFailed("connection") from None  # a bad URL or header: configuration, not chance
        status = response.status_code
        if not 200 <= status < 300:
            failure = _AttemptFailed(
                f"http_{status}",
                retryable=status in RETRY_STATUSES,
                retry_after=_parse_retry_after(response.headers.get("Retry-After")),
            )
            response.close()
            raise failure
        return response

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        """The whole body, read in chunks so that neither the size cap nor the deadline is overrun."""
        if _declared_too_large(response, self.max_response_bytes):
            raise _AttemptFailed("too_large")
        body = bytearray()
        while chunk := _read_some(response, deadline):
            body += chunk
            if len(body) > self.max_response_bytes:
                raise _AttemptFailed("too_large")
        return bytes(body)


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
        except _AttemptFailed as failure:
            self.close()
            log.warning("agent stream failed: %s, attempt %d, after %d pieces",
                        failure.kind, self.attempts, self._yielded, extra={"request_id": self._request_id})
            raise _unavailable(failure, self.attempts) from None
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
            data = _read_some(self._response, deadline)
            if not data:
                raise _AttemptFailed("malformed")  # the body ended without [DONE]: the answer may be cut
            self._count(len(data))
            del self._buffer[:self._parsed]
            self._scanned -= self._parsed
            self._parsed = 0
            self._buffer += data
        if self._done:
            self._drain()
        return piece

    def _count(self, size: int) -> None:
        """Add to the bytes received; _AttemptFailed past the cap."""
        self._received += size
        if self._received > self._max_bytes:
            raise _AttemptFailed("too_large")

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
        piece, usage = _parse_chunk(data)
        if usage is not None:
            self.usage = usage
        return piece

    def _drain(self) -> None:
        """After [DONE], read the end of the body briefly, so the connection goes back to the pool."""
        deadline = min(time.monotonic() + DRAIN_SECONDS, self._end)
        try:
            while data := _read_some(self._response, deadline):
                self._count(len(data))  # whatever follows [DONE] is ignored, but not without limit
        except _AttemptFailed:
            self.close()  # the answer is whole; only the connection is lost


class ReadyStream:
    """An answer already at hand, served piece by piece like an AgentStream."""

    def __init__(self, pieces: Iterable[str], usage: dict | None = None, attempts: int = 1):
        self.usage = usage
        self.attempts = attempts
        self._pieces = iter([piece for piece in pieces if piece])

    def __iter__(self) -> "ReadyStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> "ReadyStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to end: no call is in progress."""


class EchoAgent:
    """Development agent: answers with the last message, echoed."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None) -> AgentReply:
        """Echo the content of the last message."""
        last = messages[-1]["content"] if messages else ""
        return AgentReply(f"Echo: {last}", None, 1)

    def stream(self, messages: list[dict], model: str, request_id: str | None = None) -> ReadyStream:
        """Echo the content of the last message word by word (the pieces keep their spaces)."""
        reply = self.run(messages, model, request_id)
        return ReadyStream(_WORD_BOUNDARY.split(reply.content), reply.usage, reply.attempts)


# Between a space and the next word: splitting there keeps every character on some piece.
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")


def build_agent(config: Mapping) -> AgentRunner:
    """The HTTP agent when AGENT_URL is set, else the echo agent."""
    if not config.get("AGENT_URL"):
        return EchoAgent()

    def setting(key, convert, default):
        value = config.get(key)
        return default if value is None or value == "" else convert(value)

    return OpenAIChatAgent(
        config["AGENT_URL"],
        api_key=config.get("AGENT_API_KEY") or None,
        connect_timeout=setting("AGENT_CONNECT_TIMEOUT", float, 3.0),
        timeout=setting("AGENT_TIMEOUT", float, 30.0),
        max_retries=setting("AGENT_MAX_RETRIES", int, 2),
        max_response_bytes=setting("AGENT_MAX_RESPONSE_BYTES", int, 1048576),
        stream_timeout=setting("AGENT_STREAM_TIMEOUT", float, 300.0),
    )


def _remaining(deadline: float) -> float:
    """Seconds left before the deadline; _AttemptFailed when none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _AttemptFailed("timeout")
    return remaining


def _declared_too_large(response: requests.Response, max_bytes: int) -> bool:
    """True when the answer's Content-Length alone is over the cap: no need to read it."""
    declared = response.headers.get("Content-Length", "")
    return declared.isdigit() and int(declared) > max_bytes


def _read_some(response: requests.Response, deadline: float) -> bytes:
    """What has arrived of the body (b"" at its end), waiting no later than the deadline."""
    try:
        _set_socket_timeout(response, _remaining(deadline))
        # read1 returns what has arrived, so a server dripping bytes still meets the deadline.
        return response.raw.read1(CHUNK_BYTES, decode_content=True)
    except (ReadTimeoutError, TimeoutError):
        raise _AttemptFailed("timeout") from None
    except (TransportError, OSError):
        # Cut mid-body (reset, closed early): a connection failure like any other.
        raise _AttemptFailed("connection", retryable=True) from None


def _set_socket_timeout(response: requests.Response, seconds: float) -> None:
    """Bound the next socket read by the deadline (once the body is complete, there is no socket)."""
    sock = getattr(response.raw.connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so that many workers do not retry in step."""
    return BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(1.0, 1.2)


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds from delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_completion(raw: bytes) -> tuple[str, dict | None]:
    """`choices[0].message.content` and `usage` of a chat completion, else _AttemptFailed."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, RecursionError, LookupError, TypeError):
        raise _AttemptFailed("malformed") from None
    if not isinstance(data, dict) or not isinstance(content, str) or not _storable(content):
        raise _AttemptFailed("malformed")
    usage = data.get("usage")
    return content, usage if isinstance(usage, dict) and _storable_json(usage) else None


def _parse_chunk(data: bytes) -> tuple[str | None, dict | None]:
    """The content piece (None when the chunk has none) and usage of a chat completion chunk,
    else _AttemptFailed."""
    try:
        chunk = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _AttemptFailed("malformed") from None
    if not isinstance(chunk, dict):
        raise _AttemptFailed("malformed")
    if chunk.get("error") is not None:
        # Some servers report a failure mid-stream in the stream itself, then end it normally.
        raise _AttemptFailed("agent_error")
    # The usage chunk has no choice, and a choice's last chunk may have no delta.
    choices = chunk.get("choices", [])
    if not isinstance(choices, list) or choices and not isinstance(choices[0], dict):
        raise _AttemptFailed("malformed")
    delta = choices[0].get("delta") if choices else None
    if delta is None:
        delta = {}
    if not isinstance(delta, dict):
        raise _AttemptFailed("malformed")
    content = delta.get("content")
    if content is not None and not (isinstance(content, str) and _storable(content)):
        raise _AttemptFailed("malformed")
    usage = chunk.get("usage")
    return content, usage if isinstance(usage, dict) and _storable_json(usage) else None


def _reject_constant(name: str):
    """NaN and Infinity are not JSON, and would not survive being stored and served again."""
    raise ValueError(name)


def _storable(text: str) -> bool:
    """True when PostgreSQL can store the text: no NUL and no lone surrogate."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _storable_json(value) -> bool:
    """True when every string in a decoded JSON value, keys included, is storable."""
    try:
        if isinstance(value, str):
            return _storable(value)
        if isinstance(value, dict):
            return all(_storable(key) and _storable_json(item) for key, item in value.items())
        if isinstance(value, list):
            return all(_storable_json(item) for item in value)
        return True
    except RecursionError:
        return False


def _unavailable(failure: _AttemptFailed, attempts: int) -> AgentUnavailable:
    """The error the client sees: our words only, and the agent's Retry-After when it sent one."""
    retry_after = 1 if failure.retry_after is None else min(failure.retry_after, MAX_RETRY_AFTER)
    detail = _DETAILS["http" if failure.kind.startswith("http_") else failure.kind]
    return AgentUnavailable(detail, retry_after=retry_after, kind=failure.kind, attempts=attempts)
