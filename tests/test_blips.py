"""A database that goes away for a moment, and a worker that dies mid-turn: the conversations and
idempotency keys their turns held are free again at once, or within the turn lease."""
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from chatapp.extensions import db
from tests.support.agent import Echo, Hang
from tests.conftest import TEST_SECRET, AuthActions, make_app
from tests.support.live_server import LiveServer
from tests.support.processes import children

LEASE = 1.0


@pytest.mark.parametrize("config_overrides", [{"TURN_LEASE_SECONDS": LEASE, "AGENT_TIMEOUT": 6 * LEASE}])
def test_a_running_turn_keeps_its_conversation_past_its_lease(app, chat, agent_server, store):
    """The lease is renewed while the turn runs: another turn cannot take the conversation over."""
    conversation_id = chat.turn("first")["conversation_id"]
    agent_server.default = Echo(delay=3 * LEASE)
    seen = threading.Event()
    agent_server.on_request = lambda _request: seen.set()
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post_with_key, app, {"message": "slow", "conversation_id": conversation_id}, "key-slow")
        assert seen.wait(5)
        time.sleep(2 * LEASE)  # twice the lease: only renewals keep it
        busy = chat.post({"message": "meanwhile", "conversation_id": conversation_id})
        assert busy.status_code == 409 and busy.get_json()["code"] == "conversation_busy"
        again = chat.post({"message": "slow", "conversation_id": conversation_id}, headers={"Idempotency-Key": "key-slow"})
        assert again.status_code == 409 and again.get_json()["code"] == "idempotency_in_progress"
        assert slow.result().status_code == 200
    assert [content for _seq, _role, content in store.messages(conversation_id)] == [
        "first", "You said: first", "slow", "You said: slow"]


def post_with_key(app, body, key):
    return app.test_client().post("/api/alice/chat", json=body,
                                  headers={**AuthActions().headers(), "Idempotency-Key": key})


def test_a_worker_killed_mid_turn_frees_its_conversation_and_key_within_the_lease(tmp_path, agent_server):
    server = LiveServer({"DATABASE_URL": f"sqlite:///{tmp_path}/lease.db", "JWT_SECRET_KEY": TEST_SECRET,
                         "AGENT_URL": agent_server.url, "TURN_LEASE_SECONDS": "2"}, workers=1, threads=4)
    assert server.run_release().returncode == 0
    headers = {**AuthActions().headers(), "Idempotency-Key": "killed-turn"}
    with server:
        conversation_id = requests.post(f"{server.url}/api/alice/chat", json={"message": "first"},
                                        headers=AuthActions().headers(), timeout=10).json()["conversation_id"]
        body = {"message": "never answered", "conversation_id": conversation_id}
        agent_server.enqueue(Hang())
        seen = threading.Event()
        agent_server.on_request = lambda _request: seen.set()
        with ThreadPoolExecutor(1) as pool:
            doomed = pool.submit(requests.post, f"{server.url}/api/alice/chat", json=body, headers=headers, timeout=30)
            assert seen.wait(10)
            [worker] = children(server.process.pid)
            os.kill(worker, signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(requests.ConnectionError):
                doomed.result()
        agent_server.on_request = None
        statuses = []
        while True:  # the same request again, as a client retries it
            answer = requests.post(f"{server.url}/api/alice/chat", json=body, headers=headers, timeout=10)
            statuses.append(answer.status_code)
            if answer.status_code == 200 or time.monotonic() - killed_at > 15:
                break
            time.sleep(0.1)
        freed_after = time.monotonic() - killed_at
    assert statuses[-1] == 200 and answer.json()["message"] == "You said: never answered"
    assert 409 in statuses  # held at first: the lease was the dead worker's
    assert freed_after < 2 + 1.5, freed_after  # within the lease (and a renewal's quarter)


@pytest.mark.parametrize("clients", [8])
def test_after_a_database_outage_every_key_is_usable_within_two_seconds(throwaway_postgres, agent_server, clients):
    """Turns in flight when PostgreSQL stops fail (503) and cannot release their claims then; the
    claims are released as soon as it is back, so that every client's retry with its key runs."""
    url = throwaway_postgres.url
    server = LiveServer({"DATABASE_URL": url.replace("postgresql+psycopg://", "postgresql://"),
                         "JWT_SECRET_KEY": TEST_SECRET, "AGENT_URL": agent_server.url,
                         "RATE_LIMIT": "100000 per minute"}, workers=2, threads=8)
    assert server.run_release().returncode == 0, server.run_release().stderr
    auth = AuthActions()
    with server:
        session = requests.Session()
        conversations = [session.post(f"{server.url}/api/alice/chat", json={"message": f"start {n}"},
                                      headers=auth.headers(), timeout=10).json()["conversation_id"] for n in range(clients)]
        agent_server.default = Echo(delay=1.0)
        arrived = threading.Semaphore(0)
        agent_server.on_request = lambda _request: arrived.release()
        back_at = {}

        def client(n):
            body = {"message": f"turn {n}", "conversation_id": conversations[n]}
            headers = {**auth.headers(), "Idempotency-Key": f"blip-{n}-{uuid.uuid4().hex}"}
            first = requests.post(f"{server.url}/api/alice/chat", json=body, headers=headers, timeout=20)
            history = [first.status_code]
            while history[-1] != 200 and time.monotonic() < back_at.get("t", float("inf")) + 10:
                time.sleep(0.05)
                answer = requests.post(f"{server.url}/api/alice/chat", json=body, headers=headers, timeout=20)
                history.append(answer.status_code)
            return history, time.monotonic()

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, n) for n in range(clients)]
            for _ in range(clients):
                assert arrived.acquire(timeout=10)  # every turn is at the agent
            throwaway_postgres.stop()
            time.sleep(1.5)  # the agent answers; storing fails
            throwaway_postgres.start()
            back_at["t"] = time.monotonic()
            results = [future.result() for future in futures]

    for history, done_at in results:
        assert history[0] == 503 and history[-1] == 200, history
        assert done_at - back_at["t"] < 2.0, (history, done_at - back_at["t"])
    app = make_app(SQLALCHEMY_DATABASE_URI=url)
    with app.app_context():
        rows = db.session.execute(db.text("SELECT conversation_id, seq, role, content FROM messages ORDER BY conversation_id, seq")).all()
        db.session.remove()
        db.engine.dispose()
    by_conversation = {}
    for conversation_id, seq, role, content in rows:
        by_conversation.setdefault(str(conversation_id), []).append((seq, role, content))
    for n, conversation_id in enumerate(conversations):
        assert by_conversation[conversation_id] == [
            (1, "user", f"start {n}"), (2, "assistant", f"You said: start {n}"),
            (3, "user", f"turn {n}"), (4, "assistant", f"You said: turn {n}")]  # once, gap-free
