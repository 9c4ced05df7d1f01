"""Idempotency keys and conversation claims (contract sections 4 and 5), in process."""
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from chatapp.extensions import db
from chatapp.models import Conversation, IdempotencyKey, utcnow
from tests.support.agent import Raw
from tests.conftest import Chat
from tests.support.assertions import assert_error


def stored_keys(store):
    db.session.expire_all()
    return db.session.execute(select(IdempotencyKey.user_id, IdempotencyKey.key).order_by(IdempotencyKey.key)).all()


@pytest.mark.parametrize("send_key", ["header", "field", "both"])
def test_replay_is_byte_for_byte_without_calling_the_agent(chat, agent_server, store, send_key):
    body = {"message": "Hello"}
    headers = {}
    if send_key in ("header", "both"):
        headers["Idempotency-Key"] = "key-1"
    if send_key in ("field", "both"):
        body["request_id"] = "key-1"

    first = chat.post(body, headers=headers)
    again = chat.post(body, headers=headers)

    assert first.status_code == again.status_code == 200
    assert again.data == first.data
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert len(agent_server.requests) == 1
    assert store.counts() == (1, 2)
    assert stored_keys(store) == [("alice", "key-1")]


def test_replay_of_a_continued_turn(chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    body = {"message": "two", "conversation_id": conversation_id}
    first = chat.post(body, headers={"Idempotency-Key": "k"})
    again = chat.post(body, headers={"Idempotency-Key": "k"})
    assert again.data == first.data and again.headers["Idempotent-Replayed"] == "true"
    assert len(agent_server.requests) == 2
    assert [seq for seq, _, _ in store.messages(conversation_id)] == [1, 2, 3, 4]


def test_the_default_model_and_an_explicit_one_are_the_same_request(chat, agent_server):
    chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})
    again = chat.post({"message": "hi", "model": "gpt-4"}, headers={"Idempotency-Key": "k"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(agent_server.requests) == 1


def test_header_and_field_must_agree(chat, agent_server, store):
    response = chat.post({"message": "hi", "request_id": "a"}, headers={"Idempotency-Key": "b"})
    body = assert_error(response, 400, "invalid_request")
    assert "request_id" in body["errors"]
    assert agent_server.requests == [] and store.counts() == (0, 0)


@pytest.mark.parametrize("key", ["has space", "k" * 256, "ключ"])
def test_invalid_idempotency_key_header(chat, agent_server, store, key):
    response = chat.post({"message": "hi"}, headers={"Idempotency-Key": key.encode().decode("latin-1")})
    body = assert_error(response, 400, "invalid_request")
    assert "Idempotency-Key" in body["errors"]
    assert agent_server.requests == [] and store.counts() == (0, 0)


@pytest.mark.parametrize(
    "changed", [{"message": "other"}, {"model": "llama3"}, {"conversation_id": str(uuid.uuid4())}], ids=["message", "model", "conversation"]
)
def test_same_key_for_a_different_request(chat, agent_server, store, changed):
    first = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})
    response = chat.post({"message": "hi", **changed}, headers={"Idempotency-Key": "k"})
    assert_error(response, 422, "idempotency_key_reused")
    assert len(agent_server.requests) == 1
    assert store.counts() == (1, 2)
    # The original is still replayable.
    assert chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"}).data == first.data


def test_same_key_while_the_first_is_in_flight(app, auth, chat, agent_server, store):
    other = Chat(app.test_client(), auth)
    seen = []
    agent_server.on_request = lambda _request: seen.append(
        other.post({"message": "hi"}, headers={"Idempotency-Key": "k"}) if not seen else None
    )

    first = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})

    assert first.status_code == 200
    assert_error(seen[0], 409, "idempotency_in_progress")
    assert seen[0].headers["Retry-After"] == "1"
    assert len(agent_server.requests) == 1
    assert store.counts() == (1, 2)


