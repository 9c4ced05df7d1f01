"""What outlives its time: RETENTION_DAYS, and `flask purge` deleting it a short transaction at a
time (and `flask purge-idempotency-keys`, its keys-only elder)."""
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, func, insert, select, update

import config as config_module
from chatapp.extensions import db
from chatapp.models import Conversation, IdempotencyKey, Message, utcnow
from chatapp.user_data import ROWS_A_TRANSACTION
from config import ConfigError, DevelopmentConfig
from tests.support.assertions import assert_error
from tests.test_user_data import HeldTurn

DAY = timedelta(days=1)
TTL = 90 * 86400  # longer than the retention: a stale conversation's keys are not all expired ones


@pytest.fixture
def config_overrides():
    return {"RETENTION_DAYS": 30, "IDEMPOTENCY_TTL": TTL, "AGENT_TIMEOUT": 10.0}


def add_conversation(app, *, age: timedelta, messages: int = 2, user_id: str = "alice", claimed_for: float | None = None) -> uuid.UUID:
    """A conversation last updated `age` ago, with `messages` messages, written directly."""
    now = utcnow()
    conversation_id = uuid.uuid4()
    with app.app_context():
        db.session.execute(insert(Conversation), [{
            "id": conversation_id, "user_id": user_id, "title": "t", "message_count": messages,
            "created_at": now - age - DAY, "updated_at": now - age,
            "claim_token": uuid.uuid4() if claimed_for is not None else None,
            "claimed_until": now + timedelta(seconds=claimed_for) if claimed_for is not None else None}])
        if messages:
            db.session.execute(insert(Message), [
                {"conversation_id": conversation_id, "seq": seq, "role": "user" if seq % 2 else "assistant", "content": f"m{seq}"}
                for seq in range(1, messages + 1)])
        db.session.commit()
    return conversation_id


def add_keys(app, count: int, *, age: timedelta, conversation_id: uuid.UUID | None = None, prefix: str = "k") -> list[str]:
    """`count` completed idempotency keys created `age` ago (of a conversation, when given)."""
    names = [f"{prefix}{n}" for n in range(count)]
    with app.app_context():
        db.session.execute(insert(IdempotencyKey), [
            {"user_id": "alice", "key": name, "fingerprint": "f" * 64, "response_body": "{}", "conversation_id": conversation_id,
             "created_at": utcnow() - age} for name in names])
        db.session.commit()
    return names


def stored(app) -> dict:
    """What is left: each conversation's message count, by id; the keys' names."""
    with app.app_context():
        counts = dict(db.session.execute(
            select(Conversation.id, func.count(Message.id)).outerjoin(Message).group_by(Conversation.id)).all())
        keys = set(db.session.scalars(select(IdempotencyKey.key)))
        db.session.rollback()
    return {"messages": counts, "keys": keys}


@pytest.fixture
def deleted_per_transaction(app):
    """The rows each transaction on the app's engine deleted (transactions that deleted none are
    left out), as the database counted them: DELETE statements' rowcounts, summed until commit."""
    with app.app_context():
        engine = db.engine
    running, ended = {}, []

    def count(conn, cursor, statement, *_args):
        if statement.lstrip().upper().startswith("DELETE"):
            running[id(conn)] = running.get(id(conn), 0) + cursor.rowcount

    def end(conn):
        rows = running.pop(id(conn), 0)
        if rows:
            ended.append(rows)

    event.listen(engine, "after_cursor_execute", count)
    event.listen(engine, "commit", end)
    event.listen(engine, "rollback", end)
    yield ended
    event.remove(engine, "after_cursor_execute", count)
    event.remove(engine, "commit", end)
    event.remove(engine, "rollback", end)


def purge(app, command="purge"):
    result = app.test_cli_runner().invoke(args=[command])
    assert result.exit_code == 0, result.output
    return result.output


