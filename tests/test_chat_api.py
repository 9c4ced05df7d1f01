"""The chat endpoint from the outside: the happy path, the context sent to the agent, every error row."""
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from chatapp.extensions import db
from tests.support.agent import Reply
from tests.conftest import Chat, through_a_pooler
from tests.support.assertions import assert_error


def test_new_conversation(chat, agent_server, store):
    agent_server.enqueue(Reply("Hello! How can I help?", usage={"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}))

    response = chat.post({"message": "Hi there"})

    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["conversation_id", "message", "role", "created_at", "usage", "message_id", "model", "finish_reason"]
    assert body["finish_reason"] == "stop"
    assert body["message"] == "Hello! How can I help?"
    assert body["role"] == "assistant"
    assert body["model"] == "gpt-4"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    created_at = datetime.fromisoformat(body["created_at"])
    assert created_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created_at) < timedelta(seconds=30)
    uuid.UUID(body["conversation_id"]), uuid.UUID(body["message_id"])
    assert response.headers["X-Request-ID"]

    [agent_request] = agent_server.requests
    assert agent_request.path == "/v1/chat/completions"
    assert agent_request.json == {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi there"}]}
    assert agent_request.headers["X-Request-ID"] == response.headers["X-Request-ID"]

    assert store.counts() == (1, 2)
    assert store.messages(body["conversation_id"]) == [(1, "user", "Hi there"), (2, "assistant", "Hello! How can I help?")]
    conversation = store.conversation(body["conversation_id"])
    assert (conversation.user_id, conversation.title, conversation.message_count) == ("alice", "Hi there", 2)


@pytest.mark.parametrize("agent_says, kept", [("length", "length"), ("stop", "stop"), ("content_filter", "stop"), (None, "stop")])
def test_finish_reason_comes_from_the_agent_and_is_stored(chat, agent_server, agent_says, kept, client, auth):
    agent_server.enqueue(Reply("Cut sho", finish_reason=agent_says))
    body = chat.turn("Write me a long story")
    assert body["finish_reason"] == kept
    stored = client.get(f"/api/alice/conversations/{body['conversation_id']}/messages", headers=auth.headers()).get_json()
    assert [m.get("finish_reason") for m in stored["messages"]] == [None, kept]


def test_continued_conversation_sends_history(chat, agent_server, store):
    first = chat.turn("My name is Ada.")
    second = chat.turn("What is my name?", conversation_id=first["conversation_id"])

    assert second["conversation_id"] == first["conversation_id"]
    assert agent_server.requests[1].json["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "You said: My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert store.counts() == (1, 4)
    assert [seq for seq, _, _ in store.messages(first["conversation_id"])] == [1, 2, 3, 4]
    assert store.conversation(first["conversation_id"]).message_count == 4


def test_conversation_id_is_case_insensitive(chat, agent_server, store):
    first = chat.turn("one")
    chat.turn("two", conversation_id=first["conversation_id"].upper())
    assert store.counts() == (1, 4)


def test_model_is_passed_to_the_agent(chat, agent_server):
    response = chat.post({"message": "hi", "model": "llama3"})
    assert response.status_code == 200
    assert response.get_json()["model"] == "llama3"
    assert agent_server.requests[0].json["model"] == "llama3"


def test_null_optional_fields_mean_defaults(chat, agent_server, store):
    response = chat.post({"message": "hi", "conversation_id": None, "model": None, "request_id": None})
    assert response.status_code == 200
    assert response.get_json()["model"] == "gpt-4"
    assert store.counts() == (1, 2)


@pytest.mark.parametrize("config_overrides", [{"ALLOWED_MODELS": ["gpt-4", "llama3"]}])
def test_allowed_models(chat, agent_server, store):
    assert chat.post({"message": "hi", "model": "llama3"}).status_code == 200
    body = assert_error(chat.post({"message": "hi", "model": "gpt-5"}), 400, "invalid_request")
    assert "model" in body["errors"]
    assert len(agent_server.requests) == 1
    assert store.counts() == (1, 2)


@pytest.mark.parametrize("config_overrides", [{"AGENT_SYSTEM_PROMPT": "You are terse."}])
def test_system_prompt_leads_the_context(chat, agent_server):
    first = chat.turn("hi")
    chat.turn("again", conversation_id=first["conversation_id"])
    assert [m["role"] for m in agent_server.requests[1].json["messages"]] == ["system", "user", "assistant", "user"]
    assert agent_server.requests[1].json["messages"][0] == {"role": "system", "content": "You are terse."}


@pytest.mark.parametrize("config_overrides", [{"CONTEXT_MAX_MESSAGES": 3}])
def test_context_keeps_the_latest_messages(chat, agent_server):
    conversation_id = chat.turn("m1")["conversation_id"]
    chat.turn("m3", conversation_id=conversation_id)
    chat.turn("m5", conversation_id=conversation_id)
    # History m1 a2 m3 a4 (a = the agent's answers): the latest three, oldest first, may start with an answer.
    assert agent_server.requests[2].json["messages"] == [
        {"role": "assistant", "content": "You said: m1"},
        {"role": "user", "content": "m3"},
        {"role": "assistant", "content": "You said: m3"},
        {"role": "user", "content": "m5"},
    ]


@pytest.mark.parametrize("config_overrides", [{"CONTEXT_MAX_CHARS": 25, "AGENT_SYSTEM_PROMPT": "not counted at all"}])
def test_context_drops_the_oldest_past_the_character_budget(chat, agent_server):
    agent_server.enqueue(Reply("0123456789"), Reply("abcdefghij"), Reply("ok"))
    conversation_id = chat.turn("first message")["conversation_id"]  # 13 characters
    chat.turn("12345", conversation_id=conversation_id)  # history 13 + 10: fits in 25
    chat.turn("a much longer new message is not counted", conversation_id=conversation_id)
    # The latest four are 13 + 10 + 5 + 10 = 38 characters: the oldest goes, 25 remain.
    assert agent_server.requests[2].json["messages"] == [
        {"role": "system", "content": "not counted at all"},
        {"role": "assistant", "content": "0123456789"},
        {"role": "user", "content": "12345"},
        {"role": "assistant", "content": "abcdefghij"},
        {"role": "user", "content": "a much longer new message is not counted"},
    ]


def test_unicode_round_trips(chat, agent_server, store):
    agent_server.enqueue(Reply("Grüße 🌍 — 你好"))
    body = chat.turn("héllo 👋 \u2028 mixed")
    assert body["message"] == "Grüße 🌍 — 你好"
    assert store.messages(body["conversation_id"]) == [(1, "user", "héllo 👋 \u2028 mixed"), (2, "assistant", "Grüße 🌍 — 你好")]


def test_message_of_exactly_the_maximum_length(chat, agent_server, store):
    body = chat.turn("x" * 10_000)
    assert store.messages(body["conversation_id"])[0][2] == "x" * 10_000


def test_bearer_scheme_is_case_insensitive(client, auth, agent_server):
    response = client.post(
        "/api/alice/chat", json={"message": "hi"}, headers={"Authorization": "bearer " + auth.token()}
    )
    assert response.status_code == 200


def test_user_ids_with_unusual_characters(chat, agent_server, store):
    user_id = "user@example.com+émile ü"
    body = chat.turn("hi", user_id=user_id)
    assert store.conversation(body["conversation_id"]).user_id == user_id


def test_no_database_connection_is_held_while_the_agent_works(app, chat, agent_server):
    with app.app_context():
        engine = db.engine
    seen = []
    agent_server.on_request = lambda _request: seen.append(engine.pool.checkedout())
    conversation_id = chat.turn("one")["conversation_id"]
    chat.turn("two", conversation_id=conversation_id)
    assert seen == [0, 0]


def count_pings(app, monkeypatch):
    """The pings of pooled connections at checkout, counted (PostgreSQL only: SQLite has none)."""
    with app.app_context():
        engine = db.engine
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite connections are never pinged")
    pings = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(1) or real_ping(connection))
    return engine, pings


def test_a_connection_used_a_moment_ago_is_not_pinged(app, chat, monkeypatch):
    _engine, pings = count_pings(app, monkeypatch)
    conversation_id = chat.turn("one")["conversation_id"]
    chat.turn("two", conversation_id=conversation_id)
    chat.turn("three", conversation_id=conversation_id)
    assert pings == []


@pytest.mark.parametrize("config_overrides", [{"DATABASE_PING_AFTER_IDLE": 0.05}])
def test_a_connection_that_died_while_idle_is_replaced_before_the_turn_uses_it(app, chat, store, monkeypatch):
    engine, pings = count_pings(app, monkeypatch)
    if through_a_pooler():
        pytest.skip("through a pooler, the server's connections are the pooler's: the app's never die with them")
    conversation_id = chat.turn("before")["conversation_id"]
    # The pool's connections die while idle (as in a database restart), killed from outside it.
    with psycopg.connect(engine.url.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert killed >= 1
    time.sleep(0.1)  # idle past DATABASE_PING_AFTER_IDLE

    assert chat.turn("after", conversation_id=conversation_id)["conversation_id"] == conversation_id
    assert pings  # the dead connection was found at checkout, not by the turn's first statement
    assert [m.content for m in store.messages(conversation_id)] == ["before", "You said: before", "after", "You said: after"]


@pytest.mark.parametrize("history_length", [3, 300])
def test_statements_per_turn_do_not_grow_with_history(app, chat, agent_server, count_statements, history_length, store):
    conversation_id = chat.turn("start")["conversation_id"]
    seed_history(app, conversation_id, history_length)
    with count_statements() as counter:
        chat.turn("next", conversation_id=conversation_id)
    assert len(counter.statements) == EXPECTED_STATEMENTS_PER_CONTINUED_TURN[dialect(app)], counter.statements
    assert len(agent_server.requests[-1].json["messages"]) == min(history_length, 50) + 1


# On PostgreSQL, the claim with the history, then the turn stored whole (the message count, the
# day's usage, both messages): tests/test_round_trips.py counts them on the wire. On SQLite: UPDATE
# (claim) the conversation, SELECT its history, UPDATE its message count, upsert the day's usage,
# INSERT both messages.
EXPECTED_STATEMENTS_PER_CONTINUED_TURN = {"postgresql": 2, "sqlite": 5}


def dialect(app) -> str:
    """The app's database: postgresql or sqlite."""
    return app.config["SQLALCHEMY_DATABASE_URI"].split(":", 1)[0].split("+", 1)[0]


def seed_history(app, conversation_id, length):
    """Grow a conversation to `length` messages directly in the database."""
    from chatapp.models import Conversation, Message

    with app.app_context():
        conversation = db.session.get(Conversation, uuid.UUID(conversation_id))
        start = conversation.message_count
        db.session.add_all(
            Message(
                conversation_id=conversation.id,
                seq=seq,
                role="user" if seq % 2 else "assistant",
                content=f"message {seq}",
            )
            for seq in range(start + 1, length + 1)
        )
        conversation.message_count = max(length, start)
        db.session.commit()


def test_a_second_turn_while_the_first_is_in_flight_is_busy(app, auth, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    second_turns = []
    other_client = Chat(app.test_client(), auth)  # another client, in the agent's thread
    # While the agent works on the first turn, a second turn arrives on the same conversation.
    agent_server.on_request = lambda _request: second_turns.append(
        other_client.post({"message": "meanwhile", "conversation_id": conversation_id}) if not second_turns else None
    )

    first = chat.post({"message": "two", "conversation_id": conversation_id})

    assert first.status_code == 200
    [busy] = [response for response in second_turns if response is not None]
    assert_error(busy, 409, "conversation_busy")
    assert busy.headers["Retry-After"] == "1"
    assert store.messages(conversation_id) == [
        (1, "user", "one"), (2, "assistant", "You said: one"), (3, "user", "two"), (4, "assistant", "You said: two")
    ]
    assert len(agent_server.requests) == 2
    # The claim is released: the next turn goes through.
    chat.turn("three", conversation_id=conversation_id)


def test_a_writer_bypassing_the_claim_still_cannot_interleave(app, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    # While the agent works, rows appear that took the next sequence numbers without a claim.
    agent_server.on_request = lambda _request: seed_history(app, conversation_id, 4)

    response = chat.post({"message": "two", "conversation_id": conversation_id})

    assert_error(response, 409, "conversation_busy")
    assert [content for _, _, content in store.messages(conversation_id)] == ["one", "You said: one", "message 3", "message 4"]
    assert store.conversation(conversation_id).claim_token is None
