"""deploy/nginx.conf, as shipped, in front of gunicorn: slow clients stop at nginx, request ids
pass through, event streams are not buffered, nginx's own errors are the service's JSON."""
import json
import socket
import threading
import time
from contextlib import ExitStack

import pytest
import requests

from tests.support.agent import Stream
from tests.conftest import TEST_SECRET, AuthActions, skip_or_fail
from tests.support.assertions import assert_error
from tests.support.live_server import LiveServer
from tests.support.nginx import Nginx, deploy_site, nginx_binary
from tests.support.processes import free_port


@pytest.fixture
def proxied(request, tmp_path, agent_server):
    """gunicorn, and nginx with deploy/nginx.conf in front of it: only its upstream and listen
    address are changed, to the test's loopback ports."""
    if nginx_binary() is None:
        skip_or_fail(request, "nginx is not installed (make bench-deps)")
    server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path}/proxied.db", "JWT_SECRET_KEY": TEST_SECRET,
                         "AGENT_URL": agent_server.url}, workers=1, threads=4)
    assert server.run_release().returncode == 0
    port = free_port()
    with server, Nginx(tmp_path / "nginx", deploy_site(port, [server.port]), port) as nginx:
        yield nginx.url, port, server


def test_slow_clients_stop_at_nginx(proxied):
    url, port, _server = proxied
    with ExitStack() as stack:
        slow = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(200)]
        for sock in slow:
            sock.sendall(b"POST /api/alice/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)
        for _ in range(3):
            started = time.monotonic()
            assert requests.get(url + "/healthz", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
        turn = requests.post(f"{url}/api/alice/chat", json={"message": "through nginx"}, headers=AuthActions().headers(), timeout=10)
        assert turn.status_code == 200 and turn.json()["message"] == "You said: through nginx"


def test_request_ids_pass_through(proxied):
    url, _port, _server = proxied
    mine = requests.get(url + "/healthz", headers={"X-Request-ID": "trace-through-nginx"}, timeout=5)
    assert mine.headers["X-Request-ID"] == "trace-through-nginx"
    made = requests.get(url + "/nowhere", timeout=5)
    assert_error(made, 404, "not_found")  # the service's own error, untouched
    assert len(made.headers["X-Request-ID"]) == 32  # nginx's id, which the service took


def test_event_streams_are_not_buffered(proxied, agent_server):
    url, _port, _server = proxied
    resume = threading.Event()
    agent_server.enqueue(Stream(("first piece", " and the rest"), pause_after=1, pause_event=resume))
    with requests.post(f"{url}/api/alice/chat", json={"message": "stream it", "stream": True},
                       headers=AuthActions().headers(), stream=True, timeout=10) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = []
        while not any(line.startswith(b"data: ") for line in seen):
            seen.append(next(lines))  # the first delta, while the agent still holds the rest
        assert json.loads(seen[-1][len(b"data: "):]) == {"content": "first piece"}
        resume.set()
        rest = b"\n".join(lines)
    assert b"event: done" in rest


def test_nginx_errors_are_json(proxied):
    url, _port, server = proxied
    too_big = requests.post(f"{url}/api/alice/chat", data=b"x" * 300_000,
                            headers={"Content-Type": "application/json", "X-Request-ID": "big-one"}, timeout=10)
    assert_error(too_big, 413, "payload_too_large")
    assert too_big.headers["X-Request-ID"] == "big-one"
    assert_error(requests.get(url + "/" + "a" * 9000, timeout=10), 414, "payload_too_large")
    assert_error(requests.get(url + "/healthz", headers={"X-Big": "b" * 9000}, timeout=10), 431, "payload_too_large")
    server.stop()  # the service is gone: nginx's 502 comes as the service's 503
    gone = requests.get(url + "/healthz", timeout=10)
    assert_error(gone, 503, "service_unavailable")
    assert gone.headers["Retry-After"] == "1"
