"""A real OpenAI-compatible agent on loopback, scripted per test: answers, errors, slow and broken servers."""
import collections
import json
import re
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
WRITE_CHUNK = 64 * 1024


class RecordedRequest(NamedTuple):
    """One request as the agent received it; `json` is None when the body was not JSON."""

    path: str
    headers: dict
    json: Any
    client_port: int


def completion(content: str | None, usage: dict | None = None, model: str = "test-model",
               finish_reason: str | None = "stop") -> dict:
    """An OpenAI chat completion carrying `content` (and `usage` when given)."""
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


@dataclass
class Reply:
    """A chat completion with this content (None gives a null content), after `delay` seconds."""

    content: str | None = "Hello from the agent"
    usage: dict | None = None
    status: int = 200
    headers: dict | None = None
    delay: float = 0.0
    finish_reason: str | None = "stop"

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        if not handler.wait(self.delay):
            body = completion(self.content, self.usage, finish_reason=self.finish_reason)
            handler.send(self.status, json.dumps(body).encode(), self.headers)


@dataclass
class Raw:
    """Arbitrary bytes; `chunked` sends them without a Content-Length, and `headers` may set a false one."""

    status: int = 200
    body: bytes = b""
    headers: dict | None = None
    delay: float = 0.0
    chunked: bool = False

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        if not handler.wait(self.delay):
            handler.send(self.status, self.body, self.headers, chunked=self.chunked)


@dataclass
class Drip:
    """200 with the full Content-Length up front, then one byte every `interval` seconds."""

    body: bytes = field(default_factory=lambda: json.dumps(completion("dripped")).encode())
    interval: float = 0.2

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(self.body)))
        handler.end_headers()
        for index in range(len(self.body)):
            if handler.wait(self.interval):
                handler.close_connection = True
                return
            handler.wfile.write(self.body[index:index + 1])


@dataclass
class Hang:
    """Read the request, then never answer (until the server stops)."""

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        handler.wait(None)
        handler.close_connection = True


@dataclass
class Close:
    """Close the connection without answering."""

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        handler.close_connection = True


def last_message(handler: "_Handler", request: RecordedRequest):
    """The content of the request's last message; None after answering 400 when there is none."""
    try:
        return request.json["messages"][-1]["content"]
    except (TypeError, LookupError):
        handler.send(400, b'{"error": {"message": "messages is required"}}')
        return None


@dataclass
class Echo:
    """The default: a completion whose content is `prefix` + the last message's content, after `delay`;
    streamed (as StreamEcho) when the request asks for a stream."""

    prefix: str = "You said: "
    delay: float = 0.0

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        last = last_message(handler, request)
        if last is None:
            return
        if request.json.get("stream") is True:
            # Asked for a stream, it streams: one default serves both ways of calling the agent.
            if not handler.wait(self.delay):
                StreamEcho(self.prefix).respond(handler, request)
            return
        Reply(self.prefix + str(last), usage=USAGE, delay=self.delay).respond(handler, request)


def completion_chunk(
    content: str | None = None, role: str | None = None, finish_reason: str | None = None, model: str = "test-model"
) -> dict:
    """An OpenAI chat completion chunk: one choice whose delta carries `role` and `content` when given."""
    delta = {key: value for key, value in (("role", role), ("content", content)) if value is not None}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def usage_chunk(usage: dict, model: str = "test-model") -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choice, the usage."""
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage}


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying `data` (a dict as JSON)."""
    return b"data: %s\n\n" % (data if isinstance(data, str) else json.dumps(data)).encode()


def stream_events(pieces: tuple[str, ...], usage: dict | None = USAGE, done: bool = True,
                  finish_reason: str = "stop") -> list[bytes]:
    """OpenAI's events for `pieces`: the role, one chunk a piece, the finish, the usage, [DONE]."""
    events = [sse(completion_chunk("", role="assistant"))]
    events += [sse(completion_chunk(piece)) for piece in pieces]
    events.append(sse(completion_chunk(finish_reason=finish_reason)))
    if usage is not None:
        events.append(sse(usage_chunk(usage)))
    if done:
        events.append(sse("[DONE]"))
    return events


def words(text: str) -> tuple[str, ...]:
    """`text` cut before each word that follows a space: the pieces join back to `text`."""
    return tuple(piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece)


