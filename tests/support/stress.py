"""The exactly-once stress, bounded in time: many clients, each sending its own idempotency keys as
turns of conversations they share, through one or several URLs at once (processes, or instances
behind a proxy); keys retried after a 409, sent twice at once, replayed later. Then each key called
the agent once, and every history is complete, gap-free and alternating."""
import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from sqlalchemy import create_engine, text

from tests.conftest import TEST_SECRET, AuthActions
from tests.support.agent import Echo

CLIENTS, TURNS, CONVERSATIONS = 50, 20, 10
REPLAY_PROBABILITY = 0.3  # a client that lost the answer sends the same key again, later
DUPLICATE_PROBABILITY = 0.15  # an impatient client sends the same key twice at once
STRESS_SECONDS = 240


def live_settings(database_uri: str, agent_url: str) -> dict:
    """A live server's settings for these floods of one user's turns."""
    return {
        "DATABASE_URL": database_uri,
        "JWT_SECRET_KEY": TEST_SECRET,
        "AGENT_URL": agent_url,
        "AGENT_TIMEOUT": "10",
        "AGENT_MAX_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
        "RATE_LIMIT": "100000 per minute",  # these tests are one user's flood on purpose
    }


@dataclass
class StressResult:
    tally: collections.Counter  # requests by outcome: "200", "replayed", "409 conversation_busy"...
    elapsed: float
    answers: dict[str, bytes]  # each key's first 200 answer, as sent
    agent_calls: int
    messages: int
    keys_stored: int

    def summary(self) -> str:
        tally = self.tally
        named = tally["200"] + tally["replayed"] + tally["409 conversation_busy"] + tally["409 idempotency_in_progress"]
        return (
            f"{tally['requests']} requests in {self.elapsed:.1f} s: "
            f"{tally['200']} x 200, {tally['replayed']} x 200 replayed, "
            f"{tally['409 conversation_busy']} x 409 conversation_busy, "
            f"{tally['409 idempotency_in_progress']} x 409 idempotency_in_progress, "
            f"other {tally['requests'] - named}; "
            f"{self.agent_calls} agent calls, {self.messages} messages stored, {self.keys_stored} keys stored"
        )


def run_stress(urls: list[str], agent_server, database_uri: str, *, clients: int = CLIENTS, turns: int = TURNS,
               conversations: int = CONVERSATIONS, seconds: float = STRESS_SECONDS) -> StressResult:
    """The stress against the chat endpoint at `urls` (each request to one of them at random), on
    an empty database; asserts what it must hold, and returns its figures."""
    agent_server.default = Echo(delay=0.002)
    headers = AuthActions().headers()
    conversation_ids = [
        requests.post(urls[0], json={"message": f"conversation {n}"}, headers=headers, timeout=10).json()["conversation_id"]
        for n in range(conversations)
    ]
    tally = collections.Counter()
    tally_lock = threading.Lock()
    failures = []
    answers = {}
    deadline = time.monotonic() + seconds

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
        conversation_id = conversation_ids[number % conversations]
        with requests.Session() as session, requests.Session() as impatient:
            for turn in range(turns):
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
                        answer = answers[key] = response.content
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
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.monotonic() - started
    assert failures == [], failures[:20]

    # Each key called the agent exactly once; nothing else called it.
    agent_calls = collections.Counter(request.json["messages"][-1]["content"] for request in agent_server.requests)
    expected = {f"c{c}-t{t}" for c in range(clients) for t in range(turns)} | {f"conversation {n}" for n in range(conversations)}
    assert set(agent_calls) == expected, sorted(set(agent_calls) ^ expected)[:20]
    assert set(agent_calls.values()) == {1}, [key for key, count in agent_calls.items() if count != 1][:20]

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
    assert len(histories) == conversations, len(histories)
    for conversation_id, history in histories.items():
        assert [seq for seq, _, _ in history] == list(range(1, len(history) + 1)), (conversation_id, history)
        assert [role for _, role, _ in history] == ["user", "assistant"] * (len(history) // 2), (conversation_id, history)
        for (_, _, asked), (_, _, answered) in zip(history[::2], history[1::2]):
            assert answered == f"You said: {asked}", (asked, answered)
        for number in range(clients):
            mine = [content for _, role, content in history if role == "user" and content.startswith(f"c{number}-")]
            assert mine in ([], [f"c{number}-t{t}" for t in range(turns)]), (number, mine)
    assert len(rows) == 2 * len(expected), (len(rows), len(expected))
    assert keys_stored == keys_total == clients * turns, (keys_stored, keys_total)
    assert held == 0, held
    return StressResult(tally, elapsed, answers, len(agent_server.requests), len(rows), keys_stored)
