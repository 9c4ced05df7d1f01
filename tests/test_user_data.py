"""Everything of a user at once: the export, streamed in bounded memory, and the erasure, whole or
not at all."""
import hashlib
import json
import threading
import tracemalloc
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, insert, select, update

from chatapp.extensions import db
from chatapp.models import Conversation, DailyUsage, IdempotencyKey, Message, TokenBudget, utcnow
from tests.conftest import Chat
from tests.support.assertions import assert_error

EXPORT_DISPOSITION = 'attachment; filename="chatapp-export.json"'
# The export of the big history may grow the test's memory by less than this.
EXPORT_MEMORY_LIMIT = 20 * 2**20
# 200 conversations, 10,000 messages: one spans six pages of messages, one fills two exactly, one
# has none; the conversations span two pages.
BIG_HISTORY = [1045, 400, 0] + [44] * 84 + [43] * 113
CONTENT_CHARS = 2500  # 10,000 messages of this make a document larger than EXPORT_MEMORY_LIMIT


@pytest.fixture
def config_overrides():
    """An agent held by a test while it erases has time to answer after, and its turn's lease is
    not renewed meanwhile (the rows compared before and after stay the same)."""
    return {"AGENT_TIMEOUT": 10.0, "TURN_LEASE_SECONDS": 600.0}


def message_content(user_id: str, index: int, seq: int) -> str:
    return f"{user_id} conversation {index} message {seq} ".ljust(CONTENT_CHARS, ".")


def seed_history(app, user_id: str, sizes: list[int], base: datetime | None = None) -> list[uuid.UUID]:
    """Conversations of `sizes` messages each, written directly in bulk: answers with a model,
    usage and (every fifth) feedback, some conversations with metadata. Ten conversations around
    the hundredth share one updated_at, so that the list's tie-break on id runs across a page
    boundary. Their ids, most recently active first."""
    base = base or utcnow() - timedelta(days=1)
    conversations = []
    for index, size in enumerate(sizes):
        updated_at = base - timedelta(minutes=95 if 95 <= index < 105 else index)
        conversations.append({
            "id": uuid.uuid4(), "user_id": user_id, "title": f"{user_id} conversation {index}",
            "meta": {"project": f"p{index % 3}"} if index % 2 else None, "message_count": size,
            "created_at": base - timedelta(days=2, minutes=index), "updated_at": updated_at,
        })
    with app.app_context():
        db.session.execute(insert(Conversation), conversations)
        for index, (conversation, size) in enumerate(zip(conversations, sizes)):
            rows = []
            for seq in range(1, size + 1):
                answer = seq % 2 == 0
                rows.append({
                    "id": uuid.uuid4(), "conversation_id": conversation["id"], "seq": seq,
                    "role": "assistant" if answer else "user", "content": message_content(user_id, index, seq),
                    "created_at": conversation["created_at"] + timedelta(seconds=seq),
                    "model": "gpt-4" if answer else None, "finish_reason": "stop" if answer else None,
                    "usage": {"prompt_tokens": seq, "completion_tokens": 7, "total_tokens": seq + 7} if answer else None,
                    "feedback_rating": "like" if answer and seq % 5 == 0 else None,
                    "feedback_comment": f"good {seq}" if answer and seq % 5 == 0 else None,
                    "feedback_at": conversation["created_at"] + timedelta(seconds=seq, milliseconds=500)
                    if answer and seq % 5 == 0 else None,
                })
            if rows:
                db.session.execute(insert(Message), rows)
        db.session.commit()
    ordered = sorted(conversations, key=lambda c: (c["updated_at"], c["id"]), reverse=True)
    return [conversation["id"] for conversation in ordered]


