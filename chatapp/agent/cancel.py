"""Ending an agent call from another thread: a user's stop. A turn runs its agent call inside
`cancellable(cancellation)`; the connections the call takes from the pool are watched, and
`cancellation.cancel()` shuts their sockets down, so that a call blocked waiting for the agent's
answer (or its next piece) ends at once instead of at its deadline, and is not retried.

The hook is the connection pool's `_get_conn`: requests hands a call to urllib3 and keeps no handle
on its socket before the answer's headers have come, which is exactly when a blocking call waits.
"""
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()


class Cancellation:
    """One turn's: set once, from any thread; the calls made under it end as soon as it is."""

    def __init__(self):
        self._lock = threading.Lock()
        self._connections: list = []
        self.cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            connections, self._connections = self._connections, []
        for connection in connections:
            _shut_down(connection)

    def watch(self, connection) -> None:
        """A connection a call of this turn is about to use."""
        with self._lock:
            if not self.cancelled:
                self._connections.append(connection)
                return
        _shut_down(connection)

    def forget(self) -> None:
        with self._lock:
            self._connections = []


@contextmanager
def cancellable(cancellation: "Cancellation | None") -> Iterator[None]:
    """The agent calls of this thread, for the duration, end when `cancellation` is cancelled."""
    previous = getattr(_current, "cancellation", None)
    _current.cancellation = cancellation
    try:
        yield
    finally:
        _current.cancellation = previous
        if cancellation is not None:
            cancellation.forget()


def current() -> "Cancellation | None":
    """The cancellation this thread's agent calls run under, if any."""
    return getattr(_current, "cancellation", None)


def cancelled() -> bool:
    cancellation = current()
    return cancellation is not None and cancellation.cancelled


def _shut_down(connection) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once; close() would not wake it
        except OSError:
            pass  # closed already


class _Watched:
    def _get_conn(self, timeout=None):
        connection = super()._get_conn(timeout)
        cancellation = current()
        if cancellation is not None:
            cancellation.watch(connection)
        return connection


class WatchedHTTPConnectionPool(_Watched, HTTPConnectionPool):
    """urllib3's pool, its connections watched by the calling thread's cancellation."""


class WatchedHTTPSConnectionPool(_Watched, HTTPSConnectionPool):
    """urllib3's pool, its connections watched by the calling thread's cancellation."""


WATCHED_POOLS = {"http": WatchedHTTPConnectionPool, "https": WatchedHTTPSConnectionPool}