def test_keys_are_scoped_to_the_user(chat, agent_server, store):
    alice = chat.post({"message": "hi"}, user_id="alice", headers={"Idempotency-Key": "shared"})
    bob = chat.post({"message": "hi"}, user_id="bob", headers={"Idempotency-Key": "shared"})
    assert alice.status_code == bob.status_code == 200
    assert "Idempotent-Replayed" not in bob.headers
    assert alice.get_json()["conversation_id"] != bob.get_json()["conversation_id"]
    assert len(agent_server.requests) == 2
    assert stored_keys(store) == [("alice", "shared"), ("bob", "shared")]


def test_a_failed_request_keeps_no_key(chat, agent_server, store):
    agent_server.enqueue(Raw(status=500, body=b"{}"))
    assert_error(chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"}), 503, "agent_unavailable")
    assert stored_keys(store) == [] and store.counts() == (0, 0)

    retry = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert len(agent_server.requests) == 2
    assert store.counts() == (1, 2)


def test_a_request_failing_at_step_3_keeps_no_key(chat, agent_server, store):
    unknown = str(uuid.uuid4())
    response = chat.post({"message": "hi", "conversation_id": unknown}, headers={"Idempotency-Key": "k"})
    assert_error(response, 404, "conversation_not_found")
    assert stored_keys(store) == []
    # Same key, now for a good request: it runs.
    assert chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"}).status_code == 200


def test_a_busy_conversation_keeps_no_key_and_releases_nothing_of_the_other_turn(app, auth, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    other = Chat(app.test_client(), auth)
    seen = []
    agent_server.on_request = lambda _request: seen.append(
        other.post({"message": "x", "conversation_id": conversation_id}, headers={"Idempotency-Key": "k2"}) if not seen else None
    )
    assert chat.post({"message": "two", "conversation_id": conversation_id}, headers={"Idempotency-Key": "k1"}).status_code == 200
    assert_error(seen[0], 409, "conversation_busy")
    assert stored_keys(store) == [("alice", "k1")]


def insert_key(app, *, key, fingerprint="f" * 64, created_ago=0.0, locked_for=None, body=None):
    """Write a key row directly, as a crashed or an old request would have left it."""
    now = utcnow()
    with app.app_context():
        db.session.add(
            IdempotencyKey(
                user_id="alice",
                key=key,
                fingerprint=fingerprint,
                claim_token=None if body else uuid.uuid4(),
                locked_until=None if locked_for is None else now + timedelta(seconds=locked_for),
                response_body=body,
                created_at=now - timedelta(seconds=created_ago),
            )
        )
        db.session.commit()


def test_a_key_abandoned_by_a_dead_worker_is_taken_over(app, chat, agent_server, store):
    insert_key(app, key="k", created_ago=120, locked_for=-1)
    response = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})
    assert response.status_code == 200
    assert len(agent_server.requests) == 1
    assert chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"}).headers["Idempotent-Replayed"] == "true"


def test_a_key_held_within_its_deadline_is_respected(app, chat, agent_server, store):
    from chatapp.idempotency import request_fingerprint

    insert_key(app, key="k", fingerprint=request_fingerprint("hi", None, "gpt-4"), locked_for=30)
    assert_error(chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"}), 409, "idempotency_in_progress")
    assert agent_server.requests == []


@pytest.mark.parametrize("config_overrides", [{"IDEMPOTENCY_TTL": 60}])
def test_an_expired_key_runs_anew(app, chat, agent_server, store):
    from chatapp.idempotency import request_fingerprint

    insert_key(app, key="k", fingerprint=request_fingerprint("hi", None, "gpt-4"), created_ago=61, body='{"old": true}')
    response = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})
    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json()["message"] == "You said: hi"
    assert len(agent_server.requests) == 1


@pytest.mark.parametrize("config_overrides", [{"IDEMPOTENCY_TTL": 60}])
def test_purge_command_removes_only_expired_keys(app, store):
    insert_key(app, key="old", created_ago=61, body="{}")
    insert_key(app, key="fresh", created_ago=30, body="{}")
    result = app.test_cli_runner().invoke(args=["purge-idempotency-keys"])
    assert result.exit_code == 0, result.output
    assert "1" in result.output
    assert stored_keys(store) == [("alice", "fresh")]


