"""What guards the agent calls of one process: a circuit breaker per agent, a fallback agent, and a
cap on the calls in flight. GuardedAgent is itself an AgentRunner: the turns call it as they would
call the agent.

The breaker is ours, not pybreaker's (1.4.1, read before choosing): its CircuitBreaker.call holds
one lock across the call it guards, so the 128 turns a process holds at the agent would wait in
line for one another; circuitbreaker's half-open state lets every call through. The deadline, the
kinds of failure and the 503 are ours anyway.
"""
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

from chatapp.agent.contract import AgentReply, AgentRunner, ReplyStream
from chatapp.agent.transport import FailureKind
from chatapp.errors import AgentUnavailable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

log = logging.getLogger(__name__)


def counts_against_the_agent(error: AgentUnavailable) -> bool:
    """Whether a failure says the agent is down: a timeout, a connection failure, a 5xx or a 429,
    a malformed answer (after the retries); not an answer 400-499 other than 429, nor a failure of
    ours (the breaker, the cap, a client gone)."""
    kind = error.kind
    if kind == FailureKind.STOPPED:
        return False
    if kind.startswith("http_"):
        status = int(kind[len("http_"):])
        return status == 429 or status >= 500
    return kind in (FailureKind.TIMEOUT, FailureKind.CONNECTION, FailureKind.MALFORMED, FailureKind.TOO_LARGE,
                    FailureKind.AGENT_ERROR)


def judge(breaker: "CircuitBreaker", failure: AgentUnavailable) -> None:
    """Tell the breaker what a failed call says of its agent: down, up (it refused this request),
    or nothing (the user stopped the turn)."""
    if failure.kind == FailureKind.STOPPED:
        breaker.ended_without_verdict()
    elif counts_against_the_agent(failure):
        breaker.failed()
    else:
        breaker.succeeded()


class CircuitBreaker:
    """Open after `failures` consecutive failed calls, for `open_seconds`; then half-open: one call
    at a time goes through as a probe, whose success closes the breaker and whose failure opens it
    again. `failures=0` turns it off."""

    def __init__(self, failures: int, open_seconds: float, clock=time.monotonic,
                 on_change: Callable[[bool], None] = lambda is_open: None):
        self.failures = failures
        self.open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change  # told True when it opens, False when it closes again
        self._lock = threading.Lock()
        self._consecutive = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        if self.failures and self._open_until:
            return OPEN if self._clock() < self._open_until else HALF_OPEN
        return CLOSED

    def seconds_left(self) -> float:
        return max(0.0, self._open_until - self._clock())

    def admit(self) -> bool:
        """Whether a call may go now (True: and it is the probe, when half-open)."""
        with self._lock:
            state = self.state
            if state == CLOSED:
                return True
            if state == OPEN or self._probing:
                return False
            self._probing = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            was_open = bool(self._open_until)
            self._consecutive, self._open_until, self._probing = 0, 0.0, False
        if was_open:
            self._on_change(False)

    def failed(self) -> None:
        with self._lock:
            self._consecutive += 1
            opens = bool(self.failures) and (self._probing or self._consecutive >= self.failures)
            was_open = bool(self._open_until)
            if opens:
                self._open_until = self._clock() + self.open_seconds
            self._probing = False
        if opens and not was_open:
            self._on_change(True)

    def ended_without_verdict(self) -> None:
        """The call told nothing of the agent (a client went away): a probe lets the next one try."""
        with self._lock:
            self._probing = False

    def unavailable(self, agent: str) -> AgentUnavailable:
        return AgentUnavailable("The agent is unavailable, try again later", kind=FailureKind.BREAKER_OPEN,
                                retry_after=max(1.0, self.seconds_left()), agent=agent)


