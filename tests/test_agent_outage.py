"""When the agent is down: the circuit breaker, the fallback agent, the cap on calls in flight; with
real agents on loopback that hang, refuse, fail and recover."""
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import TEST_SECRET, AuthActions, Chat
from tests.support.agent import AgentServer, Echo, Hang, Raw, Stream, closed_port_url
from tests.support.assertions import assert_error, metric, sse_events
from tests.support.live_server import LiveServer

DEADLINE = 0.4
OPEN_SECONDS = 1.0


@pytest.fixture
def config_overrides():
    return {"AGENT_TIMEOUT": DEADLINE, "AGENT_MAX_RETRIES": 0, "AGENT_BREAKER_FAILURES": 5,
            "AGENT_BREAKER_SECONDS": OPEN_SECONDS, "RATE_LIMIT": "100000 per minute"}


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def open_the_breaker(chat, agent_server):
    agent_server.default = Hang()
    for n in range(5):
        assert_error(chat.post({"message": f"hangs {n}"}), 503, "agent_unavailable")
    assert len(agent_server.requests) == 5


def test_the_breaker_opens_after_five_failed_turns_and_answers_at_once(chat, client, agent_server, store, caplog):
    open_the_breaker(chat, agent_server)
    opened = [r.getMessage() for r in caplog.records if r.name == "chatapp.agent.guard"]
    assert opened == ["agent circuit breaker open: the primary agent failed 5 turns in a row; turns skip it for 1 s"]
    response, seconds = timed(lambda: chat.post({"message": "sixth"}))
    body = assert_error(response, 503, "agent_unavailable")
    assert seconds < 0.1
    assert len(agent_server.requests) == 5  # the sixth reached no agent
    assert 1 <= int(response.headers["Retry-After"]) <= OPEN_SECONDS + 1
    assert "unavailable" in body["detail"]
    assert client.get("/readyz").get_json() == {"status": "ready", "agent": "open"}  # still ready
    assert metric(client.get("/metrics").get_data(as_text=True), "chatapp_agent_breaker_open", agent="primary") == 1
    assert store.counts() == (0, 0)


def test_after_the_open_period_one_probe_at_a_time(app, chat, agent_server):
    open_the_breaker(chat, agent_server)
    time.sleep(OPEN_SECONDS + 0.05)
    agent_server.default = Echo(delay=0.2)  # recovered; slow enough for the 8 to overlap
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda n: Chat(app.test_client(), AuthActions()).post({"message": f"p{n}"}).status_code, range(8)))
    assert sorted(statuses) == [200] + [503] * 7
    assert len(agent_server.requests) == 5 + 1  # exactly one reached the agent
    assert chat.client.get("/readyz").get_json()["agent"] == "closed"
    assert metric(chat.client.get("/metrics").get_data(as_text=True), "chatapp_agent_breaker_open", agent="primary") == 0
    assert [chat.post({"message": f"after {n}"}).status_code for n in range(3)] == [200] * 3


def test_a_failed_probe_opens_the_breaker_again(chat, agent_server):
    open_the_breaker(chat, agent_server)
    time.sleep(OPEN_SECONDS + 0.05)
    assert_error(chat.post({"message": "probe"}), 503, "agent_unavailable")  # the agent still hangs
    assert len(agent_server.requests) == 6
    response, seconds = timed(lambda: chat.post({"message": "again"}))
    assert_error(response, 503, "agent_unavailable")
    assert seconds < 0.1 and len(agent_server.requests) == 6


def test_answers_400_to_499_leave_the_breaker_closed(chat, client, agent_server):
    agent_server.default = Raw(status=400, body=b'{"error": {"message": "unknown model"}}')
    for n in range(10):
        assert_error(chat.post({"message": f"bad model {n}"}), 503, "agent_unavailable")
    agent_server.default = Echo()
    assert chat.post({"message": "fine"}).status_code == 200
    assert len(agent_server.requests) == 11
    assert client.get("/readyz").get_json()["agent"] == "closed"


