"""The Procfile's two lines, for real: migrations, then gunicorn serving production settings."""
import importlib.util
import uuid

import requests

from tests.conftest import TEST_SECRET
from tests.live_server import ROOT, LiveServer


def load_gunicorn_conf(monkeypatch, **env):
    # The file sets PROMETHEUS_MULTIPROC_DIR when unset; keep that out of this test process.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent-metrics-dir")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gunicorn_conf_reads_the_environment(monkeypatch):
    conf = load_gunicorn_conf(monkeypatch, PORT="9123", WEB_CONCURRENCY="3", GUNICORN_THREADS="16", AGENT_TIMEOUT="45")
    assert conf.bind == "0.0.0.0:9123"
    assert (conf.workers, conf.worker_class, conf.threads, conf.worker_connections) == (3, "gthread", 16, 24)
    assert conf.timeout > 45 and conf.graceful_timeout > 45


def test_gunicorn_conf_defaults(monkeypatch):
    for name in ("PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "AGENT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    conf = load_gunicorn_conf(monkeypatch)
    assert (conf.bind, conf.workers, conf.threads, conf.worker_connections) == ("0.0.0.0:8000", 4, 32, 40)
    assert conf.timeout > 30
    assert conf.control_socket_disable is True
    assert conf.accesslog is None and conf.errorlog == "-"
    assert conf.limit_request_line == 8190


def test_procfile_lines():
    lines = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert lines == {"release": "flask --app wsgi db upgrade", "web": "gunicorn wsgi:app --config gunicorn.conf.py"}


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