def hold_conversation(app, conversation_id, seconds):
    """Mark a conversation as held by some turn, as a running or crashed worker leaves it."""
    with app.app_context():
        conversation = db.session.get(Conversation, uuid.UUID(conversation_id))
        conversation.claim_token = uuid.uuid4()
        conversation.claimed_until = utcnow() + timedelta(seconds=seconds)
        db.session.commit()


def test_a_conversation_claim_left_by_a_dead_worker_expires(app, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    hold_conversation(app, conversation_id, -1)
    assert chat.post({"message": "two", "conversation_id": conversation_id}).status_code == 200
    conversation = store.conversation(conversation_id)
    assert (conversation.claim_token, conversation.claimed_until, conversation.message_count) == (None, None, 4)


def test_a_live_conversation_claim_is_respected(app, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    hold_conversation(app, conversation_id, 30)
    response = chat.post({"message": "two", "conversation_id": conversation_id})
    assert_error(response, 409, "conversation_busy")
    assert response.headers["Retry-After"] == "1"
    assert len(agent_server.requests) == 1
    assert store.counts() == (1, 2)


def test_a_failed_turn_releases_its_conversation(chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    agent_server.enqueue(Raw(status=500, body=b"{}"))
    assert_error(chat.post({"message": "two", "conversation_id": conversation_id}), 503, "agent_unavailable")
    assert store.conversation(conversation_id).claim_token is None
    assert chat.post({"message": "two", "conversation_id": conversation_id}).status_code == 200


def test_turns_of_other_conversations_do_not_wait(app, auth, chat, agent_server, store):
    first = chat.turn("one")["conversation_id"]
    second = chat.turn("uno")["conversation_id"]
    other = Chat(app.test_client(), auth)
    seen = []

    def meanwhile(_request):
        if not seen:  # only during the first turn's agent call, not the nested one's
            seen.append(None)
            seen.append(other.post({"message": "dos", "conversation_id": second}))

    agent_server.on_request = meanwhile
    assert chat.post({"message": "two", "conversation_id": first}).status_code == 200
    assert seen[1].status_code == 200
    assert [seq for seq, _, _ in store.messages(second)] == [1, 2, 3, 4]


def test_statements_with_an_idempotency_key_do_not_grow_with_history(app, chat, agent_server, count_statements):
    from tests.test_chat_api import dialect, seed_history

    counts = []
    for length in (3, 300):
        conversation_id = chat.turn("start")["conversation_id"]
        seed_history(app, conversation_id, length)
        with count_statements() as counter:
            chat.post({"message": "next", "conversation_id": conversation_id}, headers={"Idempotency-Key": f"k{length}"})
        counts.append(len(counter.statements))
    # On PostgreSQL: INSERT the key; claim the conversation and read its history; store the turn
    # (conversation, key, day's usage, messages). On SQLite: INSERT key; UPDATE claim RETURNING;
    # SELECT history; UPDATE conversation; the day's usage; INSERT messages; UPDATE key.
    expected = {"postgresql": 3, "sqlite": 7}[dialect(app)]
    assert counts == [expected, expected]


def test_the_turn_and_its_key_commit_together(app, chat, agent_server, store):
    """A worker presumed dead whose key was taken over meanwhile stores nothing of its turn."""

    def take_over_the_key(_request):
        with app.app_context():
            db.session.execute(
                IdempotencyKey.__table__.update().where(IdempotencyKey.key == "k").values(claim_token=uuid.uuid4())
            )
            db.session.commit()

    agent_server.on_request = take_over_the_key
    response = chat.post({"message": "hi"}, headers={"Idempotency-Key": "k"})

    assert_error(response, 409, "idempotency_in_progress")
    assert store.counts() == (0, 0)
    [(response_body,)] = db.session.execute(select(IdempotencyKey.response_body)).all()
    assert response_body is None  # still the other holder's, untouched
