"""`bench/run.py --big-db`: does chatapp slow down on a big database?

Two PostgreSQL databases, built by the migrations, each with its own service: one holding only the
shapes the measurements need (a user with 1,000 conversations, a conversation of 2,000 messages, a
user with a moderate history to export), the other the same shapes plus a bulk history generated in
SQL (by default 1,000,000 conversations and 10,000,000 messages of 100,000 users). The same requests
are measured on both, in one sitting, the two sides taking turns going first. See bench/README.md.

    .venv/bin/python bench/run.py --big-db --runs 3
    .venv/bin/python bench/run.py --big-db --big-db-keep        # keep the filled database for the next run
    .venv/bin/python bench/run.py --big-db --quick --big-db-conversations 20000   # a smoke run
"""
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from psycopg import sql

import report
from loadgen import run_wrk
from service import Database, Service
from stub import AgentStub

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

BULK_CONVERSATIONS = 1_000_000
CONVERSATIONS_A_USER = 10  # the bulk's users: its conversations / 10 (100,000 for the default)
HISTORY_DAYS = 180  # the bulk's and the shapes' conversations end within the last 180 days
# Turns of the bulk's conversations, one entry a conversation in turn: 100 entries, 500 turns, so
# 10 messages a conversation on average; most are short, a few long (at most 66 messages).
TURNS_PATTERN = [1] * 30 + [2] * 20 + [3] * 15 + [5] * 10 + [8] * 8 + [10] * 7 + [15] * 5 + [20] * 3 + [33] * 2
CHUNK = 50_000  # conversations a statement: a transaction of about 500,000 messages
FILL_SESSIONS = 2  # the machine's cores; INSERT ... SELECT runs on one core per session

