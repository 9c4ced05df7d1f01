"""The gunicorn worker that serves chatapp (gunicorn.conf.py's worker_class): gunicorn's gthread
worker, with each request read whole by the worker's main loop before a thread takes it, and
gunicorn's own error answers written as the service's JSON errors.

gthread hands a new connection to a thread that blocks reading its request: twenty clients that
send a request line and then nothing held every thread of a 2 x 8 server, and /healthz went
unanswered for as long as they stayed. Here the main loop reads what arrives (non-blocking, in
its selector) until the request's headers and body are complete, then hands the bytes to a
thread, whose parser finds them already read. A connection that has not sent its whole request
within REQUEST_READ_TIMEOUT seconds is closed, having held no thread. Answered connections are
closed without the main loop lingering on them (gthread waited up to 2 s on each
`Connection: close` client that did not hang up).
"""
import errno
import json
import re
import selectors
import socket
import time
import uuid
from collections import OrderedDict
from functools import partial

from gunicorn.http.errors import (
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.workers import gthread
from gunicorn.workers.gthread import TConn, ThreadWorker

from config import config_from_env

RECV_BYTES = 64 * 1024
# An answered connection that asked to be closed: its unread bytes are drained for at most this
# long (so that the kernel sends no reset over the answer's last bytes), in the selector.
CLOSE_LINGER_SECONDS = 2.0
CLOSE_DRAIN_BYTES = 64 * 1024
# Connections still sending their request, per worker; past this the oldest is closed.
MAX_READING = 1000
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
_EXPECT_CONTINUE = re.compile(rb"\r?\nexpect[ \t]*:[ \t]*100-continue[ \t]*(?=\r?\n)", re.IGNORECASE)


class RequestLimits:
    """What a whole request may hold, from gunicorn's settings and MAX_CONTENT_LENGTH."""

    def __init__(self, cfg, max_body: int):
        line = cfg.limit_request_line if 0 < cfg.limit_request_line else 8190
        fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= 32768 else 100
        field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else 8190
        self.request_line = line + 2
        self.head = self.request_line + fields * (field_size + 2) + 4
        self.body = max_body


COMPLETE, MORE, GUNICORN_DECIDES = "complete", "more", "gunicorn decides"


def request_state(data: bytes, limits: RequestLimits) -> tuple[str, bool]:
    """Whether `data` holds a whole request (its head, and its body by Content-Length or chunked
    framing), needs more bytes, or holds something that gunicorn's parser must refuse (or the app,
    for a body past MAX_CONTENT_LENGTH, after reading one byte more): then it is handed over as it
    is. Also whether the client waits for `100 Continue` before sending its body."""
    head_end, separator = _head_end(data)
    if head_end < 0:
        first_line_ended = b"\n" in data[:limits.request_line]
        too_long = len(data) > limits.head or (not first_line_ended and len(data) >= limits.request_line)
        return (GUNICORN_DECIDES if too_long else MORE), False
    head = data[:head_end]
    lengths, codings = _framing(head)
    body = len(data) - head_end - separator
    expects_continue = bool(_EXPECT_CONTINUE.search(data, 0, head_end + separator)) and body == 0 and b"HTTP/1.1" in head[:limits.request_line]
    if codings:
        if len(lengths) or codings[-1] != b"chunked":
            return GUNICORN_DECIDES, False  # ambiguous framing or a coding it does not serve
        return _chunked_state(data, head_end + separator, limits.body), expects_continue
    if not lengths:
        return COMPLETE, False
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        return GUNICORN_DECIDES, False
    length = int(lengths[0])
    if length > limits.body:
        return GUNICORN_DECIDES, False  # the app refuses it (413) by its Content-Length, unread
    return (COMPLETE if body >= length else MORE), expects_continue and length > 0


def _head_end(data: bytes) -> tuple[int, int]:
    """Where the header block ends (CRLF CRLF, or LF LF which gunicorn also reads) and its separator's length."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf >= 0 else (-1, 0)


def _framing(head: bytes) -> tuple[list[bytes], list[bytes]]:
    """The Content-Length values and the transfer codings the head declares."""
    lengths, codings = [], []
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            lengths += [part.strip() for part in value.split(b",")]
        elif name == b"transfer-encoding":
            codings += [part.strip().lower() for part in value.split(b",") if part.strip()]
    return lengths, codings


def _chunked_state(data: bytes, start: int, max_body: int) -> str:
    """Whether the chunked body from `start` is complete (its last chunk and trailers read)."""
    position, total = start, 0
    while True:
        line_end = data.find(b"\n", position)
        if line_end < 0:
            return MORE if len(data) - position <= 1024 else GUNICORN_DECIDES
        size_text = data[position:line_end].rstrip(b"\r").split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            return GUNICORN_DECIDES
        size = int(size_text, 16)
        position = line_end + 1
        if size == 0:  # the last chunk, then trailer lines until an empty one
            while True:
                line_end = data.find(b"\n", position)
                if line_end < 0:
                    return MORE if len(data) - position <= 8192 else GUNICORN_DECIDES
                if data[position:line_end].rstrip(b"\r") == b"":
                    return COMPLETE
                position = line_end + 1
        total += size
        if total > max_body:
            return GUNICORN_DECIDES  # the app reads one byte past MAX_CONTENT_LENGTH and answers 413
        if len(data) < position + size + 1:
            return MORE
        position += size
        if data[position:position + 2] == b"\r\n":
            position += 2
        elif data[position:position + 1] == b"\n":
            position += 1
        elif len(data) >= position + 2:
            return GUNICORN_DECIDES
        else:
            return MORE


class _Reading:
    """A connection whose request is still arriving."""

    __slots__ = ("deadline", "buffer", "counted")

    def __init__(self, deadline: float, buffer: bytes, counted: bool):
        self.deadline = deadline
        self.buffer = bytearray(buffer)
        self.counted = counted  # in nr_conns already (a kept-alive connection)


class RequestReadingWorker(ThreadWorker):
    """gthread, reading each request in the main loop first (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = config_from_env()  # gunicorn's master checked it already
        # Over TLS the bytes in the selector would be ciphertext: gthread's own way then.
        # (Platforms and proxies end TLS before the service.)
        self.pre_read = not self.cfg.is_ssl
        self.read_timeout = settings.REQUEST_READ_TIMEOUT
        self.limits = RequestLimits(self.cfg, settings.MAX_CONTENT_LENGTH)
        self.reading: OrderedDict[TConn, _Reading] = OrderedDict()  # oldest first
        self.closing: dict[TConn, float] = {}

    # A request arrives -------------------------------------------------------------------

    def accept(self, listener):
        """A new connection: its request is read here first; it counts as one of nr_conns (which
        gthread keeps under worker_connections) only once its first request is whole."""
        if not self.pre_read:
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self.read_request(conn, b"", counted=False)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request has begun: read it now."""
        if not self.pre_read:
            return super().on_client_socket_readable(conn, client)
        self.keepalived_conns.remove(conn)
        self.poller.unregister(client)
        self.read_request(conn, b"", counted=True)
        self.on_request_bytes(conn, client)

    def read_request(self, conn: TConn, already: bytes, counted: bool) -> None:
        """Wait in the selector for the rest of the request, if it is not whole yet."""
        if len(self.reading) >= MAX_READING:
            oldest = next(iter(self.reading))
            self.drop_reading(oldest)
        conn.sock.setblocking(False)
        reading = _Reading(time.monotonic() + self.read_timeout, already, counted)
        if already and self.settle(conn, reading, registered=False):
            return
        self.reading[conn] = reading
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))

    def on_request_bytes(self, conn: TConn, _client) -> None:
        reading = self.reading.get(conn)
        if reading is None:
            return
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was whole
            self.drop_reading(conn)
            return
        reading.buffer += data
        self.settle(conn, reading, registered=True)

    def settle(self, conn: TConn, reading: _Reading, registered: bool) -> bool:
        """Hand a whole request (or one for gunicorn to refuse) to a thread; True when handed."""
        try:
            state, expects_continue = request_state(bytes(reading.buffer), self.limits)
        except Exception:  # never in the main loop: gunicorn's parser will say what is wrong
            self.log.exception("Reading a request")
            state, expects_continue = GUNICORN_DECIDES, False
        if expects_continue:
            # The client waits for this before its body. Sent here, and the Expect line taken
            # out, so that the thread's parser does not send a second one.
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self.drop_reading(conn)
                return True
            reading.buffer[:] = _EXPECT_CONTINUE.sub(b"", bytes(reading.buffer), count=1)
            return False
        if state == MORE:
            return False
        if registered:
            self.poller.unregister(conn.sock)
            del self.reading[conn]
        if not reading.counted:
            self.nr_conns += 1
        conn.prebuffered = bytes(reading.buffer)
        conn.data_ready = True  # gthread's own wait for the first byte is over
        self.enqueue_req(conn)
        return True

    def handle(self, conn):
        """In a thread: the parser starts from the bytes the main loop read."""
        data = getattr(conn, "prebuffered", None)
        if data is not None:
            conn.prebuffered = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    # After the answer ----------------------------------------------------------------------

    def finish_request(self, conn, fs):
        """Keep the connection for its next request, reading what it pipelined in the main loop
        too; or close it without lingering in the main loop."""
        if not self.pre_read:
            return super().finish_request(conn, fs)
        try:
            keep = fs.result() if not fs.cancelled() else False
        except Exception:
            keep = False
        try:
            if keep and keep is not gthread._DEFER:
                ahead = conn.parser.unreader.take_buffered()
                if ahead:  # the next request has begun already
                    self.read_request(conn, ahead, counted=True)
                    return
                conn.sock.setblocking(False)
                conn.set_timeout()
                if not self.alive:
                    conn.timeout = min(conn.timeout, time.monotonic() + gthread.STOP_KEEPALIVE_LINGER)
                self.keepalived_conns.append(conn)
                self.poller.register(conn.sock, selectors.EVENT_READ,
                                     partial(self.on_client_socket_readable, conn))
            else:
                self.nr_conns -= 1
                self.close_later(conn)
        except Exception:
            self.nr_conns -= 1
            conn.close()

    def close_later(self, conn: TConn) -> None:
        """End our side at once; drain what the client still sends, in the selector, then close."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.closing[conn] = time.monotonic() + CLOSE_LINGER_SECONDS
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_closing_bytes, conn))
        except (OSError, ValueError):
            self.closing.pop(conn, None)
            conn.close()

    def on_closing_bytes(self, conn: TConn, _client) -> None:
        try:
            data = conn.sock.recv(CLOSE_DRAIN_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.finish_closing(conn)

    def finish_closing(self, conn: TConn) -> None:
        if self.closing.pop(conn, None) is not None:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.close()

    def drop_reading(self, conn: TConn) -> None:
        """Close a connection whose request did not come whole in time (or whose client left)."""
        reading = self.reading.pop(conn, None)
        if reading is None:
            return
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        if reading.counted:
            self.nr_conns -= 1
        conn.close()

    # The main loop's housekeeping, about once a second ------------------------------------

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn, reading in self.reading.items() if reading.deadline <= now]:
            self.drop_reading(conn)
        for conn in [conn for conn, until in self.closing.items() if until <= now]:
            self.finish_closing(conn)

    def murder_keepalived(self, force=False):
        super().murder_keepalived(force)
        if force:  # the worker is stopping
            for conn in list(self.reading):
                self.drop_reading(conn)
            for conn in list(self.closing):
                self.finish_closing(conn)

    # gunicorn's own error answers ------------------------------------------------------------

    def handle_error(self, req, client, addr, exc):
        """What gunicorn answers before the app (a malformed request line or header, headers too
        large, a URI too long, a transfer coding it does not serve, conflicting framing), as the
        service's JSON error with an X-Request-ID instead of gunicorn's HTML page."""
        if isinstance(exc, ParseException) and not isinstance(exc, (InvalidResponseHeader, InvalidResponseHeaderName)):
            status, reason, code = _edge_status(exc)
            detail = f"{reason}: {exc}" if str(exc) else reason
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        else:
            self.log.exception("Error handling request")
            status, reason, code, detail = 500, "Internal Server Error", "internal_error", "Internal server error"
        request_id = _request_id(req)
        body = json.dumps({"detail": detail, "code": code, "request_id": request_id}, separators=(",", ":")) + "\n"
        head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body.encode())}\r\nX-Request-ID: {request_id}\r\n\r\n")
        try:
            client.setblocking(False)
            client.sendall(head.encode("latin-1") + body.encode())
        except OSError:
            self.log.debug("Failed to send error message.")


def _edge_status(exc: ParseException) -> tuple[int, str, str]:
    """The status, reason and code of an error gunicorn found in a request."""
    if isinstance(exc, LimitRequestLine):
        return 414, "URI Too Long", "payload_too_large"
    if isinstance(exc, LimitRequestHeaders):
        return 431, "Request Header Fields Too Large", "payload_too_large"
    if isinstance(exc, UnsupportedTransferCoding):
        return 501, "Not Implemented", "invalid_request"
    if isinstance(exc, ExpectationFailed):
        return 417, "Expectation Failed", "invalid_request"
    if isinstance(exc, ForbiddenProxyRequest):
        return 403, "Forbidden", "forbidden"
    return 400, "Bad Request", "invalid_request"


def _request_id(req) -> str:
    """The client's X-Request-ID when gunicorn read one that is sane, else a new one."""
    for name, value in getattr(req, "headers", None) or ():
        if name.upper() == "X-REQUEST-ID" and _SANE_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex
