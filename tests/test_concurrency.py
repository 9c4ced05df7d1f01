"""Real concurrency: threads posting through gunicorn, two server processes sharing one database,
and a bounded stress run with retries of the same keys."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.conftest import AuthActions
from tests.support.live_server import LiveServer
from tests.support.stress import live_settings, run_stress


@pytest.fixture
def live_env(database_uri, agent_server):
    return live_settings(database_uri, agent_server.url)


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


def test_stress_histories_stay_complete_alternating_and_gap_free(two_servers, agent_server, database_uri, capsys):
    result = run_stress([f"{server.url}/api/alice/chat" for server in two_servers], agent_server, database_uri)
    with capsys.disabled():
        print(f"\nstress [{database_uri.split(':')[0]}]: {result.summary()}")


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
