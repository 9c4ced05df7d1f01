"""Real concurrency: threads posting through gunicorn, two server processes sharing one database,
and a bounded stress run with retries of the same keys."""
import collections
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.support.agent import Echo
from tests.conftest import TEST_SECRET, AuthActions
from tests.support.live_server import LiveServer


@pytest.fixture
def live_env(database_uri, agent_server):
    return {
        "DATABASE_URL": database_uri,
        "JWT_SECRET_KEY": TEST_SECRET,
        "AGENT_URL": agent_server.url,
        "AGENT_TIMEOUT": "10",
        "AGENT_MAX_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "100000 per minute",  # these tests are one user's flood on purpose
    }


@pytest.fixture
def two_servers(live_env):
    """Two separate gunicorn processes over the same database, as two hosts would be."""
    with LiveServer(live_env, threads=16) as first, LiveServer(live_env, threads=16) as second:
        yield first, second


def post_all_at_once(calls, agent_server):
    """Run (url, json, headers) posts concurrently, released together by a barrier. The agent
    holds every call until all posts but one have been answered: then the outcome cannot depend
    on timing, only on whether more than one post got through to the agent."""
    barrier = threading.Barrier(len(calls))
    all_but_one_answered = threading.Event()
    agent_server.on_request = lambda _request: all_but_one_answered.wait(15)

    def post(call):
        url, body, headers = call
        with requests.Session() as session:
            barrier.wait(timeout=10)
            return session.post(url, json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(post, call) for call in calls]
        deadline = time.monotonic() + 15
        while sum(future.done() for future in futures) < len(calls) - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        all_but_one_answered.set()
        return [future.result() for future in futures]


def codes(responses):
    return sorted((response.status_code, response.json().get("code", "ok")) for response in responses)


def test_same_key_from_many_threads_calls_the_agent_once(live_env, agent_server):
    headers = {**AuthActions().headers(), "Idempotency-Key": "once"}
    with LiveServer(live_env, threads=16) as server:
        responses = post_all_at_once([(f"{server.url}/api/alice/chat", {"message": "hi"}, headers)] * 8, agent_server)
    assert codes(responses) == [(200, "ok")] + [(409, "idempotency_in_progress")] * 7
    assert len(agent_server.requests) == 1


def test_same_key_sent_to_two_processes_calls_the_agent_once(two_servers, agent_server):
    headers = {**AuthActions().headers(), "Idempotency-Key": "once"}
    responses = post_all_at_once([(f"{server.url}/api/alice/chat", {"message": "hi"}, headers) for server in two_servers], agent_server)
    assert codes(responses) == [(200, "ok"), (409, "idempotency_in_progress")]
    assert len(agent_server.requests) == 1

    # Once finished, either process replays it.
    agent_server.on_request = None
    for server in two_servers:
        replay = requests.post(f"{server.url}/api/alice/chat", json={"message": "hi"}, headers=headers, timeout=10)
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == next(r for r in responses if r.status_code == 200).content
    assert len(agent_server.requests) == 1


def test_two_turns_on_one_conversation_in_two_processes(two_servers, agent_server):
    headers = AuthActions().headers()
    first, second = two_servers
    conversation_id = requests.post(f"{first.url}/api/alice/chat", json={"message": "start"}, headers=headers, timeout=10).json()["conversation_id"]

    responses = post_all_at_once(
        [(f"{server.url}/api/alice/chat", {"message": f"via {index}", "conversation_id": conversation_id}, headers) for index, server in enumerate(two_servers)],
        agent_server,
    )

    assert codes(responses) == [(200, "ok"), (409, "conversation_busy")]
    busy = next(r for r in responses if r.status_code == 409)
    assert busy.headers["Retry-After"] == "1"
    assert len(agent_server.requests) == 2


