"""The agent client's streams against a real HTTP server on loopback: pieces, retries, deadlines, failures."""
import json
import threading
import time

import pytest

from chatapp.agent import AgentStream, EchoAgent, build_agent
from chatapp.errors import AgentUnavailable
from tests.conftest import app_settings
from tests.support.agent import (
    USAGE, AgentServer, Close, DripStream, Echo, Hang, Raw, Stream, StreamEcho, closed_port_url, completion_chunk, sse,
    usage_chunk,
)

API_KEY = "sk-test-secret-key-0123456789"
TIMEOUT = 0.5  # the first-token and gap deadlines
AGENT_DEADLINE = TIMEOUT  # for make_agent (conftest)
MARGIN = 0.4
MESSAGES = [{"role": "user", "content": "Hi"}]
SSE = {"Content-Type": "text/event-stream"}


@pytest.fixture
def server():
    with AgentServer() as server:
        yield server


@pytest.fixture
def agent(server, make_agent):
    return make_agent(server.url, api_key=API_KEY)


def read_all(stream: AgentStream) -> tuple[list[str], AgentUnavailable | None, float]:
    """Iterate to the end: the pieces, the error that ended it (or None), and when it ended."""
    pieces = []
    try:
        for piece in stream:
            pieces.append(piece)
    except AgentUnavailable as error:
        return pieces, error, time.monotonic()
    return pieces, None, time.monotonic()


def events(*documents) -> bytes:
    """A body of server-sent events, one per document (a dict as JSON, or a str as it is)."""
    return b"".join(sse(document) for document in documents)


# Answers


def test_pieces_usage_and_request(server, agent):
    server.enqueue(Stream(("Hel", "lo", "!")))

    with agent.stream(MESSAGES, "gpt-4", request_id="req-123") as stream:
        pieces, error, _ = read_all(stream)

    assert (pieces, error, stream.usage, stream.attempts) == (["Hel", "lo", "!"], None, USAGE, 1)
    assert stream.finish_reason == "stop"
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.json == {
        "model": "gpt-4", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
    }
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["X-Request-ID"] == "req-123"
    assert request.headers["Content-Type"] == "application/json"


def test_the_agents_finish_reason_length_is_kept(server, agent):
    server.enqueue(Stream(("Cut", " sho"), finish_reason="length"))
    with agent.stream(MESSAGES, "gpt-4") as stream:
        pieces, error, _ = read_all(stream)
    assert (pieces, error, stream.finish_reason) == (["Cut", " sho"], None, "length")


def test_no_key_sends_no_authorization_and_no_usage_is_none(server, make_agent):
    agent = make_agent(server.url + "/")
    server.enqueue(Stream(("a",), usage=None))

    pieces, error, _ = read_all(agent.stream(MESSAGES, "test-model"))

    assert (pieces, error) == (["a"], None)
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert "Authorization" not in request.headers and "X-Request-ID" not in request.headers


@pytest.mark.parametrize("behaviour", [None, StreamEcho()], ids=["default-echo", "stream-echo"])
def test_the_echo_streams_what_it_answers_whole(server, agent, behaviour):
    messages = [{"role": "user", "content": "  Grüße 🌍,  wie  geht's?\n"}]
    if behaviour is not None:
        server.default = behaviour

    pieces, error, _ = read_all(agent.stream(messages, "test-model"))

    assert error is None and len(pieces) > 2
    assert "".join(pieces) == "You said:   Grüße 🌍,  wie  geht's?\n"
    server.enqueue(Echo())
    assert agent.run(messages, "test-model").content == "".join(pieces)  # the same text, whole


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_server_sent_events_are_parsed_by_the_rules(server, agent, newline):
    body = b"\n".join([
        b": a comment, such as a keep-alive",
        b"event: message",
        b"id: 1",
        b"retry: 1000",
        b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": null}',
        b"",
        b'data:{"choices": [{"delta": {"content": "one"}}]}',  # no space after the colon
        b"",
        b'data: {"choices":',  # one event's data on several lines, joined by a newline
        b'data:  [{"delta": {"content": " two"}}]}',
        b"",
        b'data: {"choices": [{"delta": {"content": null}}]}',
        b"",
        b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}',
        b"",
        b'data: {"choices": [{"finish_reason": "stop"}]}',
        b"",
        b"",  # a blank line with no data is no event
        b"data: " + json.dumps(usage_chunk(USAGE)).encode(),
        b"",
        b"data: [DONE]",
        b"",
        b'data: {"choices": [{"delta": {"content": "after the end"}}]}',
        b"",
    ]).replace(b"\n", newline)
    server.enqueue(Raw(body=body, headers=SSE, chunked=True))

    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, _ = read_all(stream)

    assert (pieces, error, stream.usage) == (["one", " two"], None, USAGE)