# The shapes, on both sides. Their users start with "bench-" (no bulk user does): a kept database
# gets fresh ones by deleting those users' rows.
SHAPE_USERS_LIKE = "bench-%"
MANY_USER, MANY_CONVERSATIONS = "bench-many", 1000
LONG_OWNER, LONG_MESSAGES = "bench-user-00", 2000  # a user of run.py's, whose token the bench makes
EXPORT_USER, EXPORT_CONVERSATIONS, EXPORT_TURNS = "bench-export", 50, 10
# The shapes' conversations: (their first number in the generator, how many, owner, turns of each;
# None: the bulk's pattern). The bulk's numbers run from 0, so each has seeds of its own.
SHAPES = [(100_000_000, MANY_CONVERSATIONS, MANY_USER, None),
          (200_000_000, 1, LONG_OWNER, LONG_MESSAGES // 2),
          (200_000_001, EXPORT_CONVERSATIONS, EXPORT_USER, EXPORT_TURNS)]

IDEMPOTENCY_TTL_S = 86400  # config.py's default: keys of the last day's turns are kept
# The generator's version: a kept database filled by another is filled again.
GENERATOR = 2

# Measured requests: the list of the user with 1,000 conversations (first page, and a page deep in
# it), a page deep in the long conversation, a year of usage, the export of a moderate history.
LIST_LIMIT = 20
DEEP_LIST_OFFSET = 900  # the deep page starts after this many conversations (9 pages of 100)
MESSAGES_LIMIT, MESSAGES_BEFORE = 50, 201  # messages 151-200 of the long conversation
RATIO_TARGET = 1.10
# S2 and S4 as run.py runs them.
S2_CONVERSATIONS, S2_CONNECTIONS = 256, 16
S4_SHORT_MESSAGES, S4_PER_SHORT = 10, 10  # fresh conversations of 10 messages, 10 measured turns each
S4_TURN_BOUND_S = 300  # a bound for a count-bounded run, never reached when all is well

# --- the generator -------------------------------------------------------------------------------

OPENERS = [
    "How do I", "Can you explain how to", "What is the best way to", "Help me", "Why does it fail when I try to",
    "Give me an example of how to", "Is it a good idea to", "Walk me through how to",
    "What are the trade-offs when you", "Write a short guide to", "Quick question: how should I", "How can I",
    "Could you show me how to", "Summarize how to", "Suggest three ways to", "What should I know before I",
]
TOPICS = [
    "index a table of chat messages in PostgreSQL", "retry an HTTP call with exponential backoff in Python",
    "plan a three-day trip to Lisbon on a budget", "write a polite follow-up email to a client",
    "build a weekly running plan for a 10 km race", "put a Flask app behind nginx",
    "explain recursion to a ten-year-old", "bake sourdough bread without a stand mixer",
    "negotiate a salary offer", "migrate a MySQL database to PostgreSQL",
    "keep tomato plants healthy on a balcony", "prepare for a system design interview",
    "write unit tests for a date parser", "reduce the memory of a pandas DataFrame",
    "learn the basics of Spanish in a month", "read a balance sheet",
    "set up a budget spreadsheet for a family of four", "structure a cover letter for a data analyst job",
    "choose between a REST and a GraphQL API", "cook a vegetarian lasagna for eight people",
    "debug a memory leak in a Node.js service", "write a haiku about the sea",
    "summarize a 20-page report for my manager", "pick a laptop for video editing under 1500 euros",
    "rotate the logs of a Linux server", "explain the difference between TCP and UDP",
    "organize a team offsite for twelve people", "translate a product description into French",
    "configure a GitHub Actions workflow for a Python package", "train for my first half marathon",
    "write a SQL query for the top customers of each month", "make a cold brew coffee at home",
]
DETAILS = [
    "?", "?", "? Keep it short, please.", "? I tried twice and it still does not work.",
    "? Give me a step-by-step answer.", " as a beginner?", "? Compare two approaches.",
    "? I only have an hour.", "? It is for work, so be precise.", "? Please include an example.",
]
FOLLOW_UPS = [
    "Thanks! What about the edge cases?", "Can you make it shorter?", "Why is that better than the first option?",
    "Show me the code for that.", "What would you change if it had to scale ten times?",
    "Ok, and how do I test it?", "That did not work: I get an error on the second step.",
    "Can you give me a concrete example?", "What are the risks?", "Great, now write it as a checklist.",
    "How long would that take?", "Is there a simpler way?", "Could you explain the last point again?",
    "And if I am on a tight budget?", "Which one would you pick, and why?", "Perfect, thank you. One more thing:"
    " how do I explain this to my team?",
]
INTROS = [
    "Sure.", "Good question.", "Here is a short answer.", "There are a few options.", "Short version first:",
    "Happy to help.", "It depends on a couple of things.", "Let's go step by step.", "Yes, that works.",
    "Here is what I would do.",
]
SENTENCES = [
    "Start with the simplest version that works, then measure before you change anything else.",
    "The main trade-off is between speed now and how easy it is to change later.",
    "Write the steps down first: it makes the missing pieces obvious.",
    "Most of the time the default settings are a good starting point.",
    "Check the error message carefully, because it usually names the exact line or setting at fault.",
    "If you only have a little time, focus on the two or three things that matter most.",
    "A small example often explains more than a long description.",
    "Keep a copy of what you had before, so that you can go back if the change does not help.",
    "Ask the people who will use it what they need before you decide.",
    "Doing it a little every day works better than doing it all at once.",
    "The cost grows with the size of the input, so test it with realistic amounts of data.",
    "Be explicit about what happens when something fails halfway.",
    "A checklist helps you avoid forgetting a step when you repeat it later.",
    "You can usually get most of the benefit with a fraction of the effort.",
    "Read the official documentation for the version you use: details change between versions.",
    "Prefer clear names over clever tricks; you will thank yourself in six months.",
    "Plan for a buffer of about twenty percent, because things rarely go exactly as planned.",
    "Compare at least two options side by side before you commit to one.",
    "If it still fails, reduce the problem to the smallest case that shows it.",
    "Measure the result again afterwards, so you know whether it really helped.",
    "Group related items together: it makes the whole easier to review.",
    "Avoid changing several things at once, or you will not know which one made the difference.",
    "A short summary at the top lets busy readers decide whether to read the rest.",
    "For a beginner, the most important thing is to practise regularly and keep it fun.",
    "Automate the parts you repeat often, and keep the rare ones manual.",
    "Write down the assumptions you made, so that others can check them.",
    "Look for an existing tool before you build your own.",
    "Keep the first version small enough to finish in a day.",
    "Security matters from the start: never store passwords or keys in plain text.",
    "Rest is part of the plan, not a break from it.",
    "When in doubt, choose the option that is easiest to undo.",
    "Ask for feedback early, while changes are still cheap.",
]
RENAMED_TITLES = [
    "Trip planning", "Work notes", "Interview prep", "Recipes", "Database questions", "Weekly plan",
    "Emails to clients", "Learning Spanish", "Side project", "Budget", "Running", "Reading list",
]
PROJECTS = ["alpha", "onboarding", "research", "support", "personal", "q3-planning"]
MODELS = ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o", "llama3.1:8b"]
FEEDBACK_COMMENTS = [
    "Short and clear.", "Exactly what I needed.", "Too long.", "This was wrong about the second step.",
    "Helpful, thanks!", "Missed the point of my question.",
]
WORDS = {"openers": OPENERS, "topics": TOPICS, "details": DETAILS, "follow_ups": FOLLOW_UPS, "intros": INTROS,
         "sentences": SENTENCES, "renamed": RENAMED_TITLES, "projects": PROJECTS, "models": MODELS,
         "comments": FEEDBACK_COMMENTS, "pattern": TURNS_PATTERN}


def _hash(key: str, slot: int) -> str:
    """A deterministic pseudo-random bigint of (key, slot): the same fill gives the same texts."""
    return f"hashint8extended({key}, {slot})"


def _below(key: str, slot: int, count: int) -> str:
    """A number from 0 to count - 1."""
    return f"abs(mod({_hash(key, slot)}, {count}))"


def _pick(words: str, key: str, slot: int) -> str:
    return f"(%({words})s::text[])[1 + {_below(key, slot, len(WORDS[words]))}]"


def _fraction(key: str, slot: int) -> str:
    """A number in [0, 1)."""
    return f"({_below(key, slot, 1_000_000)}::float8 / 1000000)"


# Texts of conversation number i: its topic is i's, each message's words are of k = i * 10000 + seq.
_QUESTION = (f"CASE WHEN s = 1 THEN {_pick('openers', 'k', 1)} || ' ' || {_pick('topics', 'i', 7)} || "
             f"{_pick('details', 'k', 2)} ELSE {_pick('follow_ups', 'k', 1)} END")
_FIRST_QUESTION = (f"{_pick('openers', 'i * 10000 + 1', 1)} || ' ' || {_pick('topics', 'i', 7)} || "
                   f"{_pick('details', 'i * 10000 + 1', 2)}")
_ANSWER = (f"{_pick('intros', 'k', 1)} || ' ' || {_pick('sentences', 'k', 11)} || ' ' || {_pick('sentences', 'k', 12)}"
           + "".join(f" || CASE WHEN {_below('k', 3, 7)} >= {n - 2} THEN ' ' || {_pick('sentences', 'k', 10 + n)} "
                     "ELSE '' END" for n in range(3, 9)))
# An answer's usage: the prompt grows with the history up to the context's bound, the completion
# is a quarter of the answer's characters (the estimate's rule). The daily counters add the same.
_PROMPT_TOKENS = "(40 + 35 * least(seq, 50))"
_COMPLETION_TOKENS = "ceil(length(content) / 4.0)::int"

# One statement a range of conversation numbers and some of the shapes' numbers: the conversations,
# then their messages (seq 1..n, user and assistant in turn, n even), each table's rows in the order
# of their time, as a service appends them: a conversation's messages are spread among the others'
# of its days, and the shapes' rows among the bulk's. OFFSET 0 keeps the inner query whole, so that
# each message's text is built once, not once for each use of it.
_GENERATE = f"""
WITH numbered AS MATERIALIZED (
    SELECT i, gen_random_uuid() AS id, {{owner}} AS user_id, 2 * ({{turns}}) AS message_count,
           (10 + {_below('i', 4, 290)}) * interval '1 second' AS gap,
           %(now)s::timestamptz - (1 + {_below('i', 3, HISTORY_DAYS * 1440)}) * interval '1 minute' AS ended_at
    FROM (SELECT generate_series(%(first)s::bigint, %(last)s::bigint)
          UNION ALL SELECT unnest(%(shapes)s::bigint[])) AS numbers (i)
), conversation_rows AS (
    INSERT INTO conversations (id, user_id, title, metadata, message_count, created_at, updated_at)
    SELECT id, user_id,
           CASE WHEN {_below('i', 6, 50)} = 0 THEN {_pick('renamed', 'i', 9)} ELSE left({_FIRST_QUESTION}, 80) END,
           CASE WHEN {_below('i', 8, 20)} = 0 THEN '{{{{"project":"' || {_pick('projects', 'i', 10)} || '"}}}}' END,
           message_count, ended_at - gap * (message_count - 1), ended_at
    FROM numbered
    ORDER BY ended_at - gap * (message_count - 1)
)
INSERT INTO messages (id, conversation_id, seq, role, content, created_at, model, finish_reason, usage,
                      feedback_rating, feedback_comment, feedback_at)
SELECT gen_random_uuid(), id, seq, role, content, created_at,
       CASE WHEN answer THEN model END,
       CASE WHEN answer THEN CASE WHEN {_below('k', 8, 100)} = 0 THEN 'length' ELSE 'stop' END END,
       CASE WHEN answer AND {_below('k', 4, 20)} <> 0 THEN
            '{{{{"prompt_tokens":' || {_PROMPT_TOKENS} || ',"completion_tokens":' || {_COMPLETION_TOKENS}
            || ',"total_tokens":' || ({_PROMPT_TOKENS} + {_COMPLETION_TOKENS}) || '}}}}' END,
       CASE WHEN rated THEN CASE WHEN {_below('k', 6, 4)} = 0 THEN 'dislike' ELSE 'like' END END,
       CASE WHEN rated AND {_below('k', 7, 4)} = 0 THEN {_pick('comments', 'k', 9)} END,
       CASE WHEN rated THEN created_at + interval '2 minutes' END
FROM (
    SELECT n.id, s AS seq, t.k, s %% 2 = 0 AS answer, CASE WHEN s %% 2 = 1 THEN 'user' ELSE 'assistant' END AS role,
           n.ended_at - n.gap * (n.message_count - s) AS created_at, {_pick('models', 'n.i', 5)} AS model,
           s %% 2 = 0 AND {_below('t.k', 5, 50)} = 0 AS rated,
           CASE WHEN s %% 2 = 1 THEN {_QUESTION} ELSE {_ANSWER} END AS content
    FROM numbered n
    CROSS JOIN LATERAL generate_series(1, n.message_count) AS s
    CROSS JOIN LATERAL (SELECT n.i * 10000 + s AS k) AS t
    OFFSET 0
) AS generated
ORDER BY created_at
"""

# The daily counters of the generated answers, inserted day after day as turns would add them.
_DAILY_USAGE = f"""
INSERT INTO daily_usage (user_id, day, turns, prompt_tokens, completion_tokens, estimated_turns)
SELECT c.user_id, (m.created_at AT TIME ZONE 'UTC')::date, count(*), sum({_PROMPT_TOKENS.replace('seq', 'm.seq')}),
       sum({_COMPLETION_TOKENS.replace('content', 'm.content')}), count(*) FILTER (WHERE m.usage IS NULL)
FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE m.role = 'assistant' {{only}}
GROUP BY 1, 2
ORDER BY 2
"""

# A key for the last turn of each conversation active within the keys' TTL, with the response it
# replays and the fingerprint of its request, as a turn stores them.
_IDEMPOTENCY_KEYS = """
INSERT INTO idempotency_keys (user_id, key, fingerprint, response_body, conversation_id, created_at)
SELECT c.user_id, 'key-' || md5(c.id::text),
       encode(sha256(convert_to('[' || to_json(q.content) || ','
                                || CASE WHEN c.message_count = 2 THEN 'null' ELSE to_json(c.id::text)::text END
                                || ',' || to_json(a.model) || ']', 'UTF8')), 'hex'),
       '{"conversation_id":' || to_json(c.id::text) || ',"message":' || to_json(a.content)
       || ',"role":"assistant","created_at":' || to_json(a.created_at) || ',"usage":' || coalesce(a.usage, 'null')
       || ',"message_id":' || to_json(a.id::text) || ',"model":' || to_json(a.model)
       || ',"finish_reason":' || to_json(a.finish_reason) || '}',
       c.id, q.created_at
FROM conversations c
JOIN messages a ON a.conversation_id = c.id AND a.seq = c.message_count
JOIN messages q ON q.conversation_id = c.id AND q.seq = c.message_count - 1
WHERE c.updated_at > %(now)s::timestamptz - %(ttl)s * interval '1 second' {only}
ON CONFLICT DO NOTHING
"""

LOADED_TABLES = ("conversations", "messages", "daily_usage")


def _session(url: str, autocommit: bool = False) -> psycopg.Connection:
    connection = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    # A lost commit of a fill is a fill to start again: no need to wait for the WAL's flush. The index
    # builds sort in memory, with the server's parallel workers.
    for setting in ("SET synchronous_commit = off", "SET maintenance_work_mem = '1GB'", "SET work_mem = '512MB'",
                    "SET max_parallel_maintenance_workers = 2", "SET TIME ZONE 'UTC'"):
        connection.execute(setting)
    return connection


def _generate(url: str, first: int, last: int, shapes: list[int], users: int, now: datetime) -> int:
    """The bulk's conversations first..last (numbers of the generator) and the shapes' numbered
    `shapes`, with their messages; how many messages."""
    statement = _GENERATE.format(owner=_owner(users), turns=_turns())
    with _session(url) as connection:
        return connection.execute(statement, {**WORDS, "first": first, "last": last, "shapes": shapes,
                                              "now": now}).rowcount


def _owner(users: int) -> str:
    """The owner of conversation i: a shape's user, or one of the bulk's `users`, 'user-000000'...,
    a few of whom write much and most a little (user k's share falls as k grows)."""
    shapes = " ".join(f"WHEN i BETWEEN {first} AND {first + count - 1} THEN '{owner}'"
                      for first, count, owner, _turns in SHAPES)
    bulk = f"'user-' || lpad(floor({users} * power({_fraction('i', 1)}, 1.5))::int::text, 6, '0')"
    return f"CASE {shapes} ELSE {bulk} END"


def _turns() -> str:
    """The turns of conversation i: a shape's, or the bulk's pattern."""
    shapes = " ".join(f"WHEN i BETWEEN {first} AND {first + count - 1} THEN {turns}"
                      for first, count, _owner, turns in SHAPES if turns is not None)
    return f"CASE {shapes} ELSE (%(pattern)s::int[])[1 + mod(i, {len(TURNS_PATTERN)})::int] END"


def shape_numbers() -> list[int]:
    return [first + index for first, count, _owner, _turns in SHAPES for index in range(count)]


def _secondary_structures(connection) -> tuple[list, list]:
    """The constraints (primary keys, unique, foreign keys) and other indexes of the loaded tables,
    and the foreign keys that refer to them, as their definitions: (constraints, indexes)."""
    tables = list(LOADED_TABLES)
    constraints = connection.execute(
        """SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) FROM pg_constraint
           WHERE contype IN ('p', 'u', 'f')
             AND (conrelid = ANY(%(t)s::regclass[]) OR confrelid = ANY(%(t)s::regclass[]))
           ORDER BY contype = 'f', conrelid::regclass::text, conname""", {"t": tables}).fetchall()
    indexes = connection.execute(
        """SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index i
           WHERE indrelid = ANY(%(t)s::regclass[])
             AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u'))
           ORDER BY 1""", {"t": tables}).fetchall()
    return constraints, indexes


def _drop(connection, constraints, indexes) -> None:
    for table, name, _kind, _definition in reversed(constraints):  # foreign keys first
        connection.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(sql.SQL(table), sql.Identifier(name)))
    for name, _definition in indexes:
        connection.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    connection.commit()


