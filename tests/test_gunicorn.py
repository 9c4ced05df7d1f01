"""The Procfile's two lines, for real: migrations, then gunicorn serving production settings."""
import importlib.util
import json
import time
import uuid

import pytest
import requests

from tests.conftest import TEST_SECRET
from tests.support.live_server import ROOT, LiveServer, raw_request


def load_gunicorn_conf(monkeypatch, tmp_path, **env):
    # The file sets PROMETHEUS_MULTIPROC_DIR when unset: give it the test's own directory.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    env = {"CHATAPP_ENV": "production", "JWT_SECRET_KEY": TEST_SECRET, "AGENT_URL": "http://127.0.0.1:9/v1", **env}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gunicorn_conf_reads_the_environment(monkeypatch, tmp_path):
    conf = load_gunicorn_conf(monkeypatch, tmp_path, PORT="9123", WEB_CONCURRENCY="3", GUNICORN_THREADS="16", AGENT_TIMEOUT="45")
    assert conf.bind == "0.0.0.0:9123"
    assert (conf.workers, conf.worker_class, conf.threads, conf.worker_connections) == (3, "chatapp.serving.RequestReadingWorker", 16, 24)
    assert conf.timeout > 45  # a heartbeat, kept above the agent's deadline


def test_gunicorn_conf_defaults(monkeypatch, tmp_path):
    for name in ("PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "AGENT_TIMEOUT", "LOG_FORMAT", "LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    conf = load_gunicorn_conf(monkeypatch, tmp_path)
    assert (conf.bind, conf.workers, conf.threads, conf.worker_connections) == ("0.0.0.0:8000", 4, 32, 40)
    assert conf.timeout > 25
    # Heroku-style platforms send SIGKILL 30 s after SIGTERM; a turn at the default deadline fits.
    assert 25 < conf.graceful_timeout <= 28
    assert conf.logger_class == "chatapp.log_config.GunicornJsonLogger"
    assert conf.control_socket_disable is True
    assert conf.accesslog is None and conf.errorlog == "-"
    assert conf.limit_request_line == 8190


def test_release_then_web_serve_a_conversation(tmp_path, agent_server, auth):
    server = LiveServer(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path}/prod.db",
            "JWT_SECRET_KEY": TEST_SECRET,
            "AGENT_URL": agent_server.url,
            "AGENT_TIMEOUT": "5",
        }
    )
    release = server.run_release()
    assert release.returncode == 0, release.stderr
    with server:
        headers = auth.headers("alice")
        first = requests.post(f"{server.url}/api/alice/chat", json={"message": "Hello"}, headers=headers, timeout=10)
        assert first.status_code == 200, first.text
        conversation_id = first.json()["conversation_id"]
        second = requests.post(
            f"{server.url}/api/alice/chat",
            json={"message": "Again", "conversation_id": conversation_id},
            headers=headers,
            timeout=10,
        )
        assert second.status_code == 200
        assert second.json()["message"] == "You said: Again"
        assert len(agent_server.requests[1].json["messages"]) == 3

        # Production errors are JSON too: an unknown route, a bad body.
        missing = requests.get(f"{server.url}/nope", timeout=5)
        assert (missing.status_code, missing.headers["Content-Type"]) == (404, "application/json")
        bad = requests.post(f"{server.url}/api/alice/chat", data=b"{", headers={**headers, "Content-Type": "application/json"}, timeout=5)
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")
        uuid.UUID(bad.headers["X-Request-ID"], version=4)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
def small_body_server(tmp_path, agent_server):
    server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path}/prod.db", "JWT_SECRET_KEY": TEST_SECRET,
                         "AGENT_URL": agent_server.url, "MAX_CONTENT_LENGTH": "1000"})
    assert server.run_release().returncode == 0
    with server:
        yield server


def chat_head(port: int, token: str) -> bytes:
    return (f"POST /api/alice/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()


def test_an_oversized_chunked_body_is_413_and_is_not_read_to_its_end(small_body_server, auth, agent_server):
    """No Content-Length to refuse up front: the service reads one byte past MAX_CONTENT_LENGTH
    and answers 413 while the client is still sending (the body's end never comes)."""
    port = small_body_server.port
    head = chat_head(port, auth.token())
    over = json.dumps({"message": "x" * 1200}).encode()
    started = time.monotonic()
    status, headers, body = raw_request(port, head, [chunk(over[:600]), chunk(over[600:])])  # no last chunk
    assert time.monotonic() - started < 5
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"detail": "Request body too large", "code": "payload_too_large",
                                "request_id": headers["x-request-id"]}
    assert agent_server.requests == []


def test_a_chunked_body_at_the_limit_is_read_whole(small_body_server, auth, agent_server):
    port = small_body_server.port
    exact = json.dumps({"message": "x" * 100}).encode()
    exact = exact[:-1] + b" " * (1000 - len(exact)) + b"}"  # 1,000 bytes: exactly MAX_CONTENT_LENGTH
    assert len(exact) == 1000
    status, _headers, body = raw_request(port, chat_head(port, auth.token()), [chunk(exact[:300]), chunk(exact[300:]), b"0\r\n\r\n"])
    assert status == 200, body
    assert json.loads(body)["message"] == "You said: " + "x" * 100