@pytest.mark.parametrize("config_overrides", [{"AGENT_BREAKER_FAILURES": 0, "AGENT_TIMEOUT": 0.2, "AGENT_MAX_RETRIES": 0}])
def test_no_breaker_with_failures_zero(chat, agent_server):
    agent_server.default = Hang()
    for n in range(7):
        assert_error(chat.post({"message": f"n{n}"}), 503, "agent_unavailable")
    assert len(agent_server.requests) == 7


def test_a_failed_turn_stores_nothing_and_its_key_runs_anew(chat, agent_server, store):
    agent_server.default = Hang()
    assert_error(chat.post({"message": "lost"}, headers={"Idempotency-Key": "k-outage"}), 503, "agent_unavailable")
    agent_server.default = Echo()
    again = chat.post({"message": "lost"}, headers={"Idempotency-Key": "k-outage"})
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert store.counts() == (1, 2)


# The fallback agent ---------------------------------------------------------------------------


@pytest.fixture
def fallback_server():
    with AgentServer() as server:
        server.default = Echo(prefix="Fallback says: ")
        yield server


@pytest.fixture
def with_fallback(app, fallback_server):
    """The app's agent rebuilt with a fallback at `fallback_server`, of its own model."""
    from chatapp.agent import build_agent

    config = {**app.config, "AGENT_FALLBACK_URL": fallback_server.url, "AGENT_FALLBACK_MODEL": "fallback-model"}
    service = app.extensions["chat_service"]
    service.agent = build_agent(config)
    return service.agent


def test_a_primary_refusing_connections_falls_back(app, chat, with_fallback, fallback_server, caplog):
    with_fallback.primary = build_http(app, closed_port_url())
    body = chat.turn("hello")
    assert (body["message"], body["model"]) == ("Fallback says: hello", "fallback-model")
    assert len(fallback_server.requests) == 1
    line = [r for r in caplog.records if r.name == "chatapp.request"][-1]
    assert line.fields["agent"] == "fallback"


def build_http(app, url):
    from chatapp.agent import OpenAIChatAgent

    config = app.config
    return OpenAIChatAgent(url, connect_timeout=config["AGENT_CONNECT_TIMEOUT"], timeout=config["AGENT_TIMEOUT"],
                           max_retries=0, max_response_bytes=config["AGENT_MAX_RESPONSE_BYTES"],
                           stream_timeout=config["AGENT_STREAM_TIMEOUT"])


def test_with_the_primarys_breaker_open_the_fallback_answers_at_once(chat, with_fallback, agent_server, fallback_server):
    agent_server.default = Raw(status=502, body=b"")
    for n in range(5):  # each falls back, and counts against the primary
        assert chat.turn(f"n{n}")["model"] == "fallback-model"
    assert len(agent_server.requests) == 5
    (response, seconds) = timed(lambda: chat.post({"message": "now"}))
    assert response.status_code == 200 and response.get_json()["model"] == "fallback-model"
    assert seconds < 0.15 and len(agent_server.requests) == 5  # the primary was not called


def test_the_fallback_gets_only_what_is_left_of_the_deadline(chat, with_fallback, agent_server, fallback_server):
    agent_server.default = Raw(status=503, body=b"overloaded", delay=DEADLINE * 0.7)
    fallback_server.default = Echo(delay=DEADLINE)  # would answer after the turn's deadline
    response, seconds = timed(lambda: chat.post({"message": "late"}))
    assert_error(response, 503, "agent_unavailable")
    assert len(fallback_server.requests) == 1
    assert seconds < DEADLINE + 0.15  # one deadline for both, not one each


def test_both_down_is_503(app, chat, with_fallback, agent_server, fallback_server, store):
    agent_server.default = Raw(status=502, body=b"")
    fallback_server.default = Raw(status=500, body=b"")
    assert_error(chat.post({"message": "nobody"}), 503, "agent_unavailable")
    assert (len(agent_server.requests), len(fallback_server.requests)) == (1, 1)
    assert store.counts() == (0, 0)