def _recreate(url: str, constraints, indexes, log) -> None:
    """Primary keys and unique constraints, then the other indexes, then the foreign keys (each
    checked in one join, not row by row), exactly as they were defined."""
    with _session(url, autocommit=True) as connection:
        for table, name, kind, definition in constraints:
            if kind != "f":
                connection.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.SQL(table), sql.Identifier(name), sql.SQL(definition)))
                log(f"  {name}")
        for name, definition in indexes:
            connection.execute(definition)
            log(f"  {name}")
        for table, name, kind, definition in constraints:
            if kind == "f":
                connection.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.SQL(table), sql.Identifier(name), sql.SQL(definition)))
                log(f"  {name}")


def schema_of(url: str) -> dict:
    """Columns, constraints, indexes and the migration of a database: the migrations' schema."""
    with psycopg.connect(url, connect_timeout=10) as connection:
        return {
            "columns": connection.execute(
                """SELECT table_name, column_name, ordinal_position, data_type, character_maximum_length,
                          is_nullable, column_default FROM information_schema.columns
                   WHERE table_schema = 'public' ORDER BY 1, 3""").fetchall(),
            "constraints": connection.execute(
                """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
                   WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""").fetchall(),
            "indexes": connection.execute(
                "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2"
            ).fetchall(),
            "migration": connection.execute("SELECT version_num FROM alembic_version").fetchall(),
        }


