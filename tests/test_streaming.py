"""Streaming answers (contract section 11) through gunicorn, against a streaming test agent."""
import json
import threading
import time

import pytest
import requests

from tests.support.agent import Raw, Stream, StreamEcho
from tests.conftest import TEST_SECRET, AuthActions
from tests.support.assertions import sse_events
from tests.support.live_server import LiveServer

AGENT_TIMEOUT = 1.0


@pytest.fixture
def stream_settings():
    """More settings of the server under test (a test overrides it)."""
    return {}


@pytest.fixture
def server(database_uri, agent_server, stream_settings):
    agent_server.default = StreamEcho()
    env = {
        "DATABASE_URL": database_uri,
        "JWT_SECRET_KEY": TEST_SECRET,
        "AGENT_URL": agent_server.url,
        "AGENT_TIMEOUT": str(AGENT_TIMEOUT),
        "AGENT_STREAM_TIMEOUT": "20",
        "AGENT_MAX_RETRIES": "0",
        "RATE_LIMIT": "10000 per minute",
        **stream_settings,
    }
    with LiveServer(env, threads=8) as live:
        yield live


def events(response):
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    event, data = None, []
    for line in response.iter_lines(chunk_size=1, decode_unicode=True):
        if line == "":
            if event is not None:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


def post(server, body, headers=None, stream=True):
    return requests.post(
        f"{server.url}/api/alice/chat",
        json={**body, "stream": True},
        headers={**AuthActions().headers(), **(headers or {})},
        stream=stream,
        timeout=30,
    )


def history(server, conversation_id):
    response = requests.get(
        f"{server.url}/api/alice/conversations/{conversation_id}/messages", headers=AuthActions().headers(), timeout=10
    )
    return [(m["role"], m["content"]) for m in response.json()["messages"]] if response.status_code == 200 else response.status_code


def conversation_count(server):
    response = requests.get(f"{server.url}/api/alice/conversations", headers=AuthActions().headers(), timeout=10)
    return len(response.json()["conversations"])


def test_deltas_arrive_while_the_agent_is_still_writing(server, agent_server):
    resume = threading.Event()
    agent_server.enqueue(Stream(pieces=("Hel", "lo", " world"), pause_after=1, pause_event=resume))

    with post(server, {"message": "hi"}) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Request-ID"]
        received = events(response)
        event, data = next(received)
        assert (event, json.loads(data)) == ("delta", {"content": "Hel"})
        # The agent is paused mid-answer: nothing is stored yet.
        assert not resume.is_set() and conversation_count(server) == 0
        resume.set()
        rest = list(received)

    deltas = ["Hel"] + [json.loads(data)["content"] for event, data in rest if event == "delta"]
    [(event, data)] = [item for item in rest if item[0] != "delta"]
    assert event == "done"
    done = json.loads(data)
    assert "".join(deltas) == "Hello world" == done["message"]
    assert set(done) == {"conversation_id", "message", "role", "created_at", "usage", "message_id", "model", "finish_reason"}
    assert done["finish_reason"] == "stop"
    assert history(server, done["conversation_id"]) == [("user", "hi"), ("assistant", "Hello world")]
    [agent_request] = agent_server.requests
    assert agent_request.json["stream"] is True and agent_request.json["stream_options"] == {"include_usage": True}


def test_a_streamed_turn_continues_a_conversation(server, agent_server):
    first = json.loads([data for event, data in events(post(server, {"message": "one"})) if event == "done"][0])
    response = post(server, {"message": "two", "conversation_id": first["conversation_id"]})
    [done] = [json.loads(data) for event, data in events(response) if event == "done"]
    assert done["message"] == "You said: two"
    assert history(server, first["conversation_id"]) == [
        ("user", "one"), ("assistant", "You said: one"), ("user", "two"), ("assistant", "You said: two")
    ]


def test_an_agent_failing_mid_stream_sends_error_and_stores_nothing(server, agent_server):
    agent_server.enqueue(Stream(pieces=("a", "b", "c", "d"), fail_after=2))
    received = list(events(post(server, {"message": "hi"}, headers={"Idempotency-Key": "k1"})))
    assert [event for event, _ in received] == ["delta", "delta", "error"]
    error = json.loads(received[-1][1])
    assert error["code"] == "agent_unavailable" and error["request_id"]
    assert conversation_count(server) == 0
    # The key was released: the retry runs anew.
    retried = list(events(post(server, {"message": "hi"}, headers={"Idempotency-Key": "k1"})))
    assert retried[-1][0] == "done"
    assert len(agent_server.requests) == 2


def test_a_stall_past_the_gap_deadline_ends_in_error_in_time(server, agent_server):
    agent_server.enqueue(Stream(pieces=("a", "b"), pause_after=1, pause=30))
    with post(server, {"message": "hi"}) as response:
        received = events(response)
        assert next(received)[0] == "delta"
        first_delta_at = time.monotonic()
        event, data = next(received)
        waited = time.monotonic() - first_delta_at
    assert event == "error" and json.loads(data)["code"] == "agent_unavailable"
    assert AGENT_TIMEOUT - 0.2 <= waited <= AGENT_TIMEOUT + 1.5
    assert conversation_count(server) == 0