def events(response):
    text = response.get_data(as_text=True)
    return [event for _, event, _ in sse_events(text)], text


def test_a_stream_falls_back_only_before_its_first_piece(chat, with_fallback, agent_server, fallback_server, store):
    agent_server.enqueue(Raw(status=503, body=b""))
    response = chat.post({"message": "stream it", "stream": True})
    names, text = events(response)
    assert response.status_code == 200 and names[-1] == "done"
    assert '"model":"fallback-model"' in text and "Fallback says" in text

    agent_server.enqueue(Stream(("first", " and then"), fail_after=1))
    response = chat.post({"message": "cut", "stream": True})
    names, text = events(response)
    assert names == ["delta", "error"]  # it had begun: no fallback
    assert len(fallback_server.requests) == 1
    assert store.counts() == (1, 2)


# The cap on calls in flight -------------------------------------------------------------------


def test_past_the_cap_turns_are_refused_at_once_and_the_rest_keep_answering(tmp_path):
    with AgentServer() as agent:
        agent.default = Hang()
        server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path}/cap.db", "JWT_SECRET_KEY": TEST_SECRET,
                             "AGENT_URL": agent.url, "AGENT_TIMEOUT": "3", "AGENT_MAX_RETRIES": "0",
                             "AGENT_MAX_CONCURRENCY": "4", "RATE_LIMIT": "100000 per minute"}, workers=1, threads=8)
        assert server.run_release().returncode == 0
        headers = AuthActions().headers()
        with server:
            arrived = threading.Semaphore(0)
            agent.on_request = lambda _request: arrived.release()

            def post(n):
                started = time.monotonic()
                answer = requests.post(f"{server.url}/api/alice/chat", json={"message": f"m{n}"}, headers=headers, timeout=10)
                return answer, time.monotonic() - started

            with ThreadPoolExecutor(8) as pool:
                holding = [pool.submit(post, n) for n in range(4)]
                for _ in range(4):
                    assert arrived.acquire(timeout=5)  # four calls in flight at the agent
                refused = list(pool.map(post, range(4, 8)))
                quick = []
                for path in ("/healthz", "/api/alice/conversations"):
                    started = time.monotonic()
                    assert requests.get(server.url + path, headers=headers, timeout=5).status_code == 200
                    quick.append(time.monotonic() - started)
                held = [future.result() for future in holding]
        for answer, seconds in refused:
            assert_error(answer, 503, "agent_unavailable")
            assert answer.headers["Retry-After"] == "1" and seconds < 0.5
        assert len(agent.requests) == 4
        assert max(quick) < 0.2, quick
        assert all(answer.status_code == 503 for answer, _ in held)  # the hung four timed out


# Through gunicorn, on both databases ----------------------------------------------------------


@pytest.fixture
def served(database_uri, agent_server, tmp_path):
    """The Procfile's gunicorn on this test's database, with the agent at `agent_server`; call it
    with more settings to start it."""
    def start(**settings):
        env = {"DATABASE_URL": database_uri, "JWT_SECRET_KEY": TEST_SECRET, "AGENT_URL": agent_server.url,
               "AGENT_TIMEOUT": str(DEADLINE), "AGENT_MAX_RETRIES": "0", "AGENT_BREAKER_SECONDS": "30",
               "RATE_LIMIT": "100000 per minute", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
               **settings}
        return LiveServer(env, workers=1, threads=8)
    return start