def schema_differences(expected: dict, actual: dict) -> list[str]:
    out = []
    for part in expected:
        missing = sorted(set(map(tuple, expected[part])) - set(map(tuple, actual[part])))
        extra = sorted(set(map(tuple, actual[part])) - set(map(tuple, expected[part])))
        out += [f"{part}: missing {row}" for row in missing] + [f"{part}: extra {row}" for row in extra]
    return out


def fill(url: str, bulk_conversations: int, log) -> dict:
    """Fill a migrated database: the bulk (none for the empty side) with the shapes among it; the
    daily counters and the idempotency keys of what was generated; VACUUM ANALYZE. A database filled
    before keeps its bulk and gets new shapes. The seconds of each step."""
    steps = {}
    now = datetime.now(timezone.utc).replace(microsecond=0)
    started = clock = time.monotonic()

    def step(name):
        nonlocal clock
        steps[name] = round(time.monotonic() - clock, 1)
        log(f"  {name}: {steps[name]:.1f} s")
        clock = time.monotonic()

    with _session(url) as connection:
        refill = connection.execute("SELECT count(*) FROM conversations").fetchone()[0] > 0
        if refill:  # a kept database: the shapes of the last run, and what its turns added, go
            for table in ("conversations", "daily_usage", "idempotency_keys"):
                connection.execute(sql.SQL("DELETE FROM {} WHERE user_id LIKE %s").format(sql.Identifier(table)),
                                   [SHAPE_USERS_LIKE])
            connection.commit()
        constraints, indexes = _secondary_structures(connection)
    if refill:
        with _session(url, autocommit=True) as connection:
            connection.execute("VACUUM")  # the new shapes take the old ones' space, among the bulk
        step("the previous shapes deleted, VACUUM")
    bulk = 0 if refill else bulk_conversations
    users = max(1, bulk // CONVERSATIONS_A_USER)
    shapes = shape_numbers()
    if bulk:
        # Building each index once, from sorted rows, is several times faster than keeping it up to
        # date row by row; the foreign keys are checked once too, in one join.
        with _session(url) as connection:
            _drop(connection, constraints, indexes)
        ranges = [(first, min(first + CHUNK, bulk) - 1) for first in range(0, bulk, CHUNK)]
        parts = [(first, last, shapes[index::len(ranges)]) for index, (first, last) in enumerate(ranges)]
    else:
        parts = [(0, -1, shapes)]
    progress, lock = {"conversations": 0}, threading.Lock()

    def generate(part):
        first, last, some_shapes = part
        count = _generate(url, first, last, some_shapes, users, now)
        with lock:
            progress["conversations"] += last - first + 1 + len(some_shapes)
            if len(parts) > 1:
                log(f"  {progress['conversations']:,} of {bulk + len(shapes):,} conversations")
        return count

    with ThreadPoolExecutor(FILL_SESSIONS) as pool:
        messages = sum(pool.map(generate, parts))
    step(f"{bulk + len(shapes):,} conversations ({len(shapes):,} of them the shapes') of "
         f"{(users if bulk else 0) + len(SHAPES):,} users, {messages:,} messages")

    only = "AND c.user_id LIKE %(shapes)s" if refill else ""
    with _session(url) as connection:
        days = connection.execute(_DAILY_USAGE.replace("{only}", only),
                                  {"shapes": SHAPE_USERS_LIKE} if refill else None).rowcount
        connection.commit()
    step(f"daily usage: {days:,} rows")
    if bulk:
        _recreate(url, constraints, indexes, log)
        with _session(url, autocommit=True) as connection:
            connection.execute("ANALYZE")  # the keys' statement below is planned with the bulk's statistics
        step("primary keys, indexes and foreign keys; ANALYZE")
    with _session(url) as connection:
        keys = connection.execute(_IDEMPOTENCY_KEYS.replace("{only}", only),
                                  {"now": now, "ttl": IDEMPOTENCY_TTL_S, "shapes": SHAPE_USERS_LIKE}).rowcount
        connection.commit()
    step(f"idempotency keys: {keys:,}")
    with _session(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    step("VACUUM ANALYZE")
    return {"seconds": round(time.monotonic() - started, 1), "steps": steps, "messages": messages}


# --- the databases -------------------------------------------------------------------------------

def _named(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _admin_url(url: str) -> str:
    return _named(url, "postgres")


def kept_fill(database: Database, bulk: int) -> dict | None:
    """The fill a kept database holds (its database comment), when it is this generator's at this size."""
    with psycopg.connect(_admin_url(database.url), autocommit=True, connect_timeout=10) as connection:
        row = connection.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                                 [database.name]).fetchone()
    try:
        marker = json.loads(row[0]) if row and row[0] else None
    except ValueError:
        return None
    if marker and marker.get("generator") == GENERATOR and marker.get("bulk_conversations") == bulk:
        return marker
    return None


def mark_filled(database: Database, bulk: int, seconds: float) -> None:
    """Say in the database's comment what it holds (not in a table: the schema stays the migrations')."""
    marker = {"generator": GENERATOR, "bulk_conversations": bulk, "fill_seconds": seconds,
              "filled_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with psycopg.connect(_admin_url(database.url), autocommit=True, connect_timeout=10) as connection:
        connection.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(database.name), sql.Literal(json.dumps(marker))))


def contents(url: str) -> dict:
    """Rows and sizes of a database."""
    with psycopg.connect(url, connect_timeout=10) as connection:
        counts = connection.execute(
            """SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages),
                      (SELECT count(DISTINCT user_id) FROM conversations), (SELECT count(*) FROM daily_usage),
                      (SELECT count(*) FROM idempotency_keys), pg_database_size(current_database())""").fetchone()
        tables = connection.execute(
            """SELECT relname, pg_table_size(oid), pg_indexes_size(oid) FROM pg_class
               WHERE relname = ANY(%s) AND relkind = 'r' ORDER BY 1""",
            [["conversations", "messages", "daily_usage", "idempotency_keys"]]).fetchall()
    names = ("conversations", "messages", "users", "daily_usage", "idempotency_keys", "bytes")
    return {**dict(zip(names, counts)),
            "tables": {name: {"table": table, "indexes": index} for name, table, index in tables}}


def _one(url: str, statement: str, parameters=None):
    with psycopg.connect(url, connect_timeout=10) as connection:
        return connection.execute(statement, parameters).fetchone()


# --- the plans -----------------------------------------------------------------------------------

def history_plans(app_dir: Path, url: str, long_id, deep_position, export_id, first_day: date,
                  last_day: date) -> list[dict]:
    """EXPLAIN (ANALYZE, BUFFERS) of the history endpoints' statements, and of a turn's history read:
    the served checkout's own query functions (chatapp/queries.py), each statement explained just
    before it runs, with the measured requests' values."""
    from sqlalchemy import create_engine, event, text
    from sqlalchemy.orm import Session

    sys.path.insert(0, str(app_dir.resolve()))  # the served checkout's chatapp, not necessarily this one
    from chatapp import queries
    from chatapp.user_data import EXPORT_CONVERSATIONS_A_PAGE, EXPORT_MESSAGES_A_PAGE

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    plans, current = [], {"name": None}

    @event.listens_for(engine, "before_cursor_execute")
    def explain(_connection, cursor, statement, parameters, _context, _executemany):
        if current["name"] and statement.lstrip().upper().startswith(("SELECT", "WITH")):
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters)
            plans.append({"name": current["name"], "plan": [row[0] for row in cursor.fetchall()]})

    reads = [
        ("conversation list, first page", lambda s: queries.list_conversations(s, MANY_USER, LIST_LIMIT + 1, None)),
        (f"conversation list, after {DEEP_LIST_OFFSET} (a cursor)",
         lambda s: queries.list_conversations(s, MANY_USER, LIST_LIMIT + 1, deep_position)),
        ("the conversation (a messages page reads it first)",
         lambda s: queries.find_conversation_summary(s, LONG_OWNER, long_id)),
        (f"messages page, before {MESSAGES_BEFORE}",
         lambda s: queries.list_messages(s, long_id, MESSAGES_LIMIT + 1, MESSAGES_BEFORE)),
        ("usage, 366 days", lambda s: queries.usage_days(s, MANY_USER, first_day, last_day)),
        ("export, a page of conversations",
         lambda s: queries.list_conversations(s, EXPORT_USER, EXPORT_CONVERSATIONS_A_PAGE, None)),
        ("export, a conversation's messages",
         lambda s: queries.messages_after(s, export_id, 0, 2 * EXPORT_TURNS, EXPORT_MESSAGES_A_PAGE)),
        ("a turn's history (the long conversation)",  # CONTEXT_MAX_MESSAGES, CONTEXT_MAX_CHARS: config.py's defaults
         lambda s: queries.recent_history(s, long_id, 50, 100_000)),
    ]
    try:
        with Session(engine) as session:
            session.execute(text("SELECT 1"))  # connected before anything is explained
            for name, read in reads:
                current["name"] = name
                try:
                    read(session)
                except Exception as error:  # a function renamed or changed: say so, explain the others
                    plans.append({"name": name, "plan": [f"not explained: {type(error).__name__}: {error}"]})
                current["name"] = None
            session.rollback()
    finally:
        engine.dispose()
    return plans


