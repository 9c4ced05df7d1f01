"""The agent: an OpenAI-compatible chat-completions client with a total deadline, and a development echo."""
import email.utils
import http.cookiejar
import json
import logging
import random
import time
import weakref
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as TransportError, ReadTimeoutError

from chatapp.errors import AgentUnavailable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_SECONDS = 0.1
MAX_RETRY_AFTER = 60
# Enough connections for every gunicorn thread waiting on the agent at once.
POOL_MAXSIZE = 64
CHUNK_BYTES = 64 * 1024

_DETAILS = {
    "timeout": "The agent did not answer in time",
    "connection": "The agent could not be reached",
    "http": "The agent answered with an error",
    "malformed": "The agent's answer was malformed",
    "too_large": "The agent's answer was too large",
}


class AgentReply(NamedTuple):
    """The assistant's answer, the agent's token usage (or None) and how many attempts it took."""

    content: str
    usage: dict | None
    attempts: int


class AgentRunner(Protocol):
    """Anything that turns a list of chat messages into an AgentReply."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None) -> AgentReply:
        """Answer the conversation `messages` with `model`, or raise AgentUnavailable."""
        ...


class _AttemptFailed(Exception):
    """One attempt failed; `kind` is what gets logged, never a URL, key or body."""

    def __init__(self, kind: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(kind)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


class OpenAIChatAgent:
    """Calls POST {base_url}/chat/completions with retries, backoff and one total deadline."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        connect_timeout: float = 3.0,
        timeout: float = 30.0,
        max_retries: int = 2,
        max_response_bytes: int = 1048576,
    ):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_response_bytes = max_response_bytes
        self._session = requests.Session()
        # max_retries=0: retries are ours, so they share the deadline and honour Retry-After.
        adapter = HTTPAdapter(pool_maxsize=POOL_MAXSIZE, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # The session is shared by every user's turn: no cookie may carry over between them.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # Apps that never call close() still close their sockets when the agent is collected.
        self._close = weakref.finalize(self, self._session.close)

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
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request_id:
            headers["X-Request-ID"] = request_id
        attempt = 0
        while True:
            attempt += 1
            try:
                content, usage = self._attempt(body, headers, deadline)
                return AgentReply(content, usage, attempt)
            except _AttemptFailed as failure:
                delay = _backoff(attempt) if failure.retry_after is None else failure.retry_after
                if (
                    failure.retryable
                    and attempt <= self.max_retries
                    and time.monotonic() + delay < deadline
                ):
                    log.warning("agent call failed: %s, attempt %d, retrying in %.2f s",
                                failure.kind, attempt, delay, extra={"request_id": request_id})
                    time.sleep(delay)
                    continue
                log.warning("agent call failed: %s, attempt %d, giving up",
                            failure.kind, attempt, extra={"request_id": request_id})
                raise _unavailable(failure, attempt) from None

    def _attempt(self, body: bytes, headers: dict, deadline: float) -> tuple[str, dict | None]:
        """One POST: the content and usage of a good answer, else _AttemptFailed."""
        remaining = _remaining(deadline)
        try:
            response = self._session.post(
                self._url,
                data=body,
                headers=headers,
                # The read timeout is the rest of the deadline: one that fires means time is up.
                timeout=(min(self.connect_timeout, remaining), remaining),
                stream=True,
                allow_redirects=False,
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
        # Closing a response that is not fully read drops its connection instead of pooling it.
        with response:
            status = response.status_code
            if not 200 <= status < 300:
                raise _AttemptFailed(
                    f"http_{status}",
                    retryable=status in RETRY_STATUSES,
                    retry_after=_parse_retry_after(response.headers.get("Retry-After")),
                )
            raw = self._read_body(response, deadline)
        return _parse_completion(raw)

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        """The whole body, read in chunks so that neither the size cap nor the deadline is overrun."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_response_bytes:
            raise _AttemptFailed("too_large")
        body = bytearray()
        try:
            while True:
                _set_socket_timeout(response, _remaining(deadline))
                # read1 returns what has arrived, so a server dripping bytes still meets the deadline.
                chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > self.max_response_bytes:
                    raise _AttemptFailed("too_large")
        except (ReadTimeoutError, TimeoutError):
            raise _AttemptFailed("timeout") from None
        except (TransportError, OSError):
            # Cut mid-body (reset, closed early): a connection failure like any other.
            raise _AttemptFailed("connection", retryable=True) from None


class EchoAgent:
    """Development agent: answers with the last message, echoed."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None) -> AgentReply:
        """Echo the content of the last message."""
        last = messages[-1]["content"] if messages else ""
        return AgentReply(f"Echo: {last}", None, 1)


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
    )


def _remaining(deadline: float) -> float:
    """Seconds left before the deadline; _AttemptFailed when none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _AttemptFailed("timeout")
    return remaining


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