CLIENTS, TURNS, CONVERSATIONS = 50, 20, 10
REPLAY_PROBABILITY = 0.3  # a client that lost the answer sends the same key again, later
DUPLICATE_PROBABILITY = 0.15  # an impatient client sends the same key twice at once
STRESS_SECONDS = 240


def test_stress_histories_stay_complete_alternating_and_gap_free(two_servers, agent_server, database_uri, capsys):
    agent_server.default = Echo(delay=0.002)
    headers = AuthActions().headers()
    urls = [f"{server.url}/api/alice/chat" for server in two_servers]
    conversation_ids = [
        requests.post(urls[0], json={"message": f"conversation {n}"}, headers=headers, timeout=10).json()["conversation_id"]
        for n in range(CONVERSATIONS)
    ]
    tally = collections.Counter()
    tally_lock = threading.Lock()
    failures = []
    deadline = time.monotonic() + STRESS_SECONDS

    def send(session, rng, key, body):
        response = session.post(rng.choice(urls), json=body, headers={**headers, "Idempotency-Key": key}, timeout=60)
        outcome = "replayed" if response.headers.get("Idempotent-Replayed") == "true" else str(response.status_code)
        if response.status_code != 200:
            outcome += " " + response.json()["code"]
        with tally_lock:
            tally["requests"] += 1
            tally[outcome] += 1
        return response

    def client(number):
        rng = random.Random(number)
        conversation_id = conversation_ids[number % CONVERSATIONS]
        with requests.Session() as session, requests.Session() as impatient:
            for turn in range(TURNS):
                key = f"c{number}-t{turn}"
                body = {"message": key, "conversation_id": conversation_id}
                duplicate = None
                if rng.random() < DUPLICATE_PROBABILITY:
                    duplicate = ThreadPoolExecutor(1)
                    duplicate_response = duplicate.submit(send, impatient, random.Random(), key, body)
                answer = None
                while answer is None:
                    if time.monotonic() > deadline:
                        failures.append(f"{key}: out of time")
                        return
                    response = send(session, rng, key, body)
                    if response.status_code == 200:
                        answer = response.content
                    elif response.status_code == 409:
                        time.sleep(rng.uniform(0.002, 0.02))
                    else:
                        failures.append(f"{key}: {response.status_code} {response.text}")
                        return
                if duplicate is not None:
                    other = duplicate_response.result()
                    duplicate.shutdown()
                    if not (other.status_code == 409 or other.content == answer):
                        failures.append(f"{key}: duplicate answered {other.status_code} differently")
                if rng.random() < REPLAY_PROBABILITY:
                    replay = send(session, rng, key, body)
                    if replay.content != answer or replay.headers.get("Idempotent-Replayed") != "true":
                        failures.append(f"{key}: bad replay {replay.status_code}")

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    elapsed = time.monotonic() - started
    assert failures == []

    # Each key called the agent exactly once; nothing else called it.
    agent_calls = collections.Counter(request.json["messages"][-1]["content"] for request in agent_server.requests)
    expected = {f"c{c}-t{t}" for c in range(CLIENTS) for t in range(TURNS)} | {f"conversation {n}" for n in range(CONVERSATIONS)}
    assert set(agent_calls) == expected
    assert set(agent_calls.values()) == {1}

    # Each history is complete, gap-free and alternating; each client's turns are in its order.
    engine = create_engine(database_uri)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT conversation_id, seq, role, content FROM messages ORDER BY conversation_id, seq")).all()
        keys_stored = connection.execute(text("SELECT count(*) FROM idempotency_keys WHERE response_body IS NOT NULL")).scalar()
        keys_total = connection.execute(text("SELECT count(*) FROM idempotency_keys")).scalar()
        held = connection.execute(text("SELECT count(*) FROM conversations WHERE claim_token IS NOT NULL")).scalar()
    engine.dispose()
    histories = collections.defaultdict(list)
    for conversation_id, seq, role, content in rows:
        histories[str(conversation_id)].append((seq, role, content))
    assert len(histories) == CONVERSATIONS
    for history in histories.values():
        assert [seq for seq, _, _ in history] == list(range(1, len(history) + 1))
        assert [role for _, role, _ in history] == ["user", "assistant"] * (len(history) // 2)
        for (_, _, asked), (_, _, answered) in zip(history[::2], history[1::2]):
            assert answered == f"You said: {asked}"
        for number in range(CLIENTS):
            mine = [content for _, role, content in history if role == "user" and content.startswith(f"c{number}-")]
            assert mine in ([], [f"c{number}-t{t}" for t in range(TURNS)])
    assert len(rows) == 2 * len(expected)
    assert keys_stored == keys_total == CLIENTS * TURNS
    assert held == 0

    with capsys.disabled():
        print(
            f"\nstress [{database_uri.split(':')[0]}]: {tally['requests']} requests in {elapsed:.1f} s: "
            f"{tally['200']} x 200, {tally['replayed']} x 200 replayed, "
            f"{tally['409 conversation_busy']} x 409 conversation_busy, "
            f"{tally['409 idempotency_in_progress']} x 409 idempotency_in_progress, "
            f"other {tally['requests'] - tally['200'] - tally['replayed'] - tally['409 conversation_busy'] - tally['409 idempotency_in_progress']}; "
            f"{len(agent_server.requests)} agent calls, {len(rows)} messages stored, {keys_stored} keys stored"
        )


def test_twenty_turns_near_the_budget_pass_it_by_at_most_the_turns_in_flight(live_env, agent_server, database_uri):
    """Turns already past the budget check finish, so a budget may be passed by what the turns in
    flight use, and no more; the counters stay exact under 20 concurrent upserts from two workers."""
    warm_up, concurrent, turn_tokens = 4, 20, 7  # the echo agent reports 7 tokens a turn
    env = {**live_env, "TOKEN_BUDGET": f"{warm_up * turn_tokens + 2} per day"}
    headers = AuthActions().headers()
    all_arrived = threading.Event()

    def hold_until_all_arrived(_request):  # every concurrent turn is at the agent before any is stored
        if len(agent_server.requests) >= warm_up + concurrent:
            all_arrived.set()
        all_arrived.wait(15)

    with LiveServer(env, workers=2, threads=concurrent) as server:
        url = f"{server.url}/api/alice/chat"
        for _ in range(warm_up):  # 28 of 30 tokens
            assert requests.post(url, json={"message": "warm up"}, headers=headers, timeout=10).status_code == 200
        agent_server.on_request = hold_until_all_arrived
        with ThreadPoolExecutor(concurrent) as pool:
            responses = list(pool.map(lambda n: requests.post(url, json={"message": f"turn {n}"}, headers=headers, timeout=30),
                                      range(concurrent)))
        agent_server.on_request = None
        assert [response.status_code for response in responses] == [200] * concurrent
        over = requests.post(url, json={"message": "one more"}, headers=headers, timeout=10)
        assert (over.status_code, over.json()["code"]) == (429, "quota_exceeded")
        usage = requests.get(f"{server.url}/api/alice/usage", headers=headers, timeout=10).json()

    turns = warm_up + concurrent
    assert len(agent_server.requests) == turns
    assert usage["turns"] == turns and usage["total_tokens"] == turns * turn_tokens
    assert usage["total_tokens"] - usage["budget"]["limit"] <= concurrent * turn_tokens
    engine = create_engine(database_uri)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT usage FROM messages WHERE role = 'assistant'")).scalars().all()
        counted = connection.execute(text("SELECT turns, prompt_tokens, completion_tokens, estimated_turns FROM daily_usage "
                                          "WHERE user_id = 'alice'")).one()
    engine.dispose()
    reported = [json.loads(value) for value in stored]
    assert tuple(counted) == (len(reported), sum(u["prompt_tokens"] for u in reported),
                              sum(u["completion_tokens"] for u in reported), 0) == (turns, turns * 3, turns * 4, 0)
