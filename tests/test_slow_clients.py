"""Slow, broken and hostile clients, through gunicorn with the production config: they hold no
thread, they are closed after REQUEST_READ_TIMEOUT, and gunicorn's own errors are JSON."""
import json
import socket
import threading
import time
from contextlib import ExitStack

import pytest
import requests

from tests.support.agent import AgentServer
from tests.conftest import TEST_SECRET, AuthActions
from tests.support.live_server import LiveServer, raw_request

READ_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One worker of two threads (two clients that hold a thread each would stop it), shared by
    the module's tests: what one test's clients leave is closed by the deadline anyway."""
    with AgentServer() as agent:
        server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('slow')}/slow.db",
                             "JWT_SECRET_KEY": TEST_SECRET, "AGENT_URL": agent.url,
                             "REQUEST_READ_TIMEOUT": str(READ_TIMEOUT)}, workers=1, threads=2)
        assert server.run_release().returncode == 0
        with server:
            yield server


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def served_promptly(server) -> None:
    """/healthz within a second, and a chat turn answered."""
    started = time.monotonic()
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 1.0
    turn = requests.post(f"{server.url}/api/alice/chat", json={"message": "still here?"},
                         headers=AuthActions().headers(), timeout=5)
    assert turn.status_code == 200, turn.text


def closed_by_the_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (no answer comes)."""
    sock.settimeout(within)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def chat_head(length: int, extra: str = "") -> bytes:
    return (f"POST /api/alice/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {AuthActions().token()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n").encode()


SLOW_STARTS = {
    "a request line, then nothing": b"GET /healthz HTTP/1.1\r\n",
    "an incomplete header block": b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n",
    "a body shorter than its Content-Length": chat_head(100) + b'{"message": ',
}


@pytest.mark.parametrize("start", SLOW_STARTS.values(), ids=SLOW_STARTS.keys())
def test_clients_that_stop_sending_hold_no_thread_and_are_closed(small_server, start):
    with ExitStack() as stack:
        slow = [stack.enter_context(connect(small_server)) for _ in range(20)]
        for sock in slow:
            sock.sendall(start)
        time.sleep(0.2)  # they are all waiting now
        served_promptly(small_server)
        assert all(closed_by_the_server(sock, READ_TIMEOUT + 2.5) for sock in slow)


def test_a_client_dripping_its_headers_is_closed_at_the_deadline(small_server):
    """One byte every 0.1 s never ends the header block in time: each read is quick, the whole is not."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Drip: " + b"a" * 200 + b"\r\n\r\n"
    with ExitStack() as stack:
        slow = [stack.enter_context(connect(small_server)) for _ in range(10)]
        stop = threading.Event()

        def drip():
            for position in range(len(request)):
                if stop.wait(0.1):
                    return
                for sock in slow:
                    try:
                        sock.sendall(request[position:position + 1])
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        started = time.monotonic()
        time.sleep(0.3)
        served_promptly(small_server)
        closed = [closed_by_the_server(sock, READ_TIMEOUT + 2.5) for sock in slow]
        stop.set()
        dripper.join(5)
    assert all(closed)
    assert time.monotonic() - started < READ_TIMEOUT + 3


def test_expect_100_continue_gets_its_continue_and_a_missing_body_is_closed(small_server):
    body = json.dumps({"message": "after the continue"}).encode()
    with ExitStack() as stack:
        waiting = [stack.enter_context(connect(small_server)) for _ in range(10)]
        for sock in waiting:
            sock.sendall(chat_head(len(body), "Expect: 100-continue\r\n"))
        for sock in waiting:
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        served_promptly(small_server)
        assert all(closed_by_the_server(sock, READ_TIMEOUT + 2.5) for sock in waiting)
    # A client that sends its body after the continue is answered, and no second continue comes.
    with connect(small_server) as sock:
        sock.sendall(chat_head(len(body), "Expect: 100-continue\r\n"))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while b"You said" not in answer:
            answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"100 Continue" not in answer


def test_clients_that_asked_to_be_closed_and_do_not_hang_up_cost_nothing(small_server):
    with ExitStack() as stack:
        lingering = [stack.enter_context(connect(small_server)) for _ in range(5)]
        for sock in lingering:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        for sock in lingering:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # answered; the client stays
        timings = []
        for _ in range(5):
            started = time.monotonic()
            assert requests.get(small_server.url + "/healthz", timeout=10).status_code == 200
            timings.append(time.monotonic() - started)
    assert max(timings) < 0.5, timings


def test_two_hundred_slow_clients_against_the_defaults(tmp_path, agent_server):
    """The production defaults (4 workers x 32 threads) and 200 connections that send a request
    line and nothing more."""
    server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path}/slow.db", "JWT_SECRET_KEY": TEST_SECRET,
                         "AGENT_URL": agent_server.url}, workers=4, threads=32)
    assert server.run_release().returncode == 0
    with server, ExitStack() as stack:
        slow = [stack.enter_context(connect(server)) for _ in range(200)]
        for sock in slow:
            sock.sendall(b"POST /api/alice/chat HTTP/1.1\r\n")
        time.sleep(0.3)
        for _ in range(5):
            served_promptly(server)


# Errors gunicorn answers before the app, as JSON -------------------------------------------

EDGE_ERRORS = {
    "an 8 KB header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "payload_too_large"),
    "500 headers": (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(500)) + b"\r\n",
                    431, "payload_too_large"),
    "a URI too long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "payload_too_large"),
    "Content-Length and Transfer-Encoding": (
        b"POST /api/alice/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400, "invalid_request"),
    "two Content-Lengths": (b"POST /api/alice/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                            400, "invalid_request"),
    "a raw UTF-8 path": ("GET /café HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, "invalid_request"),
    "a NUL in a header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", 400, "invalid_request"),
    "a malformed request line": (b"GET\r\n\r\n", 400, "invalid_request"),
    "a transfer coding it does not serve": (
        b"POST /api/alice/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, br\r\n\r\n", 501, "invalid_request"),
}


@pytest.mark.parametrize("request_bytes, status, code", EDGE_ERRORS.values(), ids=EDGE_ERRORS.keys())
def test_errors_at_the_http_edge_are_json(small_server, request_bytes, status, code):
    answer_status, headers, body = raw_request(small_server.port, request_bytes)
    assert answer_status == status
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert set(payload) == {"detail", "code", "request_id"}
    assert payload["code"] == code and payload["detail"]
    assert payload["request_id"] == headers["x-request-id"]
    assert b"<html" not in body.lower()
