"""The per-user rate limit of the chat endpoint: a moving window, kept in this process, or in Redis
(the `limits` library) so that every process and host shares one budget.

The view calls enforce_rate_limit() right after authenticate(): the contract wants requests that
fail steps 1 or 2 to use no quota. (Flask-Limiter checks before the view, and adds three hooks to
every request of the app; the one limit here needs none of them.)"""
import logging
import math
import threading
import time
from collections import deque

from flask import Flask, current_app
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from chatapp.errors import RateLimited

log = logging.getLogger(__name__)

KEY_PREFIX = "chatapp"


class ProcessWindow:
    """A moving window per user, in this process: the times of the user's requests within the
    last window.

    Stands in for limits' MemoryStorage, which starts a threading.Timer whenever an expiry is due
    and none is alive, and scans every key each 10 ms: limits 5.8.0 started 201 threads in 200
    sequential turns, ours none (bench/results/2026-12-02-libraries.md)."""

    SWEEP_EVERY = 1024  # requests between two removals of the users who have gone quiet

    def __init__(self, rate: RateLimitItem, clock=time.monotonic):
        self.limit = rate.amount
        self.seconds = rate.get_expiry()
        self._clock = clock
        self._hits: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._until_sweep = self.SWEEP_EVERY

    def hit(self, user_id: str) -> float | None:
        """Count one request of the user: None when it is allowed, else the seconds until the
        oldest request in the window leaves it (the request is then not counted)."""
        now = self._clock()
        window_start = now - self.seconds
        with self._lock:
            hits = self._hits.setdefault(user_id, deque())
            while hits and hits[0] <= window_start:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] - window_start
            hits.append(now)
            self._until_sweep -= 1
            if self._until_sweep <= 0:
                self._until_sweep = self.SWEEP_EVERY
                for quiet in [user for user, times in self._hits.items() if times[-1] <= window_start]:
                    del self._hits[quiet]
        return None


class SharedWindow:
    """The moving window in Redis at REDIS_URL, shared by every process and host, behind a breaker:
    after a failure the limit fails open at once for OPEN_SECONDS, instead of every request waiting
    out the timeout on a Redis that is down or frozen; then one request tries Redis again."""

    OPEN_SECONDS = 5.0
    TIMEOUT_SECONDS = 0.25

    def __init__(self, rate: RateLimitItem, redis_url: str, clock=time.monotonic):
        storage = storage_from_string(redis_url, socket_connect_timeout=self.TIMEOUT_SECONDS,
                                      socket_timeout=self.TIMEOUT_SECONDS)
        self._limiter = MovingWindowRateLimiter(storage)
        self._rate = rate
        self._clock = clock
        self._open_until = 0.0
        self._probing = threading.Lock()

    def hit(self, user_id: str) -> float | None:
        """As ProcessWindow.hit; None (allowed) while Redis is failing."""
        if not self._open_until:
            return self._ask(user_id)
        if self._clock() < self._open_until or not self._probing.acquire(blocking=False):
            return None  # open: fail open at once, and one request at a time probes after the period
        try:
            return self._ask(user_id)
        finally:
            self._probing.release()

    def _ask(self, user_id: str) -> float | None:
        try:
            if self._limiter.hit(self._rate, KEY_PREFIX, "chat", user_id):
                wait = None
            else:
                wait = self._limiter.get_window_stats(self._rate, KEY_PREFIX, "chat", user_id).reset_time - time.time()
        except Exception as exc:  # any storage failure: down, frozen, restarting, full
            now = self._clock()
            already_open, self._open_until = self._open_until > now, now + self.OPEN_SECONDS
            if not already_open:  # once an open period: the requests that were waiting with it say nothing
                log.warning("rate limit storage unavailable (%s): requests allowed for %.0f s",
                            type(exc).__name__, self.OPEN_SECONDS)
            return None
        self._open_until = 0.0
        return wait


def register_rate_limit(app: Flask) -> None:
    rate = parse(app.config["RATE_LIMIT"])
    redis_url = app.config["REDIS_URL"]
    app.extensions["chat_rate_limit"] = SharedWindow(rate, redis_url) if redis_url else ProcessWindow(rate)


def enforce_rate_limit(user_id: str) -> None:
    """Count one chat request for the user; 429 with Retry-After past RATE_LIMIT. If the storage
    is unreachable the request goes through (fail open)."""
    wait = current_app.extensions["chat_rate_limit"].hit(user_id)
    if wait is not None:
        raise RateLimited(retry_after=math.ceil(max(1.0, wait)))
