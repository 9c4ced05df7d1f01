"""The agent client against a real HTTP server on loopback: answers, retries, deadlines, caps, pooling."""
import email.utils
import json
import logging
import time

import pytest

from chatapp.agent import AgentReply, EchoAgent, OpenAIChatAgent, build_agent
from chatapp.errors import AgentUnavailable
from tests.conftest import app_settings
from tests.support.agent import USAGE, AgentServer, Close, Drip, Echo, Hang, Raw, Reply, closed_port_url, completion

API_KEY = "sk-test-secret-key-0123456789"
DEADLINE = 1.0  # the agents of make_agent (conftest) get this AGENT_DEADLINE
AGENT_DEADLINE = DEADLINE
MARGIN = 0.5
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def server():
    with AgentServer() as server:
        yield server


@pytest.fixture
def agent(server, make_agent):
    return make_agent(server.url, api_key=API_KEY)


def fail(agent, **kwargs):
    """Run the agent expecting AgentUnavailable; return the error and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(AgentUnavailable) as excinfo:
        agent.run(MESSAGES, "test-model", **kwargs)
    return excinfo.value, time.monotonic() - start


def body(document) -> bytes:
    return json.dumps(document).encode()


# Answers


def test_answer_content_usage_and_request(server, agent):
    reply = agent.run(MESSAGES, "gpt-4", request_id="req-123")

    assert reply == AgentReply("You said: Hi", USAGE, 1)
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.json == {"model": "gpt-4", "messages": MESSAGES}
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["X-Request-ID"] == "req-123"
    assert request.headers["Content-Type"] == "application/json"


def test_no_key_sends_no_authorization(server, make_agent):
    agent = make_agent(server.url + "/")  # a trailing slash is tolerated

    assert agent.run(MESSAGES, "test-model").content == "You said: Hi"
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert "Authorization" not in request.headers
    assert "X-Request-ID" not in request.headers


@pytest.mark.parametrize(
    "usage, expected",
    [(USAGE, USAGE), (None, None), ([1, 2], None), ("many", None), ({"note": "a\x00b"}, None)],
    ids=["object", "absent", "list", "string", "unstorable"],
)
def test_usage_is_passed_through_only_as_a_storable_object(server, agent, usage, expected):
    server.enqueue(Reply("ok", usage=usage))

    assert agent.run(MESSAGES, "test-model") == AgentReply("ok", expected, 1)


def test_unicode_content(server, agent):
    server.enqueue(Reply("Grüße 🌍 — 你好"))

    assert agent.run(MESSAGES, "test-model").content == "Grüße 🌍 — 你好"


def test_a_slow_agent_within_the_deadline(server, agent):
    server.enqueue(Echo(delay=0.4), Drip(interval=0.001))

    assert agent.run(MESSAGES, "test-model").content == "You said: Hi"
    assert agent.run(MESSAGES, "test-model").content == "dripped"
    assert len(server.requests) == 2


# Statuses and retries


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500, 501, 307])
def test_other_statuses_fail_without_retry(server, agent, status):
    server.enqueue(Raw(status, b'{"error": "nope"}', headers={"Location": "http://127.0.0.1:1/elsewhere"}))

    error, _ = fail(agent)

    assert len(server.requests) == 1
    assert (error.status, error.code, error.retry_after) == (503, "agent_unavailable", 1)
    assert error.headers == {"Retry-After": "1"}


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_then_success(server, agent, status):
    server.enqueue(Raw(status))

    reply = agent.run(MESSAGES, "test-model")

    assert reply == AgentReply("You said: Hi", USAGE, 2)
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "retry_after, wait",
    [("0", 0.0), ("1", 1.0), (email.utils.formatdate(time.time() - 60, usegmt=True), 0.0)],
    ids=["0", "1", "past-date"],
)
def test_retry_after_is_honoured(server, make_agent, agent_log, retry_after, wait):
    agent = make_agent(server.url, timeout=2.5)
    server.enqueue(Raw(429, headers={"Retry-After": retry_after}))

    start = time.monotonic()
    reply = agent.run(MESSAGES, "test-model")
    elapsed = time.monotonic() - start

    assert reply.attempts == 2
    assert len(server.requests) == 2
    assert wait <= elapsed < wait + MARGIN
    # The agent's wait replaces our backoff.
    [record] = agent_log
    assert record.getMessage() == f"agent call failed: http_429, attempt 1, retrying in {wait:.2f} s"


@pytest.mark.parametrize("retry_after, told", [("30", 30), ("3600", 60)])
def test_retry_after_beyond_the_deadline_fails_at_once(server, agent, retry_after, told):
    server.enqueue(Raw(503, headers={"Retry-After": retry_after}))

    error, elapsed = fail(agent)

    assert len(server.requests) == 1
    assert elapsed < 0.3
    assert error.retry_after == told
    assert error.headers["Retry-After"] == str(told)


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_retries_are_capped(server, make_agent, max_retries):
    agent = make_agent(server.url, max_retries=max_retries, timeout=3.0)
    server.default = Raw(503)

    error, _ = fail(agent)

    assert len(server.requests) == 1 + max_retries
    assert error.detail == "The agent answered with an error"


def test_backoff_stops_at_the_deadline(server, make_agent):
    # Backoffs 0.1 + 0.2 + 0.4 + 0.8 ... would outlast a 0.5 s deadline: give up rather than oversleep.
    agent = make_agent(server.url, max_retries=10, timeout=0.5)
    server.default = Raw(503)

    _, elapsed = fail(agent)

    assert elapsed < 0.5
    assert 2 <= len(server.requests) <= 3


def test_a_closed_connection_is_retried(server, agent):
    server.enqueue(Close())

    assert agent.run(MESSAGES, "test-model").attempts == 2
    assert len(server.requests) == 2


def test_connection_refused_is_retried_then_fails(make_agent, agent_log):
    agent = make_agent(closed_port_url())

    error, elapsed = fail(agent)

    assert error.detail == "The agent could not be reached"
    assert 0.3 <= elapsed < DEADLINE  # backoffs of about 0.1 and 0.2 s
    assert [record.getMessage().split(",")[0] for record in agent_log] == ["agent call failed: connection"] * 3
    assert all(record.levelno == logging.WARNING for record in agent_log)


# Deadlines


@pytest.mark.parametrize(
    "behaviour",
    [Hang(), Drip(interval=0.2), Echo(delay=5), Raw(body=b"{", headers={"Content-Length": "1000"}, delay=0.7)],
    ids=["hang", "drip", "slow", "stall-mid-body"],
)
def test_the_deadline_bounds_the_whole_call(server, agent, behaviour):
    server.default = behaviour

    error, elapsed = fail(agent)

    assert DEADLINE - 0.05 <= elapsed < DEADLINE + MARGIN
    assert len(server.requests) == 1
    assert error.detail == "The agent did not answer in time"


def test_the_deadline_includes_retries(server, make_agent):
    agent = make_agent(server.url, timeout=0.8)
    server.enqueue(Raw(503), Raw(503, headers={"Retry-After": "0"}), Drip())

    _, elapsed = fail(agent)

    assert elapsed < 0.8 + MARGIN
    assert len(server.requests) == 3


# Malformed and oversized answers


@pytest.mark.parametrize(
    "behaviour",
    [
        Raw(body=b"not json"),
        Raw(body=b"\xff\xfe{}"),
        Raw(body=b""),
        Raw(body=b"[1, 2]"),
        Raw(body=b'"text"'),
        Raw(body=b"{}"),
        Raw(body=body({"choices": []})),
        Raw(body=body({"choices": [{"message": {}}]})),
        Raw(body=body({"choices": [{"text": "legacy"}]})),
        Reply(None),
        Raw(body=body(completion(42))),
        Raw(body=body(completion(["a"]))),
        Reply("a\x00b"),
        Raw(body=b'{"choices": [{"message": {"content": "\\ud800 lone"}}]}'),
        Raw(body=b'{"choices": [{"message": {"content": "ok"}}], "usage": {"total_tokens": NaN}}'),
        Raw(body=b"[" * 100_000),
    ],
    ids=[
        "not-json", "not-utf8", "empty", "array", "string", "no-choices", "empty-choices", "no-content",
        "no-message", "null-content", "number-content", "list-content", "nul", "lone-surrogate", "nan",
        "deeply-nested",
    ],
)
def test_malformed_answers_fail_without_retry(server, agent, behaviour):
    server.enqueue(behaviour)

    error, _ = fail(agent)

    assert error.detail == "The agent's answer was malformed"
    assert len(server.requests) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_answers_over_the_size_cap_fail(server, make_agent, chunked):
    agent = make_agent(server.url, max_response_bytes=10_000)
    server.enqueue(Raw(body=body(completion("x" * 20_000)), chunked=chunked))

    error, _ = fail(agent)

    assert error.detail == "The agent's answer was too large"
    assert len(server.requests) == 1


def test_a_declared_length_over_the_cap_fails_before_reading(server, make_agent):
    # The body never comes: only the up-front Content-Length check can end this quickly.
    agent = make_agent(server.url, max_response_bytes=10_000)
    server.enqueue(Raw(body=b"{}", headers={"Content-Length": "10000001"}))

    error, elapsed = fail(agent)

    assert error.detail == "The agent's answer was too large"
    assert elapsed < 0.3
    assert len(server.requests) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_answer_of_exactly_the_cap_passes(server, make_agent, chunked):
    document = body(completion("y" * 900))
    agent = make_agent(server.url, max_response_bytes=len(document))
    server.enqueue(Raw(body=document, chunked=chunked))

    assert agent.run(MESSAGES, "test-model").content == "y" * 900


# Secrets and connections


@pytest.mark.parametrize(
    "behaviour",
    [
        Raw(500, b"secret-body " + API_KEY.encode()),
        Raw(200, b"secret-body not json"),
        Raw(503, b"secret-body", headers={"Retry-After": "99"}),
        Hang(),
    ],
    ids=["500", "malformed", "retry-after", "timeout"],
)
def test_errors_never_leak_the_url_key_or_body(server, agent, agent_log, behaviour):
    server.default = behaviour

    error, _ = fail(agent)

    told = [str(error), error.detail, repr(error), repr(agent), json.dumps(error.headers)]
    told += [record.getMessage() for record in agent_log]
    for secret in (server.url, "127.0.0.1", API_KEY, "secret-body"):
        assert not any(secret in text for text in told)
    assert error.__cause__ is None and error.__suppress_context__


def test_connections_are_pooled_and_reused(server, agent):
    agent.run(MESSAGES, "test-model")
    agent.run(MESSAGES, "test-model")

    assert len(server.requests) == 2
    assert server.requests[0].client_port == server.requests[1].client_port


def test_a_connection_cut_mid_body_is_not_reused(server, make_agent):
    agent = make_agent(server.url, max_response_bytes=10_000)
    server.enqueue(Raw(body=body(completion("x" * 50_000)), chunked=True))

    fail(agent)
    reply = agent.run(MESSAGES, "test-model")

    assert reply.content == "You said: Hi"
    first, second = server.requests
    assert first.client_port != second.client_port


# The echo agent and the factory


def test_echo_agent():
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "last"}]

    assert EchoAgent().run(messages, "any-model", request_id="r") == AgentReply("Echo: last", None, 1)


@pytest.mark.parametrize("url", [None, ""], ids=["none", "empty"])
def test_build_agent_without_url_echoes(url):
    assert isinstance(build_agent(app_settings(AGENT_URL=url)).primary, EchoAgent)


def test_build_agent_with_url(server):
    config = app_settings(AGENT_URL=server.url, AGENT_API_KEY=API_KEY, AGENT_CONNECT_TIMEOUT=0.5, AGENT_TIMEOUT=2.0,
                      AGENT_MAX_RETRIES=1, AGENT_MAX_RESPONSE_BYTES=5000)
    agent = build_agent(config).primary
    try:
        assert isinstance(agent, OpenAIChatAgent)
        assert (agent.connect_timeout, agent.timeout, agent.max_retries, agent.max_response_bytes) == (0.5, 2.0, 1, 5000)
        assert agent.run(MESSAGES, "test-model").content == "You said: Hi"
        assert server.requests[0].headers["Authorization"] == f"Bearer {API_KEY}"
    finally:
        agent.close()


def test_build_agent_defaults_are_the_configs(server):
    agent = build_agent(app_settings(AGENT_URL=server.url)).primary
    try:
        assert (agent.connect_timeout, agent.timeout, agent.max_retries, agent.max_response_bytes) == (3.0, 25.0, 2, 1048576)
        assert agent.stream_timeout == 300.0
    finally:
        agent.close()