def test_events_split_across_reads_are_reassembled(server, agent):
    server.enqueue(DripStream(("Grüße", " 🌍"), interval=0))

    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, _ = read_all(stream)

    assert (pieces, error, stream.usage) == (["Grüße", " 🌍"], None, USAGE)


def test_the_first_piece_is_read_before_the_agent_finishes(server, agent):
    resume = threading.Event()
    behaviour = Stream(("first", " second", " third"), pause_after=1, pause_event=resume)
    server.enqueue(behaviour)

    with agent.stream(MESSAGES, "test-model") as stream:
        first = next(stream)
        assert behaviour.sent == 1 and not behaviour.finished.is_set()
        resume.set()
        rest, error, _ = read_all(stream)

    assert ([first, *rest], error) == (["first", " second", " third"], None)
    assert behaviour.finished.wait(1) and not behaviour.disconnected.is_set()


def test_done_ends_the_stream_even_when_the_body_does_not(server, agent):
    # A Content-Length longer than the body: after [DONE] the agent sends nothing, nor ends the body.
    body = events(completion_chunk("ok"), "[DONE]")
    server.enqueue(Raw(body=body, headers={**SSE, "Content-Length": str(len(body) + 100)}))

    start = time.monotonic()
    pieces, error, ended = read_all(agent.stream(MESSAGES, "test-model"))

    assert (pieces, error) == (["ok"], None)
    assert ended - start < 0.3


def test_a_finished_stream_leaves_its_connection_pooled(server, agent):
    read_all(agent.stream(MESSAGES, "test-model"))
    read_all(agent.stream(MESSAGES, "test-model"))
    agent.run(MESSAGES, "test-model")

    assert len({request.client_port for request in server.requests}) == 1


# Before the stream: statuses and retries, as for run()


@pytest.mark.parametrize("status", [400, 401, 404, 500, 501])
def test_other_statuses_fail_from_stream_without_retry(server, agent, status):
    server.enqueue(Raw(status, b'{"error": "nope"}'))

    with pytest.raises(AgentUnavailable) as excinfo:
        agent.stream(MESSAGES, "test-model")

    error = excinfo.value
    assert (error.kind, error.attempts, error.detail) == (f"http_{status}", 1, "The agent answered with an error")
    assert len(server.requests) == 1


@pytest.mark.parametrize("behaviour", [Raw(429), Raw(502), Raw(503), Raw(504), Close()], ids=["429", "502", "503", "504", "close"])
def test_failures_before_the_stream_are_retried(server, agent, behaviour):
    server.enqueue(behaviour)

    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, _ = read_all(stream)

    assert (stream.attempts, error, "".join(pieces)) == (2, None, "You said: Hi")
    assert len(server.requests) == 2


def test_retry_after_is_honoured_within_the_first_token_deadline(server, make_agent):
    agent = make_agent(server.url, timeout=2.0)
    server.enqueue(Raw(429, headers={"Retry-After": "1"}))

    start = time.monotonic()
    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, ended = read_all(stream)

    assert (stream.attempts, error, "".join(pieces)) == (2, None, "You said: Hi")
    assert 1.0 <= ended - start < 1.0 + MARGIN