class GuardedAgent:
    """The primary agent behind its breaker; the fallback behind its own, tried once when the primary
    fails for good or its breaker is open, within what is left of the same deadline; and at most
    `max_concurrency` calls in flight in this process (None: no cap), past which a turn is refused
    at once."""

    def __init__(self, primary: AgentRunner, *, timeout: float, breaker_failures: int, breaker_seconds: float,
                 fallback: AgentRunner | None = None, fallback_model: str | None = None,
                 max_concurrency: int | None = None, clock=time.monotonic,
                 on_breaker: Callable[[str, bool], None] = lambda agent, is_open: None):
        self.primary = primary
        self.fallback = fallback
        self.fallback_model = fallback_model
        self.timeout = timeout
        def changed(name: str, is_open: bool) -> None:
            if is_open:
                log.warning("agent circuit breaker open: the %s agent failed %d turns in a row; turns skip it for %g s",
                            name, breaker_failures, breaker_seconds)
            else:
                log.info("agent circuit breaker closed: the %s agent answers again", name)
            on_breaker(name, is_open)

        self.breakers = {
            name: CircuitBreaker(breaker_failures, breaker_seconds, clock, on_change=functools.partial(changed, name))
            for name in (("primary", "fallback") if fallback is not None else ("primary",))
        }
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None

    def __repr__(self) -> str:
        return f"<GuardedAgent primary={self.primary!r} fallback={self.fallback!r}>"

    def close(self) -> None:
        for agent in (self.primary, self.fallback):
            if hasattr(agent, "close"):
                agent.close()

    def _agents(self, model: str):
        yield "primary", self.primary, model
        if self.fallback is not None:
            yield "fallback", self.fallback, self.fallback_model or model

    def _take_slot(self) -> None:
        if self._slots is not None and not self._slots.acquire(blocking=False):
            raise AgentUnavailable("The service is answering as many turns as it can, try again in a moment",
                                   kind=FailureKind.BUSY, retry_after=1)

    def _free_slot(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _first_that_answers(self, model: str, deadline: float, attempt: Callable):
        """`attempt(name, agent, model, breaker)` with the primary, then with the fallback when the
        primary failed for good or its breaker is open, and there is time left: its first result,
        else the last failure. Each under its breaker, which hears how the call went."""
        error = None
        for name, agent, agent_model in self._agents(model):
            breaker = self.breakers[name]
            if time.monotonic() >= deadline and error is not None:
                break
            if not breaker.admit():
                error = breaker.unavailable(name)
                continue
            try:
                return attempt(name, agent, agent_model, breaker)
            except AgentUnavailable as failure:
                failure.agent = name
                judge(breaker, failure)
                error = failure
                if not counts_against_the_agent(failure):
                    raise  # the agent refused this request (or the user stopped it): another would too
            except BaseException:
                breaker.ended_without_verdict()  # not the agent's doing: a probe lets the next one try
                raise
        raise error

    def run(self, messages: list[dict], model: str, request_id: str | None = None,
            deadline: float | None = None) -> AgentReply:
        """The first answer of the primary, or of the fallback; AgentUnavailable when neither answers."""
        deadline = min(time.monotonic() + self.timeout, deadline or float("inf"))

        def attempt(name: str, agent: AgentRunner, agent_model: str, breaker: CircuitBreaker) -> AgentReply:
            reply = agent.run(messages, agent_model, request_id=request_id, deadline=deadline)
            breaker.succeeded()
            return reply._replace(model=agent_model, agent=name)

        self._take_slot()
        try:
            return self._first_that_answers(model, deadline, attempt)
        finally:
            self._free_slot()

    def stream(self, messages: list[dict], model: str, request_id: str | None = None,
               deadline: float | None = None) -> "GuardedStream":
        """The stream of the primary once its first piece has come, else the fallback's: a stream falls
        back only before its first piece."""
        deadline = min(time.monotonic() + self.timeout, deadline or float("inf"))

        def attempt(name: str, agent: AgentRunner, agent_model: str, breaker: CircuitBreaker) -> GuardedStream:
            inner = agent.stream(messages, agent_model, request_id=request_id, deadline=deadline)
            try:
                first = next(iter(inner), "")
            except BaseException:
                inner.close()
                raise
            return GuardedStream(self, inner, first, breaker, agent_model, name)

        self._take_slot()
        try:
            return self._first_that_answers(model, deadline, attempt)
        except BaseException:
            self._free_slot()
            raise


class GuardedStream:
    """A stream that has given its first piece: the rest of the agent's, its verdict for the
    breaker when it ends, its slot freed when it is over."""

    def __init__(self, guard: GuardedAgent, inner: ReplyStream, first: str, breaker: CircuitBreaker,
                 model: str, agent: str):
        self._guard = guard
        self._inner = inner
        self._first = first
        self._breaker = breaker
        self.model = model
        self.agent = agent
        self._over = False
        self._generator = self._pieces()

    @property
    def usage(self):
        return self._inner.usage

    @property
    def finish_reason(self) -> str:
        return self._inner.finish_reason

    @property
    def attempts(self):
        return self._inner.attempts

    def __iter__(self) -> "GuardedStream":
        return self

    def __next__(self) -> str:
        return next(self._generator)

    def _pieces(self) -> Iterator[str]:
        if self._first:
            yield self._first
        try:
            yield from self._inner
        except AgentUnavailable as failure:
            if not self._over:
                self._over = True
                judge(self._breaker, failure)
                self._guard._free_slot()
            raise
        self._end(failed=False)

    def __enter__(self) -> "GuardedStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the call (a client gone, a failure): no verdict on the agent."""
        self._inner.close()
        if not self._over:
            self._over = True
            self._breaker.ended_without_verdict()
            self._guard._free_slot()

    def _end(self, failed: bool) -> None:
        if not self._over:
            self._over = True
            self._breaker.failed() if failed else self._breaker.succeeded()
            self._guard._free_slot()
