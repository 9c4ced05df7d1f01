"""The events of a streamed turn, numbered from 1 (`id:` of server-sent events). The thread that
runs the turn appends them; its own client reads them from TurnEvents, in this process. With
REDIS_URL they also go to a Redis stream per turn (LiveLog), so that a client that lost its stream
can resume from any process or host: live while the turn runs, and for STREAM_RESUME_SECONDS after.

The Redis copy is best effort: when Redis fails, the turn and its own client go on, the failure is
logged once per interval, and a resume falls back to waiting for the end and the replay.
"""
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

DELTA, DONE, ERROR = "delta", "done", "error"
KEEP_ALIVE = ": keep-alive\n\n"  # a comment line: clients ignore it, proxies see traffic
# A turn's Redis stream keeps at most about this many events (a 10,000-word answer); more is trimmed.
MAX_EVENTS = 20_000


@dataclass(frozen=True)
class Event:
    """One event of a turn: `delta`, `done` or `error`, and its data (JSON text)."""

    id: int
    name: str
    data: str

    @property
    def final(self) -> bool:
        return self.name != DELTA

    def sse(self) -> str:
        return f"id: {self.id}\nevent: {self.name}\ndata: {self.data}\n\n"


class TurnEvents:
    """One turn's events in this process: appended by the thread running the turn, waited for by
    its client. `first_piece` is set once there is something to send (or the turn ended)."""

    def __init__(self, live: "LivePublisher | None" = None):
        self._events: list[Event] = []
        self._changed = threading.Condition()
        self._live = live
        self.first_piece = threading.Event()

    def append(self, name: str, data: str) -> Event:
        with self._changed:
            event = Event(len(self._events) + 1, name, data)
            self._events.append(event)
            self._changed.notify_all()
        self.first_piece.set()
        if self._live is not None:
            self._live.publish(event)  # after the local client is told: Redis adds nothing to its latency
        return event

    @property
    def ended(self) -> bool:
        return bool(self._events) and self._events[-1].final

    def after(self, last_id: int, timeout: float | None) -> list[Event]:
        """The events after `last_id`, waiting up to `timeout` seconds for one ([] when none came)."""
        with self._changed:
            if len(self._events) <= last_id and not self.ended:
                self._changed.wait(timeout)
            return self._events[last_id:]


class LiveLog:
    """The Redis copy of the events of the turns in flight, by (user, idempotency key), for the
    clients that resume them from anywhere. Short timeouts and a breaker, as the rate limit's."""

    TIMEOUT_SECONDS = 0.25
    RETRY_SECONDS = 5.0

    def __init__(self, redis_url: str, keep_seconds: float, running_seconds: float, clock=time.monotonic):
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=self.TIMEOUT_SECONDS,
                                           socket_connect_timeout=self.TIMEOUT_SECONDS)
        self.keep_seconds = keep_seconds  # after the turn ends
        self.running_seconds = running_seconds  # the longest a turn may run
        self._clock = clock
        self._down_until = float("-inf")
        self._lock = threading.Lock()

    @staticmethod
    def key(user_id: str, idempotency_key: str) -> str:
        digest = hashlib.sha256(f"{user_id}\0{idempotency_key}".encode()).hexdigest()
        return f"chatapp:turn:{digest}"

    def publisher(self, user_id: str, idempotency_key: str) -> "LivePublisher":
        return LivePublisher(self, self.key(user_id, idempotency_key))

    def available(self) -> bool:
        return self._clock() >= self._down_until

    def failed(self, exc: Exception) -> None:
        with self._lock:
            was_up = self.available()
            self._down_until = self._clock() + self.RETRY_SECONDS
        if was_up:
            log.warning("turn events could not reach Redis (%s): resuming falls back to the replay; "
                        "retried in %.0f s", type(exc).__name__, self.RETRY_SECONDS)

    def follow(self, user_id: str, idempotency_key: str, last_id: int, wait_seconds: float,
               gives_up_after: float) -> "Iterator[Event | None] | None":
        """The turn's events after `last_id` as they come, through its last (None between them after
        `wait_seconds` of silence: time for a keep-alive); None when Redis holds none of it."""
        if not self.available():
            return None
        key = self.key(user_id, idempotency_key)
        try:
            entries = self._redis.xrange(key)
        except redis.RedisError as exc:
            self.failed(exc)
            return None
        if not entries:
            return None
        return self._follow(key, entries, last_id, wait_seconds, gives_up_after)

    def _follow(self, key: str, entries, last_id: int, wait_seconds: float, gives_up_after: float):
        ends_at = self._clock() + gives_up_after
        silent_since = self._clock()
        while True:
            for stream_id, fields in entries:
                event = _event(fields)
                if event.id > last_id:
                    yield event
                    last_id = event.id
                    silent_since = self._clock()
                if event.final:
                    return
                cursor = stream_id
            if self._clock() >= ends_at:
                return
            try:
                # Blocks well within the socket timeout: a slow reply is not taken for a dead Redis.
                found = self._redis.xread({key: cursor}, block=int(self.TIMEOUT_SECONDS * 400))
            except redis.RedisError as exc:
                self.failed(exc)
                return  # the client resumes again, and gets the replay
            entries = found[0][1] if found else []
            if not entries and self._clock() - silent_since >= wait_seconds:
                silent_since = self._clock()
                yield None


def _event(fields: dict) -> Event:
    return Event(int(fields[b"id"]), fields[b"event"].decode(), fields[b"data"].decode())


class LivePublisher:
    """One turn's events, copied to Redis as they are appended."""

    def __init__(self, log_: LiveLog, key: str):
        self._log = log_
        self._key = key
        self._working = True

    def publish(self, event: Event) -> None:
        if not self._working or not self._log.available():
            return
        try:
            pipe = self._log._redis.pipeline(transaction=False)
            if event.id == 1:
                pipe.delete(self._key)  # an earlier run of the key (it failed): its events are not this one's
            pipe.xadd(self._key, {"id": event.id, "event": event.name, "data": event.data},
                      maxlen=MAX_EVENTS, approximate=True)
            pipe.expire(self._key, int(self._log.keep_seconds + (0 if event.final else self._log.running_seconds)))
            pipe.execute()
        except redis.RedisError as exc:
            self._working = False  # this turn's copy has a gap now: resuming it gets the replay
            self._log.failed(exc)