# --- the measurements ----------------------------------------------------------------------------

MEASURES = [
    # key, what, the number compared
    ("S2", f"S2: turns continuing {S2_CONVERSATIONS} conversations, {S2_CONNECTIONS} connections", "rps"),
    ("S4-short", "S4: sequential turns, conversations of 10 messages", "p50"),
    ("S4-long", f"S4: sequential turns, the conversation of {LONG_MESSAGES:,} messages", "p50"),
    ("list-first", f"GET conversations?limit={LIST_LIMIT} of the user with {MANY_CONVERSATIONS:,}: the first page",
     "p50"),
    ("list-deep", f"the same, the page after {DEEP_LIST_OFFSET} (its cursor)", "p50"),
    ("messages-deep", f"GET messages?limit={MESSAGES_LIMIT}&before={MESSAGES_BEFORE} of the long conversation", "p50"),
    ("usage", f"GET usage of the user with {MANY_CONVERSATIONS:,}, 366 days", "p50"),
    ("export", f"GET export of a user with {EXPORT_CONVERSATIONS} conversations of {2 * EXPORT_TURNS} messages", "p50"),
]


class Side:
    """One database, its fill and its own service."""

    def __init__(self, name: str, bulk: int, opts, workdir: Path):
        self.name, self.bulk, self.opts = name, bulk, opts
        self.workdir = workdir / name
        self.workdir.mkdir()
        base_name = urlsplit(opts.pg_url).path.lstrip("/")  # bench: bench_empty and bench_big
        self.database = Database(_named(opts.pg_url, f"{base_name}_{name}"), self.workdir)
        self.service = None
        self.kept = None  # the earlier fill a kept database holds
        self.filled = None
        self.paths = {}

    def prepare(self, stub: AgentStub, log) -> None:
        """The database (created, or kept from an earlier run), the migrations, the fill."""
        if self.bulk and self.opts.big_db_keep:
            self.kept = kept_fill(self.database, self.bulk)
        if self.kept:
            self.database.created = True  # dropped at the end unless kept again
            log(f"{self.name}: reusing {self.database.name}, filled {self.kept['filled_at']}")
        else:
            self.database.create()
        extra_env = dict(setting.split("=", 1) for setting in self.opts.env)
        self.service = Service(self.opts.app_dir, self.workdir, self.database.url, stub.base_url,
                               workers=self.opts.workers, threads=self.opts.threads, extra_env=extra_env)
        log(f"{self.name}: database {self.database.name}: migrating")
        self.service.migrate()
        what = f"{self.bulk:,} conversations and the shapes" if self.bulk and not self.kept else "the shapes"
        log(f"{self.name}: filling with {what}")
        self.filled = fill(self.database.url, self.bulk, log)
        log(f"{self.name}: filled in {self.filled['seconds']:.1f} s")
        if self.bulk and not self.kept:
            mark_filled(self.database, self.bulk, self.filled["seconds"])
        self.contents = contents(self.database.url)

    def start(self, client_class, users: int, log) -> None:
        """The service, the tokens, the S2 conversations, and the paths of the measured requests."""
        self.service.start()
        log(f"{self.name}: gunicorn on {self.service.url}")
        self.tokens = {user: self.service.token(user) for user in (f"bench-user-{index:02d}" for index in range(users))}
        self.own_tokens = {user: self.service.token(user) for user in (MANY_USER, EXPORT_USER)}
        self.client = client_class(self.service, self.tokens)
        url = self.database.url
        self.long_id = _one(url, "SELECT id FROM conversations WHERE user_id = %s ORDER BY message_count DESC LIMIT 1",
                            [LONG_OWNER])[0]
        self.export_id = _one(url, "SELECT id FROM conversations WHERE user_id = %s LIMIT 1", [EXPORT_USER])[0]
        self.deep_position = _one(url, "SELECT updated_at, id FROM conversations WHERE user_id = %s "
                                       "ORDER BY updated_at DESC, id DESC OFFSET %s LIMIT 1",
                                  [MANY_USER, DEEP_LIST_OFFSET - 1])
        log(f"{self.name}: building {S2_CONVERSATIONS} conversations through the API (S2)")
        s2 = self.client.conversations(S2_CONVERSATIONS, 2)
        self.s2_data = self.write("s2.tsv", [(user, self.tokens[user], conversation) for user, conversation in s2])
        self.long_data = self.write("s4-long.tsv", [(LONG_OWNER, self.tokens[LONG_OWNER], str(self.long_id))])
        today = datetime.now(timezone.utc).date()
        self.usage_range = (today - timedelta(days=365), today)
        self.paths = {
            "list-first": (MANY_USER, f"/api/{MANY_USER}/conversations?limit={LIST_LIMIT}"),
            "list-deep": (MANY_USER, f"/api/{MANY_USER}/conversations?limit={LIST_LIMIT}&before={self.deep_cursor()}"),
            "messages-deep": (LONG_OWNER, f"/api/{LONG_OWNER}/conversations/{self.long_id}/messages"
                                          f"?limit={MESSAGES_LIMIT}&before={MESSAGES_BEFORE}"),
            "usage": (MANY_USER, f"/api/{MANY_USER}/usage?from={self.usage_range[0]}&to={self.usage_range[1]}"),
            "export": (EXPORT_USER, f"/api/{EXPORT_USER}/export"),
        }
        for key, (user, path) in self.paths.items():  # each answers, and as expected
            answer = requests.get(self.service.url + path, headers={"Authorization": f"Bearer {self.token(user)}"},
                                  timeout=30)
            if answer.status_code != 200:
                raise RuntimeError(f"{self.name} {key}: {answer.status_code} {answer.text[:300]}")

    def token(self, user: str) -> str:
        return self.tokens.get(user) or self.own_tokens[user]

    def deep_cursor(self) -> str:
        """The conversation list's cursor after DEEP_LIST_OFFSET conversations, as a client gets it:
        page after page."""
        cursor, seen = None, 0
        headers = {"Authorization": f"Bearer {self.token(MANY_USER)}"}
        while seen < DEEP_LIST_OFFSET:
            limit = min(100, DEEP_LIST_OFFSET - seen)
            page = requests.get(f"{self.service.url}/api/{MANY_USER}/conversations", timeout=30, headers=headers,
                                params={"limit": limit, **({"before": cursor} if cursor else {})}).json()
            cursor, seen = page["next_cursor"], seen + len(page["conversations"])
        return cursor

    def write(self, name: str, rows) -> Path:
        path = self.workdir / name
        path.write_text("".join("\t".join(row) + "\n" for row in rows))
        return path

    def stop(self, keep_database: bool) -> None:
        if self.service is not None:
            self.service.stop()
        if keep_database and self.filled is not None:
            self.database.created = False  # not dropped
        self.database.drop()


