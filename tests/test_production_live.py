"""Production readiness against real processes: metrics across gunicorn workers, JSON logs,
graceful shutdown, and a PostgreSQL server that goes down and comes back."""
import glob
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from chatapp.extensions import db
from tests.support.agent import Echo
from tests.conftest import TEST_SECRET, AuthActions, Chat, make_app
from tests.support.live_server import LiveServer
from tests.support.assertions import assert_error
from tests.support.assertions import metric


@pytest.fixture
def production_env(database_uri, agent_server, tmp_path):
    return {
        "DATABASE_URL": database_uri,
        "JWT_SECRET_KEY": TEST_SECRET,
        "AGENT_URL": agent_server.url,
        "AGENT_TIMEOUT": "10",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }


def test_metrics_add_up_across_two_workers(production_env, agent_server):
    agent_server.default = Echo(delay=0.3)
    headers = AuthActions().headers()
    # One connection per worker at a time: concurrent turns must land on both workers.
    with LiveServer(production_env, workers=2, threads=1, extra_args=("--worker-connections", "1")) as server:
        def turn(n):
            with requests.Session() as session:
                return session.post(f"{server.url}/api/alice/chat", json={"message": f"m{n}"}, headers=headers, timeout=20).status_code

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(turn, range(8))) == [200] * 8
        counter_files = glob.glob(os.path.join(production_env["PROMETHEUS_MULTIPROC_DIR"], "counter_*.db"))
        scrapes = [requests.get(f"{server.url}/metrics", timeout=5).text for _ in range(6)]
    assert len(counter_files) == 2  # both workers counted requests
    for text in scrapes:
        assert metric(text, "chatapp_http_requests_total", method="POST", route="/api/<user_id>/chat", status="200") == 8
        assert metric(text, "chatapp_agent_call_duration_seconds_count", outcome="ok", agent="primary") == 8


def test_production_logs_are_json_lines_without_secrets(production_env, agent_server):
    token = AuthActions().token()
    server = LiveServer({**production_env, "AGENT_API_KEY": "sk-agent-key-never-logged"})
    with server:
        response = requests.post(
            f"{server.url}/api/alice/chat",
            json={"message": "private words"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "trace-42"},
            timeout=10,
        )
        assert response.status_code == 200
    # Every line, gunicorn's own included, is one JSON object: a log pipeline reads one format.
    lines = [json.loads(line) for line in server.output.splitlines() if line.strip()]
    gunicorn_messages = [line["message"] for line in lines if line["logger"] == "gunicorn.error"]
    assert any(message.startswith("Starting gunicorn") for message in gunicorn_messages)
    assert any(message.startswith("Booting worker with pid") for message in gunicorn_messages)
    assert all(line["level"] and line["time"] for line in lines)
    [request_line] = [line for line in lines if line.get("request_id") == "trace-42" and line["logger"] == "chatapp.request"]
    assert (request_line["method"], request_line["path"], request_line["status"], request_line["user_id"]) == ("POST", "/api/alice/chat", 200, "alice")
    assert request_line["conversation_id"] == response.json()["conversation_id"]
    assert request_line["agent_attempts"] == 1
    for secret in ("private words", token, "sk-agent-key-never-logged"):
        assert secret not in server.output


def test_sigterm_lets_the_turn_in_flight_finish_and_be_stored(production_env, agent_server, store):
    agent_server.default = Echo(delay=1.5)
    agent_called = threading.Event()
    agent_server.on_request = lambda _request: agent_called.set()
    server = LiveServer(production_env).start()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            requests.post, f"{server.url}/api/alice/chat", json={"message": "finish me"}, headers=AuthActions().headers(), timeout=30
        )
        assert agent_called.wait(10)
        server.process.send_signal(signal.SIGTERM)  # while the agent is still thinking
        response = pending.result()
    assert server.process.wait(timeout=30) == 0
    server.stop()
    assert response.status_code == 200
    assert response.json()["message"] == "You said: finish me"
    assert store.counts() == (1, 2)


def test_database_down_then_back_without_a_restart(throwaway_postgres, agent_server, auth):
    from flask_migrate import upgrade

    app = make_app(SQLALCHEMY_DATABASE_URI=throwaway_postgres.url, AGENT_URL=agent_server.url)
    with app.app_context():
        upgrade()
    chat = Chat(app.test_client(), auth)
    try:
        conversation_id = chat.turn("before")["conversation_id"]

        throwaway_postgres.stop()
        down = chat.post({"message": "while down", "conversation_id": conversation_id})
        assert_error(down, 503, "service_unavailable")
        assert down.headers["Retry-After"]
        assert_error(chat.client.get("/readyz"), 503, "service_unavailable")
        new_conversation = chat.post({"message": "new while down"})
        assert_error(new_conversation, 503, "service_unavailable")

        throwaway_postgres.start()  # the same app, the same pool: stale connections are replaced
        assert chat.client.get("/readyz").status_code == 200
        after = chat.turn("after", conversation_id=conversation_id)
        assert after["conversation_id"] == conversation_id
        with app.app_context():
            contents = [row[0] for row in db.session.execute(db.text("SELECT content FROM messages ORDER BY seq"))]
        assert contents == ["before", "You said: before", "after", "You said: after"]
    finally:
        with app.app_context():
            db.engine.dispose()