def test_retry_after_beyond_the_deadline_fails_at_once(server, agent):
    server.enqueue(Raw(503, headers={"Retry-After": "30"}))

    start = time.monotonic()
    with pytest.raises(AgentUnavailable) as excinfo:
        agent.stream(MESSAGES, "test-model")

    assert time.monotonic() - start < 0.3
    assert (excinfo.value.kind, excinfo.value.retry_after, len(server.requests)) == ("http_503", 30, 1)


def test_connection_refused_is_retried_then_fails(make_agent):
    agent = make_agent(closed_port_url(), timeout=1.0)

    with pytest.raises(AgentUnavailable) as excinfo:
        agent.stream(MESSAGES, "test-model")

    assert (excinfo.value.kind, excinfo.value.attempts) == ("connection", 3)


def test_a_declared_length_over_the_cap_fails_from_stream(server, make_agent):
    agent = make_agent(server.url, max_response_bytes=10_000)
    server.enqueue(Raw(body=b"data: ", headers={**SSE, "Content-Length": "10000001"}))

    with pytest.raises(AgentUnavailable) as excinfo:
        agent.stream(MESSAGES, "test-model")

    assert (excinfo.value.kind, len(server.requests)) == ("too_large", 1)


# Deadlines


def test_no_answer_at_all_fails_from_stream_at_the_first_token_deadline(server, agent):
    server.enqueue(Hang())

    start = time.monotonic()
    with pytest.raises(AgentUnavailable) as excinfo:
        agent.stream(MESSAGES, "test-model")

    assert TIMEOUT - 0.05 <= time.monotonic() - start < TIMEOUT + MARGIN
    assert (excinfo.value.kind, excinfo.value.detail) == ("timeout", "The agent did not answer in time")


@pytest.mark.parametrize(
    "behaviour",
    [Stream(pause_after=0, pause=10), DripStream(interval=0.2)],
    ids=["headers-then-stall", "drip"],
)
def test_the_first_piece_must_come_within_the_timeout(server, agent, behaviour):
    server.enqueue(behaviour)

    start = time.monotonic()
    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, ended = read_all(stream)

    assert (pieces, error.kind, error.attempts) == ([], "timeout", 1)
    assert TIMEOUT - 0.05 <= ended - start < TIMEOUT + MARGIN
    assert len(server.requests) == 1


def test_no_gap_between_pieces_may_exceed_the_timeout(server, agent, agent_log):
    server.enqueue(Stream(("a", "b", "c"), pause_after=2, pause=10))

    with agent.stream(MESSAGES, "test-model", request_id="req-9") as stream:
        pieces = [next(stream), next(stream)]
        second = time.monotonic()
        rest, error, ended = read_all(stream)

    assert (pieces, rest, error.kind) == (["a", "b"], [], "timeout")
    assert TIMEOUT - 0.05 <= ended - second < TIMEOUT + MARGIN
    [record] = agent_log
    assert record.getMessage() == "agent stream failed: timeout, attempt 1, after 2 pieces"
    assert record.request_id == "req-9"


def test_each_piece_restarts_the_gap_deadline(server, agent):
    # 3 pieces 0.3 s apart outlast the 0.5 s timeout, yet no gap does.
    server.enqueue(Stream(("a", "b", "c"), interval=0.3))

    pieces, error, _ = read_all(agent.stream(MESSAGES, "test-model"))

    assert (pieces, error) == (["a", "b", "c"], None)


def test_a_slow_reader_is_not_blamed_on_the_agent(server, agent):
    server.enqueue(Stream(("a", "b")))

    with agent.stream(MESSAGES, "test-model") as stream:
        first = next(stream)
        time.sleep(TIMEOUT + 0.2)  # the next piece has long arrived: no deadline is missed
        rest, error, _ = read_all(stream)

    assert ([first, *rest], error) == (["a", "b"], None)