def start_event_stream(handler: "_Handler") -> None:
    """200 with the headers of an event stream, framed by chunked encoding."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def send_chunk(handler: "_Handler", data: bytes) -> None:
    """Write `data` as one HTTP chunk (b"" ends the body), at once."""
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


@dataclass
class Stream:
    """A streamed answer: `pieces` `interval` apart; after `pause_after` pieces a pause of `pause` s, or
    until `pause_event` is set; `fail_after` pieces then a cut connection; `done=False` leaves out [DONE].
    `sent` counts the pieces handed to the connection, `finished` is set when the handler returns, `disconnected` when
    a write failed because the client had gone."""

    pieces: tuple[str, ...] = ("Hel", "lo", "!")
    usage: dict | None = field(default_factory=lambda: dict(USAGE))
    interval: float = 0.0
    pause_after: int | None = None
    pause: float = 0.0
    pause_event: threading.Event | None = None
    fail_after: int | None = None
    done: bool = True
    finish_reason: str = "stop"
    sent: int = field(default=0, init=False, compare=False)
    finished: threading.Event = field(default_factory=threading.Event, init=False, compare=False, repr=False)
    disconnected: threading.Event = field(default_factory=threading.Event, init=False, compare=False, repr=False)

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        try:
            if not self._send(handler):
                handler.close_connection = True
        except OSError:
            self.disconnected.set()
            handler.close_connection = True
        finally:
            self.finished.set()

    def _send(self, handler: "_Handler") -> bool:
        """Write the stream; False when it was cut (as scripted, or because the server is stopping)."""
        start_event_stream(handler)
        for index, event in enumerate(stream_events(self.pieces, self.usage, self.done, self.finish_reason)):
            piece = index - 1  # the role's chunk comes first
            if 0 <= piece <= len(self.pieces) and self._hold(handler, piece):
                return False
            if 0 <= piece < len(self.pieces):
                self.sent += 1  # before the write: a client that has read a piece finds it counted
            send_chunk(handler, event)
        send_chunk(handler, b"")
        return True

    def _hold(self, handler: "_Handler", piece: int) -> bool:
        """Before piece `piece` (or the end): wait, pause or fail as scripted; True to cut the stream."""
        if piece == self.fail_after:
            return True
        if piece == self.pause_after:
            if self.pause_event is None:
                return handler.wait(self.pause)
            while not self.pause_event.wait(0.01):
                if handler.wait(0):
                    return True
            return False
        return 0 < piece and handler.wait(self.interval)


@dataclass
class StreamEcho:
    """Echo, streamed: `prefix` + the last message's content word by word, the usage, then [DONE]."""

    prefix: str = "You said: "
    interval: float = 0.0

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        last = last_message(handler, request)
        if last is not None:
            Stream(words(self.prefix + str(last)), usage=USAGE, interval=self.interval).respond(handler, request)


@dataclass
class DripStream:
    """An event stream whose bytes come one every `interval` seconds, so no piece is whole for long."""

    pieces: tuple[str, ...] = ("Hel", "lo", "!")
    interval: float = 0.2

    def respond(self, handler: "_Handler", request: RecordedRequest) -> None:
        start_event_stream(handler)
        body = b"".join(stream_events(self.pieces))
        for index in range(len(body)):
            if handler.wait(self.interval):
                handler.close_connection = True
                return
            send_chunk(handler, body[index:index + 1])
        send_chunk(handler, b"")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so tests can see pooled connections reused
    disable_nagle_algorithm = True  # small writes (a drip, a stream) go out at once, as a real server's do
    server: "_Server"

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        request = RecordedRequest(self.path, dict(self.headers), body, self.client_address[1])
        agent = self.server.agent
        behaviour = agent._record(request)
        if agent.on_request is not None:
            agent.on_request(request)
        behaviour.respond(self, request)

    def send(self, status: int, body: bytes, headers: dict | None = None, *, chunked: bool = False) -> None:
        """Answer with `body`, framed by Content-Length or, when `chunked`, by chunked encoding."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Transfer-Encoding" if chunked else "Content-Length", "chunked" if chunked else str(len(body)))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.end_headers()
        if not chunked:
            self.wfile.write(body)
            return
        for start in range(0, len(body), WRITE_CHUNK):
            piece = body[start:start + WRITE_CHUNK]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def wait(self, seconds: float | None) -> bool:
        """Sleep up to `seconds` (None: forever); True when the server is stopping."""
        if seconds == 0:
            return self.server.stopping.is_set()
        return self.server.stopping.wait(seconds)

    def log_message(self, format: str, *args) -> None:
        pass  # keep test output quiet


class _Server(ThreadingHTTPServer):
    """Tracks open connections so that stop() can cut them and join every handler thread."""

    # socketserver's default backlog of 5 drops connection attempts when many workers call at once,
    # and a dropped SYN is retried only after a second: an agent that looks slow for no reason.
    request_queue_size = 128

    def __init__(self, agent: "AgentServer"):
        self.agent = agent
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def disconnect_all(self) -> None:
        """Unblock handlers waiting on their clients (a keep-alive read, a write)."""
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        # A client that gave up (deadline, size cap) or a server that is stopping is normal here.
        if isinstance(error, OSError):
            return
        self.agent.errors.append(error)
        super().handle_error(request, client_address)


class AgentServer:
    """The scripted agent: `enqueue` behaviours, read `requests`; usable as a context manager."""

    def __init__(self):
        self.requests: list[RecordedRequest] = []
        self.default = Echo()
        self.on_request: Callable[[RecordedRequest], None] | None = None
        self.errors: list[BaseException] = []
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "AgentServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "AgentServer":
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, name="agent-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly, even with handlers hanging; re-raise the first error a handler or hook raised."""
        if self._stopped:
            return
        self._stopped = True
        self._server.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        self._server.disconnect_all()
        self._server.server_close()  # joins the handler threads
        if self.errors:
            raise AssertionError(f"the agent server failed: {self.errors[0]!r}") from self.errors[0]

    def enqueue(self, *behaviours) -> None:
        """Queue behaviours; each request consumes the next one, then `default` applies."""
        with self._lock:
            self._queue.extend(behaviours)

    def _record(self, request: RecordedRequest):
        """Record the request and pick its behaviour, atomically, so arrival order is queue order."""
        with self._lock:
            self.requests.append(request)
            return self._queue.popleft() if self._queue else self.default


def closed_port_url() -> str:
    """The URL of a loopback port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