@pytest.mark.parametrize("stream_settings", [{"STREAM_ON_DISCONNECT": "cancel"}])
def test_with_cancel_a_client_that_disconnects_ends_the_turn_and_frees_the_conversation(server, agent_server):
    conversation_id = json.loads([d for e, d in events(post(server, {"message": "one"})) if e == "done"][0])["conversation_id"]
    resume = threading.Event()
    # After the pause, many small pieces: the service meets the closed connection long before the end.
    agent_server.enqueue(Stream(pieces=("x",) * 200, interval=0.01, pause_after=1, pause_event=resume))
    response = post(server, {"message": "two", "conversation_id": conversation_id})
    received = events(response)
    assert next(received)[0] == "delta"
    busy = post(server, {"message": "meanwhile", "conversation_id": conversation_id}, stream=False)
    assert (busy.status_code, busy.json()["code"]) == (409, "conversation_busy")
    response.close()  # the client goes away mid-answer
    resume.set()

    deadline = time.monotonic() + 10
    while True:  # the service notices at its next write, then frees the conversation
        again = post(server, {"message": "three", "conversation_id": conversation_id}, stream=False)
        if again.status_code != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert again.status_code == 200
    assert [content for _, content in history(server, conversation_id)] == [
        "one", "You said: one", "three", "You said: three"
    ]


def test_a_client_that_goes_away_after_three_events_leaves_the_turn_to_finish(server, agent_server):
    resume = threading.Event()
    agent_server.enqueue(Stream(pieces=("a", "b", "c", "d", "e", "f"), pause_after=3, pause_event=resume))
    response = post(server, {"message": "tell me"}, headers={"Idempotency-Key": "k-gone"})
    received = events(response)
    assert [next(received)[0] for _ in range(3)] == ["delta"] * 3
    response.close()  # the phone lost its signal
    resume.set()
    deadline = time.monotonic() + 10
    while conversation_count(server) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    [conversation] = requests.get(f"{server.url}/api/alice/conversations", headers=AuthActions().headers(),
                                  timeout=10).json()["conversations"]
    assert history(server, conversation["conversation_id"]) == [("user", "tell me"), ("assistant", "abcdef")]
    assert len(agent_server.requests) == 1
    replay = post(server, {"message": "tell me"}, headers={"Idempotency-Key": "k-gone"})  # the client is back
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert json.loads([d for e, d in events(replay) if e == "done"][0])["message"] == "abcdef"
    assert len(agent_server.requests) == 1


def test_replaying_a_key_streams_the_stored_answer_without_the_agent(server, agent_server):
    first = list(events(post(server, {"message": "hi"}, headers={"Idempotency-Key": "again"})))
    replay_response = post(server, {"message": "hi"}, headers={"Idempotency-Key": "again"})
    assert replay_response.headers["Idempotent-Replayed"] == "true"
    replay = list(events(replay_response))
    assert len(agent_server.requests) == 1
    done = first[-1][1]
    assert [event for event, _ in replay] == ["delta", "done"]
    assert json.loads(replay[0][1]) == {"content": json.loads(done)["message"]}
    assert replay[1][1] == done
    # `stream` is not part of the request's identity: the JSON replay is the same turn.
    as_json = post(server, {"message": "hi"}, headers={"Idempotency-Key": "again"}, stream=False)
    plain = requests.post(f"{server.url}/api/alice/chat", json={"message": "hi"}, headers={**AuthActions().headers(), "Idempotency-Key": "again"}, timeout=10)
    # The same bytes, plus the line end a JSON body has and an event's data does not.
    assert plain.headers["Idempotent-Replayed"] == "true" and plain.text == done + "\n"
    as_json.close()


def test_failures_before_the_first_piece_are_plain_json_errors(server, agent_server):
    agent_server.enqueue(Raw(status=500, body=b"{}"))
    failed = post(server, {"message": "hi"}, stream=False)
    assert (failed.status_code, failed.headers["Content-Type"], failed.json()["code"]) == (503, "application/json", "agent_unavailable")
    assert failed.headers["Retry-After"]
    missing = post(server, {"message": "hi", "conversation_id": "nope"}, stream=False)
    assert (missing.status_code, missing.json()["code"]) == (404, "conversation_not_found")
    invalid = post(server, {"message": ""}, stream=False)
    assert (invalid.status_code, invalid.json()["code"]) == (400, "invalid_request")
    assert conversation_count(server) == 0


def test_the_echo_agent_streams_word_by_word(database_uri, auth):
    from chatapp.extensions import db
    from tests.conftest import make_app

    app = make_app(SQLALCHEMY_DATABASE_URI=database_uri, AGENT_URL=None)
    try:
        response = app.test_client().post(
            "/api/alice/chat", json={"message": "hello big world", "stream": True}, headers=auth.headers()
        )
        assert response.status_code == 200 and response.mimetype == "text/event-stream"
        found = sse_events(response.get_data(as_text=True))
        assert [event_id for event_id, _, _ in found] == list(range(1, len(found) + 1))
        received = [(event, json.loads(data)) for _, event, data in found]
    finally:
        with app.app_context():
            db.engine.dispose()
    deltas = [data["content"] for event, data in received if event == "delta"]
    assert len(deltas) >= 4
    assert "".join(deltas) == "Echo: hello big world" == received[-1][1]["message"]
    assert received[-1][0] == "done"