def test_the_stream_timeout_bounds_the_whole_stream(server, make_agent):
    agent = make_agent(server.url, timeout=0.5, stream_timeout=1.0)
    server.enqueue(Stream(("x",) * 50, interval=0.2))

    start = time.monotonic()
    pieces, error, ended = read_all(agent.stream(MESSAGES, "test-model"))

    assert error.kind == "timeout"
    assert 3 <= len(pieces) <= 6
    assert 1.0 - 0.05 <= ended - start < 1.0 + MARGIN


# Failures once the stream has started: never retried


@pytest.mark.parametrize(
    "bad, kind",
    [
        (b"data: {not json\n\n", "malformed"),
        (b"data: \xff\xfe{}\n\n", "malformed"),
        (b"data: [1, 2]\n\n", "malformed"),
        (b'data: "text"\n\n', "malformed"),
        (b'data: {"choices": {"delta": {"content": "x"}}}\n\n', "malformed"),
        (b'data: {"choices": ["x"]}\n\n', "malformed"),
        (b'data: {"choices": [{"delta": "x"}]}\n\n', "malformed"),
        (b'data: {"choices": [{"delta": {"content": 42}}]}\n\n', "malformed"),
        (b'data: {"choices": [{"delta": {"content": ["x"]}}]}\n\n', "malformed"),
        (b'data: {"choices": [{"delta": {"content": "a\\u0000b"}}]}\n\n', "malformed"),
        (b'data: {"choices": [{"delta": {"content": "\\ud800 lone"}}]}\n\n', "malformed"),
        (b'data: {"choices": [], "usage": {"total_tokens": NaN}}\n\n', "malformed"),
        (b"data: " + b"[" * 100_000 + b"\n\n", "malformed"),
        (b'data: {"error": {"message": "overloaded"}}\n\ndata: [DONE]\n\n', "agent_error"),
        (b"", "malformed"),  # the body ends without [DONE]
    ],
    ids=[
        "not-json", "not-utf8", "array", "string", "choices-object", "choice-string", "delta-string",
        "number-content", "list-content", "nul", "lone-surrogate", "nan", "deeply-nested", "error-event",
        "no-done",
    ],
)
def test_bad_events_fail_after_the_pieces_before_them(server, make_agent, bad, kind):
    agent = make_agent(server.url, max_response_bytes=1_000_000)
    server.enqueue(Raw(body=events(completion_chunk("ok")) + bad, headers=SSE, chunked=True))

    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, _ = read_all(stream)

    assert (pieces, error.kind, error.attempts) == (["ok"], kind, 1)
    assert error.detail in ("The agent's answer was malformed", "The agent answered with an error")
    assert len(server.requests) == 1


def test_a_stream_cut_mid_way_fails_after_its_pieces(server, agent):
    behaviour = Stream(("Hel", "lo", "!"), fail_after=2)
    server.enqueue(behaviour)

    with agent.stream(MESSAGES, "test-model") as stream:
        pieces, error, _ = read_all(stream)

    assert (pieces, error.kind, error.detail) == (["Hel", "lo"], "connection", "The agent could not be reached")
    assert len(server.requests) == 1


def test_a_stream_that_ends_without_done_fails(server, agent):
    server.enqueue(Stream(("Hel", "lo"), done=False))

    pieces, error, _ = read_all(agent.stream(MESSAGES, "test-model"))

    assert (pieces, error.kind) == (["Hel", "lo"], "malformed")


def test_a_stream_over_the_size_cap_fails(server, make_agent):
    agent = make_agent(server.url, max_response_bytes=10_000)
    server.enqueue(Stream(("x" * 1000,) * 20))

    pieces, error, _ = read_all(agent.stream(MESSAGES, "test-model"))

    assert error.kind == "too_large"
    assert 5 <= len(pieces) < 10


