"""Production readiness: rate limits, request logs, metrics, CORS (in process)."""
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from limits import parse

from chatapp.extensions import db
from chatapp.log_config import JsonFormatter, LineWriter
from chatapp.rate_limit import ProcessWindow
from tests.support.agent import Hang, Raw
from tests.conftest import Chat, make_app
from tests.support.assertions import assert_error, metric


@pytest.mark.parametrize("config_overrides", [{"RATE_LIMIT": "3 per minute"}])
def test_rate_limit_per_user(chat, agent_server, store):
    for n in range(3):
        chat.turn(f"hi {n}")
    response = chat.post({"message": "one too many"})

    body = assert_error(response, 429, "rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert body["detail"]
    assert len(agent_server.requests) == 3
    assert store.counts() == (3, 6)
    # Another user has a budget of their own.
    assert chat.post({"message": "hi"}, user_id="bob").status_code == 200


@pytest.mark.parametrize("config_overrides", [{"RATE_LIMIT": "3 per minute"}])
def test_requests_failing_validation_or_authentication_use_no_quota(chat, client, auth, agent_server):
    for _ in range(5):
        assert chat.post({"message": ""}).status_code == 400
        assert client.post("/api/alice/chat", json={"message": "hi"}).status_code == 401
        assert client.post("/api/alice/chat", json={"message": "hi"}, headers=auth.headers("mallory")).status_code == 403
    for n in range(3):
        chat.turn(f"hi {n}")
    assert_error(chat.post({"message": "hi"}), 429, "rate_limited")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_process_window_moves_with_time():
    clock = FakeClock()
    window = ProcessWindow(parse("3 per minute"), clock=clock)
    for second in (0, 10, 20):
        clock.now = 1000.0 + second
        assert window.hit("alice") is None
    clock.now = 1030.0
    assert window.hit("alice") == pytest.approx(30.0)  # the request at 1000 leaves the window at 1060
    assert window.hit("bob") is None  # a budget of one's own
    clock.now = 1060.0
    assert window.hit("alice") is None  # the first request has left the window...
    assert window.hit("alice") == pytest.approx(10.0)  # ...and only it: the next leaves at 1070


def test_process_window_forgets_users_who_went_quiet():
    clock = FakeClock()
    window = ProcessWindow(parse("5 per minute"), clock=clock)
    for n in range(ProcessWindow.SWEEP_EVERY - 1):
        assert window.hit(f"user-{n}") is None
    clock.now += 61
    assert window.hit("latest") is None  # the sweep: every other user's window is empty
    assert list(window._hits) == ["latest"]


@pytest.fixture
def redis_limited(redis_url):
    return {"RATE_LIMIT": "3 per minute", "REDIS_URL": redis_url}


def test_redis_shares_one_budget_between_processes(app, auth, redis_limited, agent_server, database_uri):
    user_id = f"user-{uuid.uuid4().hex}"  # a fresh budget in the shared Redis
    apps = [make_app(SQLALCHEMY_DATABASE_URI=database_uri, AGENT_URL=agent_server.url, **redis_limited) for _ in range(2)]
    first, second = (Chat(each.test_client(), auth) for each in apps)
    try:
        assert [first.post({"message": "a"}, user_id=user_id).status_code for _ in range(2)] == [200, 200]
        assert second.post({"message": "b"}, user_id=user_id).status_code == 200
        assert_error(second.post({"message": "c"}, user_id=user_id), 429, "rate_limited")
        assert_error(first.post({"message": "d"}, user_id=user_id), 429, "rate_limited")
    finally:
        for each in apps:
            with each.app_context():
                db.engine.dispose()


@pytest.mark.parametrize("config_overrides", [{"RATE_LIMIT": "1 per minute", "REDIS_URL": "redis://127.0.0.1:1/0"}])
def test_rate_limit_fails_open_when_redis_is_down(chat, agent_server, caplog):
    started = time.monotonic()
    assert [chat.post({"message": f"hi {n}"}).status_code for n in range(3)] == [200, 200, 200]
    assert time.monotonic() - started < 5
    assert any("rate limit storage unavailable" in record.getMessage() for record in caplog.records)


def test_line_writer_writes_whole_lines_from_many_threads(tmp_path):
    """Production's handler: one write() a record and no lock for ordinary lines; tracebacks
    longer than PIPE_BUF take a lock. Under 8 threads every line must still come out whole."""
    path = tmp_path / "out.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # as gunicorn's stdout to a file
    handler = LineWriter(fd)
    handler.setFormatter(JsonFormatter())
    logger = logging.Logger("line-writer-test")
    logger.addHandler(handler)

    def log_many(thread):
        for n in range(200):
            text = "x" * (20000 if n % 50 == 0 else 40)  # a few lines far beyond PIPE_BUF (4096)
            logger.info("line %s %s %s", thread, n, text, extra={"request_id": None})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(log_many, range(8)))
    os.close(fd)
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 200
    messages = {json.loads(line)["message"].rsplit(" ", 1)[0] for line in lines}
    assert messages == {f"line {thread} {n}" for thread in range(8) for n in range(200)}