@pytest.fixture
def history(client, auth):
    """The user's history as the history endpoints show it, page by page: every conversation, most
    recently active first, each with all its messages, oldest first."""

    def read(user_id="alice"):
        headers = auth.headers(user_id)
        conversations, cursor = [], None
        while True:
            page = client.get(f"/api/{user_id}/conversations", query_string={"limit": 100, **({"before": cursor} if cursor else {})},
                              headers=headers).get_json()
            conversations += page["conversations"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        for conversation in conversations:
            messages, before = [], None
            while True:
                page = client.get(f"/api/{user_id}/conversations/{conversation['conversation_id']}/messages",
                                  query_string={"limit": 200, **({"before": before} if before else {})}, headers=headers).get_json()
                messages = page["messages"] + messages
                if not page["has_more"]:
                    break
                before = page["messages"][0]["seq"]
            conversation["messages"] = messages
        return conversations

    return read


def pool_of(app):
    with app.app_context():
        return db.engine.pool


# The export ----------------------------------------------------------------------------------


def test_the_export_of_a_big_history_streams_in_bounded_memory(app, client, auth, history, tmp_path, capsys):
    ids = seed_history(app, "alice", BIG_HISTORY)
    bobs = seed_history(app, "bob", [3, 2])
    pool = pool_of(app)
    copy_path = tmp_path / "export.json"
    digest, size, chunks, connections_held = hashlib.sha256(), 0, 0, 0
    asked_at = utcnow()

    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        response = client.get("/api/alice/export", headers=auth.headers(), buffered=False)
        with copy_path.open("wb") as copy:
            for chunk in response.response:  # as a slow client reads it: one piece at a time
                connections_held = max(connections_held, pool.checkedout())
                digest.update(chunk)
                size += len(chunk)
                chunks += 1
                copy.write(chunk)
        response.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = peak - baseline
    with capsys.disabled():
        print(f"\nexport: {size / 2**20:.1f} MB in {chunks} pieces; the test's memory grew by {growth / 2**20:.2f} MB at most")

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Disposition"] == EXPORT_DISPOSITION
    assert response.headers["X-Request-ID"] and "Content-Length" not in response.headers
    assert size > EXPORT_MEMORY_LIMIT  # a document held whole would not fit the limit
    assert growth < EXPORT_MEMORY_LIMIT
    assert connections_held == 0  # no pooled connection waits while the client reads

    raw = copy_path.read_bytes()
    assert hashlib.sha256(raw).digest() == digest.digest() and raw.isascii()
    document = json.loads(raw)
    assert list(document) == ["user_id", "exported_at", "conversations"]
    assert document["user_id"] == "alice"
    exported_at = datetime.fromisoformat(document["exported_at"])
    assert exported_at.utcoffset() == timedelta(0) and asked_at <= exported_at <= utcnow()
    assert [uuid.UUID(c["conversation_id"]) for c in document["conversations"]] == ids
    assert [len(c["messages"]) for c in document["conversations"]] == [c["message_count"] for c in document["conversations"]]
    assert sum(len(c["messages"]) for c in document["conversations"]) == 10_000
    assert document["conversations"] == history("alice")  # every field as the history shows it, in its order
    bigger = next(c for c in document["conversations"] if c["message_count"] == 1045)
    assert [m["seq"] for m in bigger["messages"]] == list(range(1, 1046))
    assert bigger["messages"][9]["feedback"] == {"rating": "like", "comment": "good 10", "updated_at": bigger["messages"][9]["feedback"]["updated_at"]}
    assert all(str(bob_id) not in raw.decode() for bob_id in bobs) and b"bob conversation" not in raw


def test_the_export_is_the_history_of_real_turns(app, client, auth, chat, history):
    first = chat.turn("Hello")["conversation_id"]
    chat.turn("And again", conversation_id=first)
    second = chat.post({"message": "keyed"}, headers={"Idempotency-Key": "k1"}).get_json()["conversation_id"]
    chat.turn("not mine", user_id="bob")

    response = client.get("/api/alice/export", headers=auth.headers())

    assert response.status_code == 200
    document = response.get_json()
    assert document == {"user_id": "alice", "exported_at": document["exported_at"], "conversations": history("alice")}
    assert [c["conversation_id"] for c in document["conversations"]] == [second, first]
    assert [m["content"] for m in document["conversations"][1]["messages"]] == [
        "Hello", "You said: Hello", "And again", "You said: And again"]
    # The body is compact JSON, as every other body is.
    assert response.data.startswith(b'{"user_id":"alice","exported_at":"')


def test_the_export_of_a_user_without_history(client, auth):
    response = client.get("/api/alice/export", headers=auth.headers())
    assert response.status_code == 200
    assert response.headers["Content-Disposition"] == EXPORT_DISPOSITION
    document = response.get_json()
    assert document == {"user_id": "alice", "exported_at": document["exported_at"], "conversations": []}


def test_a_turn_stored_while_the_export_is_sent_is_left_out_whole(app, client, auth):
    """The conversations are read before the messages: a conversation keeps the message count it was
    read with, and its messages stop there."""
    [conversation_id] = seed_history(app, "alice", [450])
    response = client.get("/api/alice/export", headers=auth.headers(), buffered=False)
    pieces = iter(response.response)
    start = next(pieces)
    with app.app_context():  # a turn stored meanwhile: two more messages
        db.session.execute(insert(Message), [
            {"conversation_id": conversation_id, "seq": seq, "role": role, "content": f"later {seq}"}
            for seq, role in ((451, "user"), (452, "assistant"))])
        db.session.execute(update(Conversation).where(Conversation.id == conversation_id).values(message_count=452))
        db.session.commit()
    document = json.loads(start + b"".join(pieces))
    response.close()
    [exported] = document["conversations"]
    assert exported["message_count"] == len(exported["messages"]) == 450
    assert exported["messages"][-1]["seq"] == 450


def test_the_export_needs_the_users_token(app, client, auth):
    seed_history(app, "alice", [2])
    assert_error(client.get("/api/alice/export"), 401, "authentication_required")
    assert_error(client.get("/api/alice/export", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    assert_error(client.get("/api/alice/export", headers=auth.headers("bob")), 403, "forbidden")


def test_the_export_validates_before_it_authenticates(client, auth):
    body = assert_error(client.get("/api/alice/export", query_string={"format": "csv"}, headers=auth.headers()), 400,
                        "invalid_request")
    assert body["errors"] == {"format": ["Unknown field."]}
    assert_error(client.get("/api/alice/export", query_string={"format": "csv"}), 400, "invalid_request")
    assert_error(client.get(f"/api/{'a' * 256}/export"), 400, "invalid_request")


def test_the_export_example_is_a_valid_export():
    from chatapp.openapi import EXAMPLES
    from chatapp.schemas import UserExportSchema

    assert UserExportSchema().validate(EXAMPLES["export_user_data"]["response"]) == {}


# The erasure ---------------------------------------------------------------------------------

TABLES = (Conversation, Message, IdempotencyKey, DailyUsage, TokenBudget)


def all_rows() -> dict:
    """Every row of every table of the user's data, as sorted tuples, by table."""
    db.session.expire_all()
    found = {}
    for model in TABLES:
        table = model.__table__
        found[table.name] = sorted(tuple(row) for row in db.session.execute(select(table)).all())
    db.session.rollback()
    return found


def without_user(rows: dict, user_id: str) -> dict:
    """The rows of everybody but `user_id` (messages by their conversation's user)."""
    conversation_ids = {row[0] for row in rows["conversations"] if row[1] == user_id}
    owner = {"conversations": 1, "idempotency_keys": 0, "daily_usage": 0, "token_budgets": 0}
    kept = {name: [row for row in table_rows if row[owner[name]] != user_id] for name, table_rows in rows.items() if name in owner}
    kept["messages"] = [row for row in rows["messages"] if row[1] not in conversation_ids]
    return kept


def user_rows(rows: dict, user_id: str) -> int:
    """How many rows of `user_id` there are, in all tables."""
    return sum(len(table_rows) for table_rows in rows.values()) - sum(len(kept) for kept in without_user(rows, user_id).values())


def give_history(app, chat, user_id: str) -> None:
    """Conversations of real turns (some keyed), feedback on an answer, daily usage, and a budget
    of the user's own."""
    first = chat.turn("one", user_id=user_id)["conversation_id"]
    chat.post({"message": "two", "conversation_id": first}, user_id=user_id, headers={"Idempotency-Key": "k1"})
    chat.post({"message": "three"}, user_id=user_id, headers={"Idempotency-Key": "k2"})
    with app.app_context():
        db.session.execute(update(Message).where(Message.conversation_id == uuid.UUID(first), Message.seq == 2)
                           .values(feedback_rating="dislike", feedback_comment="no", feedback_at=utcnow()))
        db.session.add(DailyUsage(user_id=user_id, day=utcnow().date() - timedelta(days=40), turns=1, prompt_tokens=1,
                                  completion_tokens=1, estimated_turns=0))
        db.session.add(TokenBudget(user_id=user_id, token_limit=1000))
        db.session.commit()


def test_the_erasure_leaves_nothing_of_the_user_and_touches_no_one_else(app, client, auth, chat, store):
    give_history(app, chat, "alice")
    give_history(app, chat, "bob")
    before = all_rows()
    assert all(before.values()) and user_rows(before, "alice") >= 13

    response = client.delete("/api/alice/conversations", headers=auth.headers())

    assert response.status_code == 204
    assert response.data == b"" and "Content-Type" not in response.headers
    assert response.headers["X-Request-ID"]
    after = all_rows()
    assert user_rows(after, "alice") == 0
    assert after == without_user(before, "alice")  # every other row as it was
    assert client.get("/api/alice/conversations", headers=auth.headers()).get_json() == {"conversations": [], "next_cursor": None}
    assert client.get("/api/alice/export", headers=auth.headers()).get_json()["conversations"] == []
    assert client.delete("/api/alice/conversations", headers=auth.headers()).status_code == 204  # nothing left: no error
    assert chat.post({"message": "three"}, headers={"Idempotency-Key": "k2"}).headers.get("Idempotent-Replayed") is None


def test_the_erasure_needs_the_users_token(app, client, auth, chat):
    give_history(app, chat, "alice")
    before = all_rows()
    assert_error(client.delete("/api/alice/conversations"), 401, "authentication_required")
    assert_error(client.delete("/api/alice/conversations", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    assert_error(client.delete("/api/alice/conversations", headers=auth.headers("bob")), 403, "forbidden")
    assert_error(client.delete(f"/api/{'a' * 256}/conversations"), 400, "invalid_request")  # validation first
    assert all_rows() == before


class HeldTurn:
    """A turn running in a thread of its own, held at the agent until released."""

    def __init__(self, app, auth, agent_server, body, headers=None):
        self.arrived, self.release = threading.Event(), threading.Event()
        agent_server.on_request = self._hold
        self.chat = Chat(app.test_client(), auth)
        self.response = None
        self.thread = threading.Thread(target=self._run, args=(body, headers or {}))
        self.thread.start()
        assert self.arrived.wait(10), "the turn never reached the agent"

    def _hold(self, _request):
        self.arrived.set()
        self.release.wait(10)

    def _run(self, body, headers):
        self.response = self.chat.post(body, headers=headers)

    def finish(self):
        self.release.set()
        self.thread.join(15)
        assert self.response is not None and self.response.status_code == 200, self.response and self.response.get_json()
        return self.response.get_json()


@pytest.mark.parametrize("turn", ["on an existing conversation", "keyed, on a new conversation"])
def test_the_erasure_is_busy_while_a_turn_is_in_flight(app, client, auth, chat, agent_server, turn):
    give_history(app, chat, "alice")
    give_history(app, chat, "bob")
    existing = chat.turn("continue me")["conversation_id"]
    body, headers = ({"message": "more", "conversation_id": existing}, {}) if turn.startswith("on") else (
        {"message": "new"}, {"Idempotency-Key": "held"})
    held = HeldTurn(app, auth, agent_server, body, headers)
    try:
        before = all_rows()
        response = client.delete("/api/alice/conversations", headers=auth.headers())
        assert_error(response, 409, "conversation_busy")
        assert response.headers["Retry-After"] == "1"
        assert all_rows() == before  # nothing erased
    finally:
        answer = held.finish()

    assert client.get(f"/api/alice/conversations/{answer['conversation_id']}", headers=auth.headers()).status_code == 200
    bobs = without_user(all_rows(), "alice")
    assert client.delete("/api/alice/conversations", headers=auth.headers()).status_code == 204
    after = all_rows()
    assert user_rows(after, "alice") == 0 and after == bobs


def test_claims_left_by_a_dead_worker_do_not_hold_the_erasure(app, client, auth, chat):
    conversation_id = chat.turn("one")["conversation_id"]
    lapsed = utcnow() - timedelta(seconds=1)
    with app.app_context():
        db.session.execute(update(Conversation).where(Conversation.id == uuid.UUID(conversation_id))
                           .values(claim_token=uuid.uuid4(), claimed_until=lapsed))
        db.session.add(IdempotencyKey(user_id="alice", key="crashed", fingerprint="f" * 64, claim_token=uuid.uuid4(),
                                      locked_until=lapsed))
        db.session.commit()
    assert client.delete("/api/alice/conversations", headers=auth.headers()).status_code == 204
    assert user_rows(all_rows(), "alice") == 0


def test_a_turn_that_comes_and_goes_while_the_erasure_runs_makes_it_busy(app, client, auth, chat, agent_server, store):
    """A turn claims a conversation after the erasure's first look, and (on PostgreSQL) stores and
    lets it go between the erasure's delete and its last look: what the delete left makes it 409,
    though no claim is left by then. (SQLite lets one writer at a time: the turn's commit waits for
    the erasure to end.)"""
    conversation_id = chat.turn("one")["conversation_id"]
    with app.app_context():
        engine = db.engine
    main = threading.current_thread()
    held, stored_meanwhile = [], []

    def interleave(_conn, _cursor, statement, *_args):
        if threading.current_thread() is not main:
            return
        if statement.startswith("DELETE FROM conversations") and not held:
            held.append(HeldTurn(app, auth, agent_server, {"message": "two", "conversation_id": conversation_id}))
        elif statement.startswith("SELECT (EXISTS") and held and not stored_meanwhile:
            held[0].release.set()
            held[0].thread.join(5 if engine.dialect.name == "postgresql" else 0.5)
            stored_meanwhile.append(not held[0].thread.is_alive())

    event.listen(engine, "before_cursor_execute", interleave)
    try:
        response = client.delete("/api/alice/conversations", headers=auth.headers())
    finally:
        event.remove(engine, "before_cursor_execute", interleave)
    assert_error(response, 409, "conversation_busy")
    held[0].finish()
    assert stored_meanwhile == [engine.dialect.name == "postgresql"]
    assert store.counts() == (1, 4)  # nothing erased, the turn stored
