"""Turns that outlive their connection, through gunicorn: resuming a stream on another instance (one
database, one Redis), without Redis, keep-alives, the first-byte setting, stopping a turn from
another instance, and Redis going down mid-stream."""
import json
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import TEST_SECRET, AuthActions
from tests.support.agent import Hang, Reply, Stream
from tests.support.assertions import assert_error, sse_events
from tests.support.live_server import LiveServer

AGENT_TIMEOUT = 2.0


@pytest.fixture
def settings(database_uri, agent_server):
    return {"DATABASE_URL": database_uri, "JWT_SECRET_KEY": TEST_SECRET, "AGENT_URL": agent_server.url,
            "AGENT_TIMEOUT": str(AGENT_TIMEOUT), "AGENT_STREAM_TIMEOUT": "20", "AGENT_MAX_RETRIES": "0",
            "RATE_LIMIT": "100000 per minute", "STREAM_KEEPALIVE_SECONDS": "0.2"}


@pytest.fixture
def two_instances(settings, redis_url):
    """Two instances, as on two hosts: one database, one Redis."""
    with LiveServer({**settings, "REDIS_URL": redis_url}) as first, LiveServer({**settings, "REDIS_URL": redis_url}) as second:
        yield first, second


HEADERS = AuthActions().headers()


def post(server, body, key=None, last_event_id=None, stream=True, timeout=30):
    headers = dict(HEADERS)
    if key:
        headers["Idempotency-Key"] = key
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return requests.post(f"{server.url}/api/alice/chat", json={**body, "stream": stream}, headers=headers,
                         stream=stream, timeout=timeout)


def read_events(response, count=None):
    """(id, event, data) of each event as it arrives, the next `count` only when given. One reader a
    response: closing a chunked body's reader mid-way would close the connection."""
    if not hasattr(response, "event_blocks"):
        response.event_blocks = _blocks(response)
    found = []
    for block in response.event_blocks:
        found += sse_events(block)
        if count is not None and len(found) >= count:
            break
    return found


def _blocks(response):
    buffer = ""
    for chunk in response.iter_content(chunk_size=None, decode_unicode=True):
        buffer += chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block + "\n\n"


def history(server, conversation_id):
    answer = requests.get(f"{server.url}/api/alice/conversations/{conversation_id}/messages", headers=HEADERS, timeout=10)
    return answer.json()["messages"]


def conversations(server):
    return requests.get(f"{server.url}/api/alice/conversations", headers=HEADERS, timeout=10).json()["conversations"]


def deltas(found):
    return "".join(json.loads(data)["content"] for _, event, data in found if event == "delta")


# Resuming -------------------------------------------------------------------------------------


def test_resume_on_the_other_instance_while_the_agent_writes(two_instances, agent_server):
    first, second = two_instances
    resume = threading.Event()
    pieces = tuple(f"p{n} " for n in range(8))
    agent_server.enqueue(Stream(pieces=pieces, pause_after=3, pause_event=resume))
    key = f"k-{uuid.uuid4()}"
    lost = post(first, {"message": "a long answer"}, key=key)
    seen = read_events(lost, 3)
    assert [(event_id, event) for event_id, event, _ in seen] == [(1, "delta"), (2, "delta"), (3, "delta")]
    lost.close()  # the phone lost its signal; it comes back through the other instance

    resumed = post(second, {"message": "a long answer"}, key=key, last_event_id=3)
    assert resumed.status_code == 200 and "Idempotent-Replayed" not in resumed.headers
    threading.Timer(0.3, resume.set).start()  # the agent goes on writing while the client is back
    rest = read_events(resumed)
    assert [event_id for event_id, _, _ in rest] == list(range(4, 4 + len(pieces) - 3 + 1))
    assert rest[-1][1] == "done"
    done = json.loads(rest[-1][2])
    assert deltas(seen) + deltas(rest) == "".join(pieces) == done["message"]
    assert history(second, done["conversation_id"])[-1]["content"] == "".join(pieces)
    assert len(agent_server.requests) == 1