def request_lines(caplog):
    return [json.loads(JsonFormatter().format(record)) for record in caplog.records if record.name == "chatapp.request"]


@pytest.mark.parametrize("config_overrides", [{"AGENT_API_KEY": "sk-agent-key-never-logged"}])
def test_one_structured_log_line_per_request(chat, auth, agent_server, caplog):
    caplog.set_level("INFO")
    token = auth.token()
    first = chat.post({"message": "top secret content"}, headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-1"})
    agent_server.enqueue(Raw(status=503, body=b""), Raw(status=503, body=b""))
    failed = chat.post({"message": "more secrets", "conversation_id": first.get_json()["conversation_id"]}, headers={"X-Request-ID": "req-2"})
    assert failed.status_code == 503

    ok, error = request_lines(caplog)
    assert set(ok) >= {"time", "level", "request_id", "method", "path", "status", "duration_ms", "user_id", "conversation_id", "agent_ms", "agent_attempts"}
    assert (ok["request_id"], ok["method"], ok["path"], ok["status"], ok["user_id"]) == ("req-1", "POST", "/api/alice/chat", 200, "alice")
    assert ok["conversation_id"] == first.get_json()["conversation_id"]
    assert ok["agent_attempts"] == 1 and ok["agent_ms"] >= 0 and ok["duration_ms"] >= ok["agent_ms"]
    assert "error" not in ok
    assert (error["request_id"], error["status"], error["error"], error["agent_kind"], error["agent_attempts"]) == ("req-2", 503, "agent_unavailable", "http_503", 2)
    everything = caplog.text + json.dumps(request_lines(caplog))
    for secret in ("top secret content", "more secrets", token, "sk-agent-key-never-logged"):
        assert secret not in everything


def test_errors_are_logged_with_their_code(client, caplog):
    caplog.set_level("INFO")
    client.get("/nowhere", headers={"X-Request-ID": "lost"})
    [line] = request_lines(caplog)
    assert (line["request_id"], line["status"], line["error"], line["path"]) == ("lost", 404, "not_found", "/nowhere")


def test_metrics(app, client, chat, agent_server):
    route = "/api/<user_id>/chat"
    before = client.get("/metrics").get_data(as_text=True)
    chat.turn("hi")
    agent_server.enqueue(Raw(status=500, body=b""))
    chat.post({"message": "fails"})
    chat.post({"message": ""})
    in_flight = []
    agent_server.on_request = lambda _request: in_flight.append(metric(app.test_client().get("/metrics").get_data(as_text=True), "chatapp_turns_in_flight"))
    chat.turn("measured while in flight")

    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)

    def grew(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert grew("chatapp_http_requests_total", method="POST", route=route, status="200") == 2
    assert grew("chatapp_http_requests_total", method="POST", route=route, status="503") == 1
    assert grew("chatapp_http_requests_total", method="POST", route=route, status="400") == 1
    assert grew("chatapp_http_request_duration_seconds_count", method="POST", route=route) == 4
    assert grew("chatapp_agent_call_duration_seconds_count", outcome="ok", agent="primary") == 2
    assert grew("chatapp_agent_call_duration_seconds_count", outcome="http_5xx", agent="primary") == 1
    assert in_flight == [1.0]
    assert metric(text, "chatapp_turns_in_flight") == 0


def test_agent_timeouts_are_counted_as_such(app, client, chat, agent_server):
    agent_server.enqueue(Hang())
    assert chat.post({"message": "hi"}).status_code == 503
    assert metric(client.get("/metrics").get_data(as_text=True), "chatapp_agent_call_duration_seconds_count", outcome="timeout", agent="primary") >= 1


def test_no_cors_headers_unless_configured(client, auth, agent_server):
    response = client.post("/api/alice/chat", json={"message": "hi"}, headers={**auth.headers(), "Origin": "https://app.example"})
    assert response.status_code == 200
    assert not any(name.lower().startswith("access-control-") for name in response.headers.keys())


@pytest.mark.parametrize("config_overrides", [{"CORS_ORIGINS": ["https://app.example"]}])
def test_cors_for_configured_origins(client, auth, agent_server):
    preflight = client.options(
        "/api/alice/chat",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")} >= {"authorization", "content-type", "idempotency-key"}
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]

    response = client.post("/api/alice/chat", json={"message": "hi"}, headers={**auth.headers(), "Origin": "https://app.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert {"X-Request-ID", "Retry-After", "Idempotent-Replayed", "WWW-Authenticate", "Content-Disposition"} <= {
        name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")}

    other = client.post("/api/alice/chat", json={"message": "hi"}, headers={**auth.headers(), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_metrics_content_type_names_its_charset_once(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].count("charset") == 1
    assert response.headers["Content-Type"].startswith("text/plain; version=")


METRICS_TOKEN = "metrics-token-for-the-scraper"


@pytest.mark.parametrize("config_overrides", [{"METRICS_TOKEN": METRICS_TOKEN}])
@pytest.mark.parametrize(
    "authorization, status, code",
    [
        (None, 401, "authentication_required"),
        ("Basic bWV0cmljczp4", 401, "authentication_required"),
        ("Bearer wrong-token", 401, "invalid_token"),
        (f"Bearer {METRICS_TOKEN}x", 401, "invalid_token"),
        (f"Bearer {METRICS_TOKEN}", 200, None),
        (f"bearer {METRICS_TOKEN}", 200, None),
    ],
)
def test_metrics_token(client, authorization, status, code):
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get("/metrics", headers=headers)
    if code is None:
        assert response.status_code == 200
        assert "chatapp_http_requests_total" in response.get_data(as_text=True)
    else:
        body = assert_error(response, status, code)
        assert set(body) == {"detail", "code", "request_id"}
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_metrics_are_open_without_a_token(client):
    """Unset, /metrics is for a private network, as before; a bearer token is not looked at."""
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_a_frozen_redis_costs_one_timeout_then_turns_keep_their_latency(own_redis, database_uri, agent_server, auth, caplog):
    app = make_app(SQLALCHEMY_DATABASE_URI=database_uri, AGENT_URL=agent_server.url, REDIS_URL=own_redis.url,
                   RATE_LIMIT="5 per minute")
    window = app.extensions["chat_rate_limit"]
    window.OPEN_SECONDS = 0.5
    chat = Chat(app.test_client(), auth)
    try:
        def timed_turn(n):
            started = time.monotonic()
            response = chat.post({"message": f"turn {n}"})
            return response.status_code, time.monotonic() - started

        for n in range(2):  # 2 of the 5 counted
            timed_turn(n)
        asked = []
        real_hit = window._limiter.hit
        window._limiter.hit = lambda *args: asked.append(args) or real_hit(*args)
        own_redis.freeze()
        caplog.clear()
        first_status, first_seconds = timed_turn(10)
        frozen = [timed_turn(n) for n in range(11, 21)]
        assert first_status == 200 and first_seconds >= window.TIMEOUT_SECONDS  # the one that found out
        assert [status for status, _ in frozen] == [200] * 10  # failing open, uncounted
        assert len(asked) == 1  # the others did not wait on Redis...
        assert max(seconds for _, seconds in frozen) < first_seconds  # ...and did not pay its timeout
        warnings = [r for r in caplog.records if "rate limit storage unavailable" in r.getMessage()]
        assert len(warnings) == 1

        own_redis.thaw()
        time.sleep(window.OPEN_SECONDS + 0.1)
        # Redis counts again. 3 of the 5 are used: the 2 before, and the one that timed out, which
        # Redis ran when it woke up.
        assert [chat.post({"message": f"after {n}"}).status_code for n in range(3)] == [200, 200, 429]
    finally:
        own_redis.thaw()
        with app.app_context():
            db.engine.dispose()