class BigDbBench:
    def __init__(self, opts, sides: list[Side], log):
        self.opts, self.sides, self.log = opts, sides, log
        self.runs = {key: {side.name: [] for side in sides} for key, _what, _number in MEASURES}
        self.orders = []  # each round's sides in the order they ran, and the load average at its start

    def record(self, key: str, side: Side, run: dict) -> None:
        self.runs[key][side.name].append(run)
        self.log(f"{key} {side.name}: {run['rps']:,.1f} req/s, p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, "
                 f"non-2xx {report.non2xx_text(run)}, socket errors {run['socket_errors']}")

    def sequential(self, side: Side, script_args: list[str], count: int) -> dict:
        return run_wrk(side.service.url, connections=1, threads=1, duration=S4_TURN_BOUND_S,
                       script_args=script_args, max_per_thread=count)

    def measure(self, key: str, side: Side, round_index: int) -> None:
        opts = self.opts
        if key == "S4-short":  # fresh conversations a run, built before the database settles
            count = math.ceil(opts.s4_turns / S4_PER_SHORT)
            shorts = side.client.conversations(count, S4_SHORT_MESSAGES)
            data = side.write(f"s4-short-{round_index}.tsv", [(u, side.tokens[u], c) for u, c in shorts])
        if not side.service.wait_idle():
            self.log(f"{key} {side.name}: turns of the previous run still in flight after 15 s")
        side.database.settle()
        if key == "S2":
            arguments = ["mode=continue", f"data={side.s2_data}"]
            if opts.warmup:
                run_wrk(side.service.url, connections=S2_CONNECTIONS, threads=S2_CONNECTIONS, duration=opts.warmup,
                        script_args=arguments)
                side.service.wait_idle()  # the warm-up's last turns still hold their conversations (409)
            run = run_wrk(side.service.url, connections=S2_CONNECTIONS, threads=S2_CONNECTIONS,
                          duration=opts.duration, script_args=arguments)
        elif key == "S4-short":
            run = self.sequential(side, ["mode=continue", f"data={data}"], opts.s4_turns)
        elif key == "S4-long":
            run = self.sequential(side, ["mode=continue", f"data={side.long_data}"], opts.s4_turns)
        else:  # nothing grows: one request after the other for --duration seconds, as S0 is time-bounded
            user, path = side.paths[key]
            run = run_wrk(side.service.url + path, connections=1, threads=1, duration=opts.duration,
                          script_args=["mode=get", f"token={side.token(user)}"])
        self.record(key, side, run)

    def run(self) -> None:
        for index in range(self.opts.runs):
            # The side that goes first alternates, so that neither always meets the machine's later state.
            order = self.sides if index % 2 == 0 else list(reversed(self.sides))
            self.orders.append({"sides": [side.name for side in order], "load": os.getloadavg()[0]})
            self.log(f"round {index + 1} of {self.opts.runs}: {' first, then '.join(self.orders[-1]['sides'])}")
            for key, _what, _number in MEASURES:
                for side in order:
                    self.measure(key, side, index)


