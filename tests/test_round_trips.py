"""What a turn costs PostgreSQL in round trips, counted on the wire (tests/support/wire.py): the
claim and the history in one statement before the agent, the whole turn stored in one after it,
each its own transaction, with no BEGIN or COMMIT of their own."""
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from chatapp.extensions import db
from chatapp.models import Message
from tests.support.wire import RoundTripCounter
from tests.conftest import Chat
from tests.test_chat_api import seed_history

pytestmark = pytest.mark.parametrize("database_uri", ["postgresql"], indirect=True)


@pytest.fixture
def wire(database_uri):
    counter = RoundTripCounter(database_uri)
    yield counter
    counter.close()


@pytest.fixture
def config_overrides(wire):
    # No ping at checkout however slow the machine: a ping is a round trip of its own.
    return {"SQLALCHEMY_DATABASE_URI": wire.url_through, "DATABASE_PING_AFTER_IDLE": 3600.0}


def counted(wire, turn):
    wire.reset()
    result = turn()
    return result, list(wire.kinds)


def test_a_new_conversation_is_one_round_trip_and_a_continued_turn_two(app, chat, wire, agent_server):
    chat.turn("warm the pool")
    started, kinds = counted(wire, lambda: chat.turn("start"))
    assert kinds == ["sync"]  # conversation, both messages and the day's usage: one statement, no BEGIN/COMMIT
    conversation_id = started["conversation_id"]
    _, kinds = counted(wire, lambda: chat.turn("next", conversation_id=conversation_id))
    assert kinds == ["sync", "sync"]
    seed_history(app, conversation_id, 300)
    _, kinds = counted(wire, lambda: chat.turn("after 300", conversation_id=conversation_id))
    assert kinds == ["sync", "sync"]
    assert len(agent_server.requests[-1].json["messages"]) == 51  # the history window was read: 50 and the message


def test_a_key_adds_its_claim(app, chat, wire):
    conversation_id = chat.turn("start")["conversation_id"]
    _, kinds = counted(wire, lambda: chat.turn("keyed", conversation_id=conversation_id, headers={"Idempotency-Key": "k1"}))
    assert kinds == ["sync", "sync", "sync"], kinds  # the key's INSERT, then the turn's two


def test_the_history_is_read_again_when_the_claim_waited_for_a_turn_being_stored(app, chat, auth, agent_server, database_uri):
    """A claim that waits for the row lock of a turn storing its messages sees that turn's claim
    released, while its statement's snapshot, taken before, does not see the messages: the history
    must be read again, or the agent would answer without the last turn."""
    conversation_id = chat.turn("first")["conversation_id"]
    engine = create_engine(database_uri)
    storing = engine.connect()
    storing.begin()
    storing.execute(text("UPDATE conversations SET message_count = 4, updated_at = now() WHERE id = :id"), {"id": conversation_id})
    for seq, role, content in [(3, "user", "second"), (4, "assistant", "answer to second")]:
        storing.execute(text("INSERT INTO messages (id, conversation_id, seq, role, content, created_at) "
                             "VALUES (:id, :conversation_id, :seq, :role, :content, now())"),
                        {"id": uuid.uuid4(), "conversation_id": conversation_id, "seq": seq, "role": role, "content": content})
    answers = []
    client = Chat(app.test_client(), auth)
    turn = threading.Thread(target=lambda: answers.append(client.post({"message": "third", "conversation_id": conversation_id})))
    turn.start()
    try:
        with engine.connect() as watcher:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not watcher.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    "AND query LIKE 'WITH claimed AS%'")):
                time.sleep(0.01)
            assert time.monotonic() < deadline, "the claim never waited for the storing turn"
    finally:
        storing.commit()
        storing.close()
        turn.join(10)
        engine.dispose()
    assert answers[0].status_code == 200, answers[0].get_json()
    sent = [message["content"] for message in agent_server.requests[-1].json["messages"]]
    assert sent[-5:] == ["first", "You said: first", "second", "answer to second", "third"], sent
    with app.app_context():
        seqs = [(m.seq, m.role) for m in db.session.query(Message).filter_by(conversation_id=uuid.UUID(conversation_id)).order_by(Message.seq)]
    assert seqs == [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant"), (5, "user"), (6, "assistant")]


def test_the_claim_commits_without_waiting_for_the_disk_and_the_setting_ends_with_it(app, chat, database_uri):
    """A claim need not outlive a crash of the database: its statement turns synchronous_commit off
    for its own transaction only, so that the next transaction on that (pooled, perhaps shared
    through PgBouncer) server connection commits durably again."""
    from chatapp import queries
    from datetime import datetime, timedelta, timezone

    conversation_id = uuid.UUID(chat.turn("first")["conversation_id"])
    now = datetime.now(timezone.utc)
    with app.app_context(), db.engine.connect() as connection:
        rows = connection.execute(queries._CLAIM_WITH_HISTORY, {
            "conversation_id": conversation_id, "owner": "alice", "now": now, "new_token": uuid.uuid4(),
            "until": now + timedelta(seconds=5), "max_messages": 50, "max_chars": 10000}).all()
        assert [(role, content) for _, _, role, content in rows] == [("user", "first"), ("assistant", "You said: first")]
        assert connection.scalar(text("SHOW synchronous_commit")) == "off"  # in the claim's transaction
        connection.rollback()
        assert connection.scalar(text("SHOW synchronous_commit")) == "on"