@pytest.mark.parametrize("settings_extra", [{"STREAM_RESUME_SECONDS": "1"}])
def test_resume_after_the_end_gets_the_events_after_n_then_the_replay(settings, settings_extra, redis_url, agent_server):
    with LiveServer({**settings, **settings_extra, "REDIS_URL": redis_url}) as server:
        agent_server.enqueue(Stream(pieces=("a", "b", "c", "d")))
        key = f"k-{uuid.uuid4()}"
        whole = read_events(post(server, {"message": "hi"}, key=key))
        assert [event for _, event, _ in whole] == ["delta"] * 4 + ["done"]

        after = post(server, {"message": "hi"}, key=key, last_event_id=3)
        assert "Idempotent-Replayed" not in after.headers
        assert [(event_id, event) for event_id, event, _ in read_events(after)] == [(4, "delta"), (5, "done")]

        time.sleep(1.3)  # past STREAM_RESUME_SECONDS
        replay = post(server, {"message": "hi"}, key=key, last_event_id=3)
        assert replay.headers["Idempotent-Replayed"] == "true"
        found = read_events(replay)
        assert [(event_id, event) for event_id, event, _ in found] == [(1, "delta"), (2, "done")]
        assert deltas(found) == "abcd"
    assert len(agent_server.requests) == 1


def test_without_redis_a_resume_waits_for_the_end_and_gets_the_replay(settings, agent_server):
    resume = threading.Event()
    agent_server.enqueue(Stream(pieces=("x", "y", "z"), pause_after=1, pause_event=resume))
    key = f"k-{uuid.uuid4()}"
    with LiveServer(settings) as server:
        lost = post(server, {"message": "hi"}, key=key)
        assert read_events(lost, 1)[0][:2] == (1, "delta")
        lost.close()
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: post(server, {"message": "hi"}, key=key, last_event_id=1))
            time.sleep(0.5)
            assert not waiting.done()  # it waits for the turn's end
            resume.set()
            replay = waiting.result(timeout=10)
        assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
        found = read_events(replay)
        assert [(event_id, event) for event_id, event, _ in found] == [(1, "delta"), (2, "done")]
        assert deltas(found) == "xyz"
        blocking = post(server, {"message": "hi"}, key=key, stream=False)
        assert blocking.json()["message"] == "xyz"
    assert len(agent_server.requests) == 1


def test_a_bad_last_event_id_is_400(settings):
    with LiveServer(settings) as server:
        answer = post(server, {"message": "hi"}, key="k-bad", last_event_id="three")
        body = assert_error(answer, 400, "invalid_request")
        assert "Last-Event-ID" in body["errors"]


# Keep-alives and the first byte ----------------------------------------------------------------


def test_keep_alives_while_the_agent_pauses(settings, agent_server):
    agent_server.enqueue(Stream(pieces=("before", " after"), pause_after=1, pause=1.0))
    with LiveServer(settings) as server:
        text = post(server, {"message": "hi"}).text
    comments = [line for line in text.split("\n") if line.startswith(":")]
    assert len(comments) >= 3 and set(comments) == {": keep-alive"}  # every 0.2 s of the 1 s pause
    assert text.index("before") < text.index(": keep-alive") < text.index(" after")


@pytest.mark.parametrize("settings_extra", [{"STREAM_FIRST_BYTE_SECONDS": "0.3"}])
def test_the_first_byte_setting_answers_in_time_and_reports_a_later_failure(settings, settings_extra, agent_server):
    agent_server.enqueue(Hang())  # no first piece: the agent's deadline passes
    with LiveServer({**settings, **settings_extra}) as server:
        started = time.monotonic()
        response = post(server, {"message": "hi"})
        assert response.status_code == 200 and time.monotonic() - started < 1.0  # before AGENT_TIMEOUT
        text = response.text
        assert ": keep-alive" in text
        [(event_id, event, data)] = sse_events(text)
        assert (event_id, event, json.loads(data)["code"]) == (1, "error", "agent_unavailable")
        assert conversations(server) == []


def test_the_agents_length_comes_back_and_is_stored(settings, agent_server):
    agent_server.enqueue(Stream(pieces=("cut", " sho"), finish_reason="length"))
    with LiveServer(settings) as server:
        found = read_events(post(server, {"message": "hi"}))
        done = json.loads(found[-1][2])
        assert done["finish_reason"] == "length"
        assert history(server, done["conversation_id"])[-1]["finish_reason"] == "length"


# Stop ------------------------------------------------------------------------------------------


def stop(server, conversation_id, user_id="alice", headers=None):
    return requests.post(f"{server.url}/api/{user_id}/conversations/{conversation_id}/stop",
                         headers=headers or HEADERS, timeout=10)


def start_conversation(server):
    return json.loads(read_events(post(server, {"message": "start"}))[-1][2])["conversation_id"]