# --- the report ----------------------------------------------------------------------------------

def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB" if size < 1e9 else f"{size / 1e9:,.2f} GB"


_SCAN = re.compile(r"(Index Only Scan|Index Scan Backward|Index Scan|Bitmap Index Scan|Bitmap Heap Scan|Seq Scan)"
                   r"( using \S+)?( on \S+)?")


def plan_cost(plan: list[str]) -> tuple[float | None, int]:
    """A plan's execution time (ms) and the shared buffers its top node touched (hit and read)."""
    milliseconds, buffers, planning = None, None, False
    for line in plan:
        planning = planning or line.startswith("Planning")
        if line.startswith("Execution Time:"):
            milliseconds = float(line.split(":")[1].split()[0])
        elif "Buffers: shared" in line and buffers is None and not planning:  # the first is the top node's
            buffers = sum(int(count) for count in re.findall(r"(?:hit|read)=(\d+)", line))
    return milliseconds, buffers or 0


def comparisons(runs: dict) -> list[dict]:
    """Each measure's medians on both sides and their ratio, > 1 meaning slower on the big database."""
    out = []
    for key, what, number in MEASURES:
        if not runs[key]["empty"] or not runs[key]["big"]:
            continue
        empty, big = report.summarize(runs[key]["empty"]), report.summarize(runs[key]["big"])
        if number == "rps":
            ratio = empty["rps"] / big["rps"]
            each = [e["rps"] / b["rps"] for e, b in zip(runs[key]["empty"], runs[key]["big"])]
        else:
            ratio = big["p50_ms"] / empty["p50_ms"]
            each = [b["p50_ms"] / e["p50_ms"] for e, b in zip(runs[key]["empty"], runs[key]["big"])]
        out.append({"key": key, "what": what, "number": number, "empty": empty, "big": big, "ratio": ratio,
                    "each": each, "met": ratio <= RATIO_TARGET})
    return out


def markdown(results: dict) -> str:
    meta, sides = results["meta"], results["sides"]
    empty, big = sides["empty"], sides["big"]
    rounds = "; ".join(" then ".join(order["sides"]) + f" (load average {order['load']:.1f})"
                       for order in results["orders"])
    lines = [f"# chatapp on a big database, {meta['date']}, commit {meta['commit']}", "",
             f"The same requests on two PostgreSQL databases built by the migrations, each with its own service: "
             f"**empty** holds only the shapes the requests need, **big** the same shapes and a bulk history "
             f"generated in SQL. {meta['runs']} round(s), the two sides taking turns going first ({rounds}); "
             f"each run starts on a settled database (VACUUM ANALYZE, CHECKPOINT). Medians over the rounds; "
             f"load: {meta['wrk']}.", "",
             "## The databases", "",
             "| | empty | big |", "|---|---:|---:|"]
    for name, label in [("conversations", "conversations"), ("messages", "messages"),
                        ("users", "users with conversations"), ("daily_usage", "daily_usage rows"),
                        ("idempotency_keys", "idempotency keys")]:
        lines.append(f"| {label} | {empty['contents'][name]:,} | {big['contents'][name]:,} |")
    lines.append(f"| database size | {_mb(empty['contents']['bytes'])} | {_mb(big['contents']['bytes'])} |")
    for table in ("conversations", "messages", "daily_usage", "idempotency_keys"):
        sizes = [side["contents"]["tables"].get(table, {"table": 0, "indexes": 0}) for side in (empty, big)]
        lines.append(f"| {table}: table / indexes | " + " | ".join(
            f"{_mb(size['table'])} / {_mb(size['indexes'])}" for size in sizes) + " |")
    lines.append(f"| fill (this run) | {empty['fill']['seconds']:.1f} s | {big['fill']['seconds']:.1f} s |")
    lines.append("")
    if big.get("kept"):
        lines.append(f"The big database was kept from an earlier run (`--big-db-keep`): filled "
                     f"{big['kept']['filled_at']} in {big['kept']['fill_seconds']:.0f} s; this run replaced its shapes.")
    else:
        steps = "; ".join(f"{name} {seconds:.1f} s" for name, seconds in big["fill"]["steps"].items())
        lines.append(f"Filling the big database took **{big['fill']['seconds']:.0f} s** "
                     f"({big['fill']['seconds'] / 60:.1f} min): {steps}.")
    lines += ["", f"Schema: {results['schema']}", "",
              "## Empty against big", "",
              f"A ratio above 1 is slower on the big database: big / empty for latencies, empty / big for "
              f"throughput. Target: <= {RATIO_TARGET:.2f}.", "",
              "| measure | what | empty | big | ratio | target | met | each round's ratio |",
              "|---|---|---:|---:|---:|---|---|---|"]
    for row in results["comparisons"]:
        if row["number"] == "rps":
            values = [f"{row[side]['rps']:,.1f} req/s" for side in ("empty", "big")]
        else:
            values = [f"{row[side]['p50_ms']:.2f} ms" for side in ("empty", "big")]
        lines.append(f"| {row['key']} {'req/s' if row['number'] == 'rps' else 'p50'} | {row['what']} | {values[0]} | "
                     f"{values[1]} | {row['ratio']:.2f} | <= {RATIO_TARGET:.2f} | {'yes' if row['met'] else '**no**'} | "
                     f"{', '.join(f'{ratio:.2f}' for ratio in row['each'])} |")
    failing = [f"{key} {side}" for key, by_side in results["runs"].items() for side, runs in by_side.items()
               if any(run["non2xx"] or run["socket_errors"] for run in runs)]
    lines += ["", f"Non-2xx answers and socket errors: {', '.join(failing) if failing else 'none, in every run'}."]
    lines += ["", "## Plans", "",
              "`EXPLAIN (ANALYZE, BUFFERS)` of the history endpoints' statements (chatapp/queries.py's functions, "
              "with the requests' values), after the measurements: the time and the buffers each read on both "
              "databases, then the big database's plans.", "",
              "| statement | empty: ms, buffers | big: ms, buffers | big: scans |", "|---|---:|---:|---|"]
    by_side = {side: {plan["name"]: plan["plan"] for plan in results["plans"].get(side, [])}
               for side in ("empty", "big")}
    for name, plan in by_side["big"].items():
        cells = []
        for side in ("empty", "big"):
            milliseconds, buffers = plan_cost(by_side[side].get(name, []))
            cells.append("-" if milliseconds is None else f"{milliseconds:.3f}, {buffers}")
        scans = sorted({match.group(0) for line in plan for match in [_SCAN.search(line)] if match})
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {'; '.join(scans)} |")
    lines.append("")
    for name, plan in by_side["big"].items():
        lines += [f"- {name}:", "", "  ```", *(f"  {line}" for line in plan), "  ```", ""]
    notes = results.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Runs", "", "| measure | round | side | req/s | p50 ms | p99 ms | requests | non-2xx | socket errors |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, by_side in results["runs"].items():
        for index in range(max(len(runs) for runs in by_side.values())):
            for side in ("empty", "big"):
                if index < len(by_side[side]):
                    run = by_side[side][index]
                    lines.append(f"| {key} | {index + 1} | {side} | {run['rps']:,.1f} | {run['p50_ms']:.2f} | "
                                 f"{run['p99_ms']:.2f} | {run['requests']} | {report.non2xx_text(run)} | "
                                 f"{run['socket_errors']} |")
    lines += ["", "## Machine and settings", ""]
    lines += [f"- {name}: {value}" for name, value in meta["machine"].items()]
    lines += [f"- {name}: {value}" for name, value in meta["settings"].items()]
    return "\n".join(lines) + "\n"