def test_purge_deletes_what_is_older_than_the_retention_a_batch_at_a_time(app, deleted_per_transaction):
    long = add_conversation(app, age=40 * DAY, messages=2500)
    add_conversation(app, age=30 * DAY + timedelta(minutes=1), messages=3, user_id="bob")  # just past the retention
    just_kept = add_conversation(app, age=30 * DAY - timedelta(minutes=1), messages=4)
    held = add_conversation(app, age=60 * DAY, messages=2, claimed_for=60)  # a turn in flight holds it
    add_keys(app, 3, age=timedelta(seconds=TTL + 60), prefix="expired")
    add_keys(app, 2, age=35 * DAY, conversation_id=long, prefix="long")  # not expired: they go with their conversation
    fresh = add_keys(app, 2, age=DAY, prefix="fresh")
    of_kept = add_keys(app, 1, age=29 * DAY, conversation_id=just_kept, prefix="kept")

    output = purge(app)

    assert output == ("conversations not updated for 30 days: deleted 2, with 2503 messages and 2 idempotency keys\n"
                      "expired idempotency keys: deleted 3\n")
    assert stored(app) == {"messages": {just_kept: 4, held: 2}, "keys": set(fresh + of_kept)}
    # 2 conversations, 2,503 messages, 5 keys, each batch of at most 1,000 rows; and nothing went
    # by cascade (the database's own counts add up to all that went).
    assert max(deleted_per_transaction) <= ROWS_A_TRANSACTION
    assert sum(deleted_per_transaction) == 2 + 2503 + 5
    assert sorted(deleted_per_transaction, reverse=True)[:3] == [1000, 1000, 503]
    assert purge(app) == ("conversations not updated for 30 days: deleted 0, with 0 messages and 0 idempotency keys\n"
                          "expired idempotency keys: deleted 0\n")


def test_purge_goes_through_more_stale_conversations_than_a_batch(app, deleted_per_transaction):
    kept = add_conversation(app, age=DAY)
    now = utcnow()
    stale = [uuid.uuid4() for _ in range(1205)]
    with app.app_context():
        db.session.execute(insert(Conversation), [
            {"id": conversation_id, "user_id": f"user-{n % 7}", "title": "t", "message_count": 1, "created_at": now - 50 * DAY,
             "updated_at": now - 40 * DAY} for n, conversation_id in enumerate(stale)])
        db.session.execute(insert(Message), [
            {"conversation_id": conversation_id, "seq": 1, "role": "user", "content": "hi"} for conversation_id in stale])
        db.session.commit()

    output = purge(app)

    assert output.splitlines()[0] == "conversations not updated for 30 days: deleted 1205, with 1205 messages and 0 idempotency keys"
    assert stored(app)["messages"] == {kept: 2}
    assert max(deleted_per_transaction) <= ROWS_A_TRANSACTION and sum(deleted_per_transaction) == 2 * 1205


@pytest.mark.parametrize("config_overrides", [{"RETENTION_DAYS": 30, "IDEMPOTENCY_TTL": TTL, "TURN_LEASE_SECONDS": 0.004}])
def test_a_long_purge_renews_its_claim(app, count_statements):
    """Its messages outlast the purge's lease: the claim is renewed as a turn's is, and the purge
    goes on to the end."""
    conversation_id = add_conversation(app, age=40 * DAY, messages=2500)
    with count_statements() as counter:
        output = purge(app)
    assert output.startswith("conversations not updated for 30 days: deleted 1, with 2500 messages")
    renewals = [statement for statement in counter.statements if statement.startswith("UPDATE conversations SET claimed_until")]
    assert len(renewals) >= 2
    assert conversation_id not in stored(app)["messages"]


def test_a_turn_in_flight_keeps_its_stale_conversation(app, auth, chat, agent_server):
    conversation_id = chat.turn("an old conversation")["conversation_id"]
    other = add_conversation(app, age=40 * DAY)
    with app.app_context():
        db.session.execute(update(Conversation).where(Conversation.id == uuid.UUID(conversation_id))
                           .values(updated_at=utcnow() - 40 * DAY))
        db.session.commit()
    held = HeldTurn(app, auth, agent_server, {"message": "back to it", "conversation_id": conversation_id})
    try:
        output = purge(app)
    finally:
        answer = held.finish()

    assert output.startswith("conversations not updated for 30 days: deleted 1, with 2 messages")
    assert stored(app)["messages"] == {uuid.UUID(conversation_id): 4}
    assert answer["message"] == "You said: back to it"
    assert other not in stored(app)["messages"]