def test_no_more_pieces_after_a_failure(server, agent):
    server.enqueue(Stream(("a",), fail_after=1))

    stream = agent.stream(MESSAGES, "test-model")
    assert next(stream) == "a"
    with pytest.raises(AgentUnavailable):
        next(stream)

    assert list(stream) == []
    stream.close()


# Closing


def test_close_ends_the_agent_call_at_once(server, agent):
    behaviour = Stream(("x",) * 500, interval=0.01)
    server.enqueue(behaviour)

    stream = agent.stream(MESSAGES, "test-model")
    assert [next(stream), next(stream)] == ["x", "x"]
    start = time.monotonic()
    stream.close()
    closing = time.monotonic() - start
    stream.close()

    assert closing < 0.1
    assert list(stream) == []
    assert behaviour.disconnected.wait(1) and behaviour.sent < 100
    # The cut connection is not pooled: the next call opens another.
    assert agent.run(MESSAGES, "test-model").content == "You said: Hi"
    first, second = server.requests
    assert first.client_port != second.client_port


def test_leaving_the_with_block_closes_the_stream(server, agent):
    behaviour = Stream(("x",) * 500, interval=0.01)
    server.enqueue(behaviour)

    with agent.stream(MESSAGES, "test-model") as stream:
        for _ in stream:
            break

    assert list(stream) == []
    assert behaviour.disconnected.wait(1) and behaviour.sent < 100


# Secrets


@pytest.mark.parametrize(
    "behaviour",
    [
        Raw(500, b"secret-body " + API_KEY.encode()),
        Raw(200, b"data: secret-body " + API_KEY.encode() + b"\n\n", headers=SSE, chunked=True),
        Raw(200, events({"error": {"message": "secret-body"}}), headers=SSE, chunked=True),
        Stream(pause_after=0, pause=10),
    ],
    ids=["500", "malformed", "error-event", "timeout"],
)
def test_errors_never_leak_the_url_key_or_body(server, agent, agent_log, behaviour):
    server.enqueue(behaviour)

    with pytest.raises(AgentUnavailable) as excinfo:
        with agent.stream(MESSAGES, "test-model") as stream:
            list(stream)

    error = excinfo.value
    told = [str(error), error.detail, repr(error), repr(agent), json.dumps(error.headers)]
    told += [record.getMessage() for record in agent_log]
    for secret in (server.url, "127.0.0.1", API_KEY, "secret-body"):
        assert not any(secret in text for text in told)
    assert error.__cause__ is None and error.__suppress_context__


# The echo agent and the factory


@pytest.mark.parametrize("content", ["last  words here\n", "one", "", " lead"])
def test_echo_agent_streams_its_answer_word_by_word(content):
    agent = EchoAgent()
    messages = [{"role": "user", "content": "first"}, {"role": "user", "content": content}]

    with agent.stream(messages, "any-model", request_id="r") as stream:
        pieces = list(stream)

    assert "".join(pieces) == agent.run(messages, "any-model").content
    assert all(pieces) and len(pieces) == len(("Echo: " + content).split())
    assert (stream.usage, stream.attempts) == (None, 1)
    stream.close()


def test_build_agent_passes_the_stream_timeout(server):
    agent = build_agent(app_settings(AGENT_URL=server.url, AGENT_TIMEOUT=2.0, AGENT_STREAM_TIMEOUT=12.5)).primary
    default = build_agent(app_settings(AGENT_URL=server.url)).primary
    try:
        assert (agent.timeout, agent.stream_timeout, default.stream_timeout) == (2.0, 12.5, 300.0)
        with agent.stream(MESSAGES, "test-model") as stream:
            assert "".join(stream) == "You said: Hi"
    finally:
        agent.close()
        default.close()


def test_build_agent_without_url_streams_the_echo():
    with build_agent(app_settings(AGENT_URL=None)).stream(MESSAGES, "test-model") as stream:
        assert "".join(stream) == "Echo: Hi"