# --- the run -------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--big-db", action="store_true",
                        help="instead of the scenarios: S2, S4 and the history endpoints on an empty and on a big "
                             "database, side by side (bench/big_db.py)")
    parser.add_argument("--big-db-conversations", type=int, default=BULK_CONVERSATIONS, metavar="N",
                        help=f"the big database's bulk: N conversations, 10 N messages, N / 10 users "
                             f"(default {BULK_CONVERSATIONS:,})")
    parser.add_argument("--big-db-keep", action="store_true",
                        help="keep the big database at the end, and reuse one kept by an earlier run "
                             "(its fill takes minutes)")


def main(opts) -> int:
    from run import USERS, Client, command_output, commit_of, log, machine_info  # run.py's own, when it runs us
    from stub import nginx_binary
    from loadgen import wrk_binary

    if opts.sqlite:
        print("bench: --big-db needs PostgreSQL (--pg-url)", file=sys.stderr)
        return 2
    if not 0 <= opts.big_db_conversations < SHAPES[0][0]:
        print(f"bench: --big-db-conversations must be from 0 to {SHAPES[0][0] - 1:,}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="chatapp-bench-big-db-"))
    commit, dirty = commit_of(opts.app_dir)
    started = datetime.now(timezone.utc)
    stub, sides = None, []
    try:
        stub = AgentStub(workdir).start()
        sides = [Side("empty", 0, opts, workdir), Side("big", opts.big_db_conversations, opts, workdir)]
        for side in sides:
            side.prepare(stub, log)
        empty, big = sides
        differences = schema_differences(schema_of(empty.database.url), schema_of(big.database.url))
        if differences:
            raise RuntimeError("the filled database's schema is not the migrations':\n" + "\n".join(differences))
        schema = schema_of(big.database.url)
        for side in sides:
            side.start(Client, USERS, log)
        machine = machine_info(big.database)  # the load average before the measurements
        bench = BigDbBench(opts, sides, log)
        bench.run()
        log("EXPLAIN of the history endpoints' statements on both databases")
        plans = {}
        for side in sides:
            try:
                plans[side.name] = history_plans(opts.app_dir, side.database.url, side.long_id,
                                                 tuple(side.deep_position), side.export_id, *side.usage_range)
            except Exception as error:  # the measurements stand without them
                plans[side.name] = [{"name": "all", "plan": [f"not explained: {type(error).__name__}: {error}"]}]
        results = {
            "sides": {side.name: {"contents": side.contents, "fill": side.filled, "kept": side.kept} for side in sides},
            "schema": (f"the big database's columns, constraints, indexes and migration are exactly the empty one's "
                       f"(the migrations': {len(schema['columns'])} columns, {len(schema['constraints'])} "
                       f"constraints, {len(schema['indexes'])} indexes, migration {schema['migration'][0][0]})."),
            "runs": bench.runs,
            "orders": bench.orders,
            "comparisons": comparisons(bench.runs),
            "plans": plans,
            "notes": [
                f"S4: {opts.s4_turns} sequential turns a run on each side; the short side uses fresh conversations "
                f"of {S4_SHORT_MESSAGES} messages built through the API, the long side the generated conversation, "
                f"which grows by {2 * opts.s4_turns} messages a run on both sides.",
                f"The history requests: one after the other for {opts.duration} s a run (wrk, 1 connection).",
            ],
            "meta": {
                "date": started.strftime("%Y-%m-%d %H:%M UTC"),
                "commit": commit + (" (with uncommitted changes)" if dirty else ""),
                "runs": opts.runs,
                "wrk": command_output([wrk_binary(), "-v"]).splitlines()[0].split(" [")[0],
                "machine": machine,
                "settings": {
                    "WEB_CONCURRENCY (gunicorn workers)": f"{opts.workers} a service",
                    "GUNICORN_THREADS (gthread threads per worker)": opts.threads,
                    "services": "one a database, both running throughout; CHATAPP_ENV=production, as run.py starts them",
                    "extra service settings": ", ".join(opts.env) or "none",
                    "app checkout": "this one" if opts.app_dir.resolve() == ROOT else f"another ({opts.app_dir.name})",
                    "agent stub": "nginx " + command_output([nginx_binary(), "-v"]).replace("nginx version: nginx/", "")
                                  + ", instant",
                    "S2": f"a run of {opts.duration} s a round after {opts.warmup} s of warm-up, "
                          f"{S2_CONNECTIONS} threads x 1 connection",
                },
            },
        }
        text = markdown(results)
        print(text)
        if not opts.no_results_file:
            log(f"written to {report.write_results(text, opts.output, started, commit, '-big-db')}")
        if opts.json:
            opts.json.write_text(json.dumps(results, indent=2, default=str))
        return 0
    except Exception:
        for side in sides:
            if side.service is not None:
                print(f"--- {side.name}: gunicorn log (tail) ---\n{side.service.log_tail()}", file=sys.stderr)
        raise
    finally:
        for side in sides:
            keep = opts.big_db_keep and side.bulk > 0
            side.stop(keep_database=keep)
            if keep and side.filled is not None:
                log(f"kept database {side.database.name} for the next --big-db --big-db-keep run")
        if stub is not None:
            stub.stop()
        if opts.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