def test_no_turn_starts_on_a_conversation_being_purged(app, auth, chat):
    conversation_id = chat.turn("soon gone")["conversation_id"]
    with app.app_context():
        db.session.execute(update(Conversation).where(Conversation.id == uuid.UUID(conversation_id))
                           .values(updated_at=utcnow() - 40 * DAY))
        db.session.commit()
        engine = db.engine
    meanwhile = []

    def turn_mid_purge(_conn, _cursor, statement, *_args):
        if statement.startswith("DELETE FROM messages") and not meanwhile:
            meanwhile.append(None)
            meanwhile.append(chat.post({"message": "wait", "conversation_id": conversation_id}))

    event.listen(engine, "before_cursor_execute", turn_mid_purge)
    try:
        output = purge(app)
    finally:
        event.remove(engine, "before_cursor_execute", turn_mid_purge)

    assert_error(meanwhile[1], 409, "conversation_busy")
    assert output.startswith("conversations not updated for 30 days: deleted 1, with 2 messages")
    assert_error(chat.post({"message": "again", "conversation_id": conversation_id}), 404, "conversation_not_found")


@pytest.mark.parametrize("config_overrides", [{"IDEMPOTENCY_TTL": 3600}])
def test_without_a_retention_purge_deletes_only_expired_keys(app):
    old = add_conversation(app, age=3650 * DAY, messages=3)
    add_keys(app, 4, age=timedelta(hours=2), prefix="expired")
    fresh = add_keys(app, 2, age=timedelta(minutes=30), prefix="fresh")

    output = purge(app)

    assert output == "conversations: all kept (RETENTION_DAYS is unset)\nexpired idempotency keys: deleted 4\n"
    assert stored(app) == {"messages": {old: 3}, "keys": set(fresh)}


@pytest.mark.parametrize("config_overrides", [{"IDEMPOTENCY_TTL": 3600}])
def test_purge_idempotency_keys_still_works_and_in_batches(app, deleted_per_transaction):
    old = add_conversation(app, age=3650 * DAY, messages=3)
    add_keys(app, 2345, age=timedelta(hours=2), prefix="expired")
    fresh = add_keys(app, 3, age=timedelta(minutes=30), prefix="fresh")

    assert purge(app, "purge-idempotency-keys") == "removed 2345 expired idempotency keys\n"
    assert stored(app) == {"messages": {old: 3}, "keys": set(fresh)}
    assert deleted_per_transaction == [1000, 1000, 345]


# RETENTION_DAYS --------------------------------------------------------------------------------


@pytest.fixture
def environ(monkeypatch):
    monkeypatch.delenv("RETENTION_DAYS", raising=False)
    return monkeypatch


def test_retention_is_unset_by_default_and_read_as_days(environ):
    assert DevelopmentConfig().RETENTION_DAYS is None
    environ.setenv("RETENTION_DAYS", " 30 ")
    config = DevelopmentConfig()
    config.validate()
    assert config.RETENTION_DAYS == 30
    assert "RETENTION_DAYS" in config_module.SETTINGS_READ


@pytest.mark.parametrize("value, message", [
    ("0", "RETENTION_DAYS must be at least 1"), ("-7", "RETENTION_DAYS must be at least 1"),
    ("a month", "RETENTION_DAYS must be an integer"), ("1.5", "RETENTION_DAYS must be an integer"),
])
def test_a_retention_that_is_not_a_number_of_days_stops_the_service(environ, value, message):
    environ.setenv("RETENTION_DAYS", value)
    with pytest.raises(ConfigError, match=f"^{message}"):
        DevelopmentConfig().validate()