def test_stop_from_the_other_instance_keeps_what_a_stream_received(two_instances, agent_server):
    first, second = two_instances
    conversation_id = start_conversation(first)
    agent_server.enqueue(Stream(pieces=tuple(f"w{n} " for n in range(10)), pause_after=5, pause=30))
    response = post(first, {"message": "go on", "conversation_id": conversation_id})
    seen = read_events(response, 5)
    started = time.monotonic()
    stopped = stop(second, conversation_id)
    assert stopped.status_code == 200 and time.monotonic() - started < 1.5
    assert stopped.json() == {"conversation_id": conversation_id, "stopped": True}
    rest = read_events(response)
    assert [event for _, event, _ in rest] == ["done"]
    done = json.loads(rest[0][2])
    assert (done["finish_reason"], done["message"]) == ("stopped", deltas(seen)) and deltas(seen) == "w0 w1 w2 w3 w4 "
    assert history(second, conversation_id)[-1]["content"] == "w0 w1 w2 w3 w4 "
    next_turn = post(second, {"message": "next", "conversation_id": conversation_id}, stream=False)
    assert next_turn.status_code == 200  # at once: the conversation is free


def test_stop_ends_a_blocking_turn_with_409_and_stores_nothing(two_instances, agent_server):
    first, second = two_instances
    conversation_id = start_conversation(first)
    agent_server.default = Hang()
    with ThreadPoolExecutor(1) as pool:
        blocking = pool.submit(lambda: post(first, {"message": "slow", "conversation_id": conversation_id},
                                            key=f"k-{uuid.uuid4()}", stream=False))
        while len(agent_server.requests) < 2:
            time.sleep(0.02)
        time.sleep(0.3)  # older than a poll
        started = time.monotonic()
        assert stop(second, conversation_id).status_code == 200
        answer = blocking.result(timeout=5)
        assert time.monotonic() - started < 1.5  # not the agent's 2 s deadline
    assert_error(answer, 409, "turn_stopped")
    assert len(history(second, conversation_id)) == 2  # the first turn's two messages only
    agent_server.default = Reply("fine")
    assert post(second, {"message": "next", "conversation_id": conversation_id}, stream=False).status_code == 200


def test_stop_with_nothing_in_flight_and_on_another_users_conversation(settings, agent_server):
    with LiveServer(settings) as server:
        conversation_id = start_conversation(server)
        assert_error(stop(server, conversation_id), 409, "no_turn_in_progress")
        assert_error(stop(server, str(uuid.uuid4())), 404, "conversation_not_found")
        assert_error(stop(server, conversation_id, user_id="bob", headers=AuthActions().headers("bob")),
                     404, "conversation_not_found")
        assert_error(stop(server, conversation_id, user_id="bob"), 403, "forbidden")


def test_a_stop_racing_the_turns_end_leaves_a_whole_turn_or_the_stopped_one(settings, agent_server):
    rng = random.Random(16)
    with LiveServer(settings, threads=8) as server:
        conversation_id = start_conversation(server)
        for n in range(12):
            agent_server.enqueue(Stream(pieces=("one ", "two ", "three"), interval=0.1))
            response = post(server, {"message": f"m{n}", "conversation_id": conversation_id})
            time.sleep(rng.uniform(0.25, 0.6))  # the poll sees turns older than 0.25 s; they end at about 0.3 s
            stop(server, conversation_id)
            found = read_events(response)
            assert found[-1][1] in ("done", "error")
        messages = history(server, conversation_id)
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    for user, answer in zip(messages[2::2], messages[3::2]):
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert (answer["content"], answer["finish_reason"]) == ("one two three", "stop") or \
            answer["finish_reason"] == "stopped" and "one two three".startswith(answer["content"])


# Redis going down -----------------------------------------------------------------------------


def test_redis_stopped_mid_stream_the_stream_completes_and_the_turn_is_stored(settings, own_redis, agent_server):
    resume = threading.Event()
    agent_server.enqueue(Stream(pieces=("a", "b", "c", "d"), pause_after=2, pause_event=resume))
    with LiveServer({**settings, "REDIS_URL": own_redis.url}) as server:
        response = post(server, {"message": "hi"}, key=f"k-{uuid.uuid4()}")
        seen = read_events(response, 2)
        own_redis.kill()
        resume.set()
        rest = read_events(response)
        assert rest[-1][1] == "done"
        done = json.loads(rest[-1][2])
        assert deltas(seen) + deltas(rest) == "abcd" == done["message"]
        assert history(server, done["conversation_id"])[-1]["content"] == "abcd"
