"""On PostgreSQL, the statements of a turn and of the history endpoints read through their indexes:
each statement the app runs is explained, with its own parameters, on a database holding thousands
of conversations and tens of thousands of messages, and no plan scans a whole table. A sequential
scan is cheap on a small table and ruinous on a big one (bench/README.md, --big-db)."""
import json
from datetime import date

import pytest
from sqlalchemy import event, text

from chatapp.extensions import db

pytestmark = pytest.mark.parametrize("database_uri", ["postgresql"], indirect=True)

OTHER_CONVERSATIONS = 5000
MESSAGES_EACH = 10
ALICES_CONVERSATIONS = 1000
LONG_CONVERSATION = 2000
BIG_TABLES = {"conversations", "messages", "idempotency_keys", "daily_usage", "token_budgets"}


@pytest.fixture
def config_overrides():
    return {"TOKEN_BUDGET": "1000000 per month"}  # so that the turn reads the budget too


@pytest.fixture
def filled(app, chat):
    """Other users' conversations and messages, Alice's 1,000 conversations and one of 2,000
    messages (a real turn, grown in SQL), usage counters, keys; then ANALYZE, as autovacuum would."""
    long_id = chat.turn("the long one")["conversation_id"]
    with app.app_context(), db.engine.begin() as connection:
        connection.execute(text("""
            INSERT INTO conversations (id, user_id, title, message_count, created_at, updated_at)
            SELECT md5('c' || i)::uuid, 'user-' || (i % 500), 'a title', :messages_each,
                   now() - i * interval '1 minute', now() - i * interval '1 minute'
            FROM generate_series(1, :others) AS i"""), {"others": OTHER_CONVERSATIONS, "messages_each": MESSAGES_EACH})
        connection.execute(text("""
            INSERT INTO messages (id, conversation_id, seq, role, content, created_at)
            SELECT md5('m' || i || '-' || s)::uuid, md5('c' || i)::uuid, s,
                   CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END, 'message ' || s, now()
            FROM generate_series(1, :others) AS i, generate_series(1, :messages_each) AS s"""),
                           {"others": OTHER_CONVERSATIONS, "messages_each": MESSAGES_EACH})
        connection.execute(text("""
            INSERT INTO conversations (id, user_id, title, message_count, created_at, updated_at)
            SELECT md5('a' || i)::uuid, 'alice', 'a title', 0, now() - i * interval '1 hour', now() - i * interval '1 hour'
            FROM generate_series(1, :alices) AS i"""), {"alices": ALICES_CONVERSATIONS - 1})
        connection.execute(text("""
            INSERT INTO messages (id, conversation_id, seq, role, content, created_at)
            SELECT md5('l' || s)::uuid, :id, s, CASE WHEN s % 2 = 1 THEN 'user' ELSE 'assistant' END, 'message ' || s, now()
            FROM generate_series(3, :long) AS s"""), {"id": long_id, "long": LONG_CONVERSATION})
        connection.execute(text("UPDATE conversations SET message_count = :long WHERE id = :id"),
                           {"id": long_id, "long": LONG_CONVERSATION})
        connection.execute(text("""
            INSERT INTO daily_usage (user_id, day, turns, prompt_tokens, completion_tokens, estimated_turns)
            SELECT 'user-' || u, date '2026-01-01' + d, 1, 10, 10, 0 FROM generate_series(1, 500) AS u, generate_series(0, 30) AS d"""))
        connection.execute(text("""
            INSERT INTO idempotency_keys (user_id, key, fingerprint, response_body, created_at)
            SELECT 'user-' || (i % 500), 'key-' || i, 'f', '{}', now() FROM generate_series(1, 5000) AS i"""))
        connection.execute(text("""
            INSERT INTO token_budgets (user_id, token_limit, updated_at)
            SELECT 'user-' || i, 1000, now() FROM generate_series(1, 5000) AS i"""))
    with app.app_context(), db.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    return long_id


@pytest.fixture
def plans(app):
    """(statement, plan) of every statement the app's engine runs meanwhile, explained with the
    statement's own parameters on the same connection just before it runs."""
    with app.app_context():
        engine = db.engine
    seen = []

    def explain(_connection, cursor, statement, parameters, _context, _executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "INSERT", "DELETE")):
            plan = cursor.connection.execute("EXPLAIN (FORMAT JSON) " + statement, parameters).fetchone()[0]
            seen.append((statement, plan if isinstance(plan, list) else json.loads(plan)))

    event.listen(engine, "before_cursor_execute", explain)
    yield seen
    event.remove(engine, "before_cursor_execute", explain)


def nodes(plan):
    stack = [plan[0]["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))


def scans(seen):
    """Per statement: the (scan node type, relation, index) of its plan."""
    return [(statement, [(node["Node Type"], node.get("Relation Name"), node.get("Index Name"))
                         for node in nodes(plan) if "Relation Name" in node]) for statement, plan in seen]


def assert_indexed(seen):
    assert seen
    for statement, scanned in scans(seen):
        whole = [(kind, relation) for kind, relation, _ in scanned if kind == "Seq Scan" and relation in BIG_TABLES]
        assert not whole, f"{whole} in\n{statement}"


def test_a_turns_statements_use_their_indexes(app, chat, filled, plans):
    chat.turn("next", conversation_id=filled, headers={"Idempotency-Key": "plan-1"})
    chat.turn("a new one")
    assert_indexed(plans)
    used = {index for _, scanned in scans(plans) for _, _, index in scanned}
    assert {"pk_conversations", "uq_messages_conversation_id_seq", "pk_daily_usage", "pk_token_budgets"} <= used, used
    claim_and_history = [scanned for statement, scanned in scans(plans) if statement.lstrip().startswith("WITH claimed")]
    assert len(claim_and_history) == 1
    assert ("Index Scan", "conversations", "pk_conversations") in claim_and_history[0]
    assert ("Index Scan", "messages", "uq_messages_conversation_id_seq") in claim_and_history[0], claim_and_history


def test_the_history_endpoints_use_their_indexes(app, client, auth, filled, plans):
    headers = auth.headers("alice")
    first = client.get("/api/alice/conversations?limit=100", headers=headers)
    assert first.status_code == 200 and len(first.get_json()["conversations"]) == 100
    deep = client.get(f"/api/alice/conversations?limit=100&before={first.get_json()['next_cursor']}", headers=headers)
    assert deep.status_code == 200 and len(deep.get_json()["conversations"]) == 100
    page = client.get(f"/api/alice/conversations/{filled}/messages?limit=50&before=1001", headers=headers)
    assert page.status_code == 200 and [m["seq"] for m in page.get_json()["messages"]] == list(range(951, 1001))
    usage = client.get("/api/alice/usage", headers=headers)
    assert usage.status_code == 200
    exported = client.get("/api/user-7/export", headers=auth.headers("user-7"))
    assert exported.status_code == 200 and len(json.loads(exported.get_data())["conversations"]) == OTHER_CONVERSATIONS // 500
    assert_indexed(plans)
    used = {index for _, scanned in scans(plans) for _, _, index in scanned}
    assert {"ix_conversations_user_id_updated_at_id", "uq_messages_conversation_id_seq", "pk_daily_usage"} <= used, used