def test_through_gunicorn_the_breaker_fails_fast_and_the_key_runs_anew(served, agent_server):
    agent_server.default = Hang()
    headers = AuthActions().headers()
    with served() as server:
        def post(message, **extra):
            started = time.monotonic()
            answer = requests.post(f"{server.url}/api/alice/chat", json={"message": message},
                                   headers={**headers, **extra}, timeout=10)
            return answer, time.monotonic() - started

        for n in range(5):
            assert_error(post(f"hangs {n}")[0], 503, "agent_unavailable")
        response, seconds = post("sixth", **{"Idempotency-Key": "k-open"})
        assert_error(response, 503, "agent_unavailable")
        assert seconds < 0.1 and len(agent_server.requests) == 5
        assert 25 <= int(response.headers["Retry-After"]) <= 30
        assert requests.get(f"{server.url}/readyz", timeout=5).json() == {"status": "ready", "agent": "open"}
        text = requests.get(f"{server.url}/metrics", timeout=5).text
        pid = re.search(r'chatapp_agent_breaker_open\{agent="primary",pid="(\d+)"\} 1\.0', text)
        assert pid, text  # one sample per worker: this one's breaker is open
        assert metric(text, "chatapp_agent_breaker_open", agent="primary", pid=pid.group(1)) == 1
        listed = requests.get(f"{server.url}/api/alice/conversations", headers=headers, timeout=5).json()
        assert listed["conversations"] == []  # nothing stored for the failed turns
        replay = post("sixth", **{"Idempotency-Key": "k-open"})[0]
        assert_error(replay, 503, "agent_unavailable")  # not a replay of the failure: it ran anew


def test_through_gunicorn_the_fallback_answers_and_its_model_is_stored(served, agent_server, fallback_server):
    agent_server.default = Raw(status=502, body=b"")
    headers = AuthActions().headers()
    with served(AGENT_FALLBACK_URL=fallback_server.url, AGENT_FALLBACK_MODEL="fallback-model") as server:
        def post(message):
            started = time.monotonic()
            answer = requests.post(f"{server.url}/api/alice/chat", json={"message": message}, headers=headers, timeout=10)
            return answer, time.monotonic() - started

        for n in range(5):
            answer = post(f"n{n}")[0]
            assert answer.status_code == 200 and answer.json()["model"] == "fallback-model"
        answer, seconds = post("breaker open")
        assert answer.status_code == 200 and answer.json()["message"] == "Fallback says: breaker open"
        assert seconds < 0.15 and len(agent_server.requests) == 5 and len(fallback_server.requests) == 6
        conversation_id = answer.json()["conversation_id"]
        stored = requests.get(f"{server.url}/api/alice/conversations/{conversation_id}/messages",
                              headers=headers, timeout=5).json()["messages"]
        assert [(m["role"], m.get("model")) for m in stored] == [("user", None), ("assistant", "fallback-model")]

        fallback_server.default = Raw(status=500, body=b"")
        assert_error(post("nobody")[0], 503, "agent_unavailable")
        listed = requests.get(f"{server.url}/api/alice/conversations", headers=headers, timeout=5).json()
        assert len(listed["conversations"]) == 6  # the failed turn stored nothing


def test_a_probe_that_ends_in_an_error_of_ours_lets_the_next_turn_probe():
    """Not the agent's failure (a bug, a client gone): no verdict, and the breaker is not stuck half open."""
    from chatapp.agent import GuardedAgent
    from chatapp.errors import AgentUnavailable as Unavailable

    now = [0.0]

    class Failing:
        def __init__(self):
            self.calls = 0

        def run(self, messages, model, request_id=None, deadline=None):
            self.calls += 1
            raise Unavailable(kind="timeout") if self.calls <= 2 else RuntimeError("ours")

    agent = Failing()
    guard = GuardedAgent(agent, timeout=5, breaker_failures=2, breaker_seconds=1, clock=lambda: now[0])
    for _ in range(2):
        with pytest.raises(Unavailable):
            guard.run([], "m")
    assert guard.breakers["primary"].state == "open"
    now[0] = 1.5  # half open: one probe
    with pytest.raises(RuntimeError):
        guard.run([], "m")
    assert guard.breakers["primary"].admit()  # the next turn may probe
