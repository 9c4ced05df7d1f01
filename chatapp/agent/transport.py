"""Talking to an agent over HTTP within a deadline: the kinds of failure, one attempt's failure,
retries with backoff and Retry-After inside the deadline, and reads that a dripping server cannot
stretch past it (requests' read timeout bounds each read, not the call)."""
import email.utils
import enum
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import requests
from urllib3.exceptions import HTTPError as TransportError, ReadTimeoutError

from chatapp.agent.cancel import cancelled
from chatapp.errors import AgentUnavailable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_SECONDS = 0.1
# An agent's Retry-After of hours is passed on to the client as this at most.
MAX_RETRY_AFTER = 60
CHUNK_BYTES = 64 * 1024

_T = TypeVar("_T")


class FailureKind(enum.StrEnum):
    """How an agent call failed: the log's `agent_kind` (http_status with the status), the metrics'
    outcome, the client's detail."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    HTTP_STATUS = "http"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    AGENT_ERROR = "agent_error"  # an error reported inside a stream
    ABORTED = "aborted"  # the client went away and the call was ended
    BREAKER_OPEN = "breaker_open"  # not called: its circuit breaker is open
    BUSY = "busy"  # not called: AGENT_MAX_CONCURRENCY calls in flight
    STOPPED = "stopped"  # the user stopped the turn (chatapp/agent/cancel.py)

    @property
    def detail(self) -> str:
        return _DETAILS[self]


_DETAILS = {
    FailureKind.TIMEOUT: "The agent did not answer in time",
    FailureKind.CONNECTION: "The agent could not be reached",
    FailureKind.HTTP_STATUS: "The agent answered with an error",
    FailureKind.MALFORMED: "The agent's answer was malformed",
    FailureKind.TOO_LARGE: "The agent's answer was too large",
    FailureKind.AGENT_ERROR: "The agent answered with an error",
    FailureKind.ABORTED: "The agent call was ended",
    FailureKind.BREAKER_OPEN: "The agent is unavailable, try again later",
    FailureKind.BUSY: "The service is answering as many turns as it can, try again in a moment",
    FailureKind.STOPPED: "The turn was stopped",
}


def kind_label(kind: FailureKind, status: int | None = None) -> str:
    """The kind as logs name it: `http_503` for an error status."""
    return f"http_{status}" if kind is FailureKind.HTTP_STATUS else str(kind)


class AttemptFailed(Exception):
    """One attempt failed: how, with what status, whether another may be tried, and after how long
    the agent asked to be retried. Never a URL, key or body."""

    def __init__(self, kind: FailureKind, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(kind_label(kind, status))
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def unavailable(self, attempts: int) -> AgentUnavailable:
        """The error the client sees: our words only, and the agent's Retry-After when it sent one."""
        retry_after = 1 if self.retry_after is None else min(self.retry_after, MAX_RETRY_AFTER)
        return AgentUnavailable(self.kind.detail, retry_after=retry_after, kind=kind_label(self.kind, self.status),
                                attempts=attempts)


def with_retries(attempt: Callable[[], _T], deadline: float, max_retries: int, request_id: str | None) -> tuple[_T, int]:
    """The result of the first attempt that succeeds and the number of attempts; AgentUnavailable
    when one fails for good, or retries run out, or the deadline leaves no time for the next."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt(), attempts
        except AttemptFailed as failure:
            if cancelled():  # the failure is the stop's doing: the agent is not to blame, nor to ask again
                raise AttemptFailed(FailureKind.STOPPED).unavailable(attempts) from None
            delay = backoff(attempts) if failure.retry_after is None else failure.retry_after
            if failure.retryable and attempts <= max_retries and time.monotonic() + delay < deadline:
                log.warning("agent call failed: %s, attempt %d, retrying in %.2f s",
                            failure, attempts, delay, extra={"request_id": request_id})
                time.sleep(delay)
                continue
            log.warning("agent call failed: %s, attempt %d, giving up", failure, attempts, extra={"request_id": request_id})
            raise failure.unavailable(attempts) from None


def remaining(deadline: float) -> float:
    """Seconds left before the deadline; AttemptFailed when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise AttemptFailed(FailureKind.TIMEOUT)
    return left


def declared_too_large(response: requests.Response, max_bytes: int) -> bool:
    """True when the answer's Content-Length alone is over the cap: no need to read it."""
    declared = response.headers.get("Content-Length", "")
    return declared.isdigit() and int(declared) > max_bytes


def read_some(response: requests.Response, deadline: float) -> bytes:
    """What has arrived of the body (b"" at its end), waiting no later than the deadline."""
    try:
        _set_socket_timeout(response, remaining(deadline))
        # read1 returns what has arrived, so a server dripping bytes still meets the deadline.
        return response.raw.read1(CHUNK_BYTES, decode_content=True)
    except (ReadTimeoutError, TimeoutError):
        raise AttemptFailed(FailureKind.TIMEOUT) from None
    except (TransportError, OSError):
        # Cut mid-body (reset, closed early): a connection failure like any other.
        raise AttemptFailed(FailureKind.CONNECTION, retryable=True) from None


def _set_socket_timeout(response: requests.Response, seconds: float) -> None:
    """Bound the next socket read by the deadline (once the body is complete, there is no socket)."""
    sock = getattr(response.raw.connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter, so that many workers do not retry in step."""
    return BACKOFF_SECONDS * 2 ** (attempt - 1) * random.uniform(1.0, 1.2)


def parse_retry_after(value: str | None) -> float | None:
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
