"""Usage and budgets: what each user spent, counted in the turn's own transaction, and the token
budget checked before the agent (on SQLite and PostgreSQL, with the clock moved by the test)."""
import json
import math
import os
import time
import uuid
from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select, text

from chatapp.extensions import db
from chatapp.models import DailyUsage, Message, TokenBudget
from tests.support.agent import USAGE, Reply, Stream
from tests.support.assertions import assert_error, metric, sse_events
from tests.test_chat_api import dialect

SYSTEM_PROMPT = "You are terse."
ECHO_TOKENS = USAGE["prompt_tokens"] + USAGE["completion_tokens"]  # what the test agent reports a turn


class Clock:
    """The app's clock (the CLOCK setting), moved by the test; it answers in a time zone far from
    UTC, so that code that took its date without converting would count the wrong day."""

    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now.astimezone(timezone(timedelta(hours=14)))

    def move_to(self, iso: str) -> None:
        self.now = datetime.fromisoformat(iso)


@pytest.fixture
def clock():
    return Clock(datetime(2026, 3, 14, 12, 0, tzinfo=timezone.utc))


@pytest.fixture
def budget():
    """TOKEN_BUDGET for the test (None: no budget)."""
    return None


@pytest.fixture
def config_overrides(clock, budget):
    return {"CLOCK": clock, "TOKEN_BUDGET": budget, "AGENT_SYSTEM_PROMPT": SYSTEM_PROMPT}


@pytest.fixture
def get_usage(client, auth):
    def get(user_id="alice", **params):
        return client.get(f"/api/{user_id}/usage", query_string=params, headers=auth.headers(user_id))

    return get


@pytest.fixture
def set_budget(app):
    def run(user_id, tokens):
        result = app.test_cli_runner().invoke(args=["set-budget", user_id, tokens])
        assert result.exit_code == 0, result.output
        return result.output

    return run


def counters(app, user_id="alice"):
    """The user's daily_usage rows: {day: (turns, prompt, completion, estimated)}."""
    with app.app_context():
        rows = db.session.execute(select(DailyUsage).where(DailyUsage.user_id == user_id)).scalars().all()
        found = {row.day: (row.turns, row.prompt_tokens, row.completion_tokens, row.estimated_turns) for row in rows}
        db.session.remove()
    return found


def expected_from_messages(app, user_id="alice", system_prompt=SYSTEM_PROMPT):
    """(turns, prompt, completion, estimated) summed over the user's stored answers: each one's
    reported usage, or ceil(characters / 4) of what the agent was sent (the system prompt and every
    earlier message: the tests stay under the context limits) and of the answer."""
    from chatapp.models import Conversation

    turns = prompt = completion = estimated = 0
    with app.app_context():
        conversations = db.session.scalars(select(Conversation.id).where(Conversation.user_id == user_id)).all()
        for conversation_id in conversations:
            messages = db.session.execute(select(Message).where(Message.conversation_id == conversation_id)
                                          .order_by(Message.seq)).scalars().all()
            for index, message in enumerate(messages):
                if message.role != "assistant":
                    continue
                turns += 1
                reported = message.usage or {}
                if all(type(reported.get(name)) is int and reported[name] >= 0 for name in ("prompt_tokens", "completion_tokens")):
                    prompt += reported["prompt_tokens"]
                    completion += reported["completion_tokens"]
                    continue
                estimated += 1
                sent = len(system_prompt) + sum(len(earlier.content) for earlier in messages[:index])
                prompt += math.ceil(sent / 4)
                completion += math.ceil(len(message.content) / 4)
        db.session.remove()
    return turns, prompt, completion, estimated


def totals(rows):
    return tuple(sum(row[index] for row in rows.values()) for index in range(4))


def stream_turn(chat, body, **kwargs):
    response = chat.post({**body, "stream": True}, **kwargs)
    assert response.status_code == 200, response.data
    found = sse_events(response.get_data(as_text=True))
    return found[-1][1], json.loads(found[-1][2])


# --- counting ---------------------------------------------------------------------------------


def test_counters_equal_the_stored_answers_after_a_mixed_run(app, chat, agent_server, get_usage):
    # Blocking turns with usage (the echo agent's), without, with usage the counters cannot take.
    first = chat.turn("Hello there")["conversation_id"]
    agent_server.enqueue(Reply("no usage reported"))
    chat.turn("and again", conversation_id=first)
    agent_server.enqueue(Reply("half a usage", usage={"prompt_tokens": 5}))
    chat.turn("third", conversation_id=first)
    agent_server.enqueue(Reply("nonsense usage", usage={"prompt_tokens": True, "completion_tokens": -1}))
    chat.turn("fourth")
    # Streamed turns with and without usage.
    agent_server.enqueue(Stream(("a ", "streamed ", "answer")))
    assert stream_turn(chat, {"message": "stream it", "conversation_id": first})[0] == "done"
    agent_server.enqueue(Stream(("unreported ", "stream"), usage=None))
    assert stream_turn(chat, {"message": "stream it again"})[0] == "done"
    # Failures count nothing: a blocking 503, a stream failing before and after its first piece.
    agent_server.enqueue(Reply(status=500))
    assert_error(chat.post({"message": "fails", "conversation_id": first}), 503, "agent_unavailable")
    agent_server.enqueue(Stream(("cut",), fail_after=1))
    assert stream_turn(chat, {"message": "breaks mid-way"})[0] == "error"
    # Replays count nothing, blocking or streamed.
    keyed = chat.turn("with a key", headers={"Idempotency-Key": "k1"})
    for _ in range(3):
        assert chat.post({"message": "with a key"}, headers={"Idempotency-Key": "k1"}).get_json() == keyed
    assert stream_turn(chat, {"message": "with a key"}, headers={"Idempotency-Key": "k1"})[0] == "done"

    rows = counters(app)
    assert list(rows) == [date(2026, 3, 14)]
    expected = expected_from_messages(app)
    assert totals(rows) == expected
    assert expected[0] == 7 and expected[3] == 4  # 7 stored turns; 4 without a usable report
    body = get_usage().get_json()
    turns, prompt, completion, estimated = expected
    assert (body["turns"], body["prompt_tokens"], body["completion_tokens"], body["estimated_turns"]) == expected
    assert body["total_tokens"] == prompt + completion
    assert body["days"] == [{"date": "2026-03-14", "turns": turns, "prompt_tokens": prompt,
                             "completion_tokens": completion, "total_tokens": prompt + completion}]


def test_an_agent_reporting_no_usage_is_estimated_from_characters(app, chat, agent_server, get_usage):
    agent_server.enqueue(Reply("x" * 9))  # 9 characters: 3 tokens
    conversation_id = chat.turn("12345")["conversation_id"]  # sent: the system prompt (14) and 5 characters
    assert counters(app) == {date(2026, 3, 14): (1, math.ceil(19 / 4), 3, 1)}

    agent_server.enqueue(Reply("y" * 8))
    chat.turn("abc", conversation_id=conversation_id)  # sent: 14 + 5 + 9 + 3 = 31 characters
    assert counters(app) == {date(2026, 3, 14): (2, 5 + 8, 3 + 2, 2)}
    # The agent's own report, when it has one, is what counts; and the history shows it as reported.
    chat.turn("reported", conversation_id=conversation_id)
    assert counters(app) == {date(2026, 3, 14): (3, 13 + USAGE["prompt_tokens"], 5 + USAGE["completion_tokens"], 2)}
    assert get_usage().get_json()["estimated_turns"] == 2


def test_history_shows_each_answers_usage_and_model(chat, agent_server, client, auth):
    agent_server.enqueue(Reply("none reported"))
    conversation_id = chat.turn("first")["conversation_id"]
    chat.turn("second", conversation_id=conversation_id)
    messages = client.get(f"/api/alice/conversations/{conversation_id}/messages", headers=auth.headers()).get_json()["messages"]
    assert [(m["role"], m.get("usage", "absent"), m.get("model", "absent")) for m in messages] == [
        ("user", "absent", "absent"), ("assistant", None, "gpt-4"),
        ("user", "absent", "absent"), ("assistant", USAGE, "gpt-4")]


def test_tokens_are_counted_in_the_metrics_by_model_and_kind(chat, agent_server, client):
    before = client.get("/metrics").get_data(as_text=True)
    chat.turn("hello")
    agent_server.enqueue(Reply("abcd"))
    chat.turn("hello")
    after = client.get("/metrics").get_data(as_text=True)

    def added(kind):
        return (metric(after, "chatapp_tokens_total", model="gpt-4", kind=kind)
                - metric(before, "chatapp_tokens_total", model="gpt-4", kind=kind))

    estimated_prompt = math.ceil((len(SYSTEM_PROMPT) + len("hello")) / 4)
    assert added("prompt") == USAGE["prompt_tokens"] + estimated_prompt
    assert added("completion") == USAGE["completion_tokens"] + 1


def test_model_labels_are_capped(monkeypatch):
    from chatapp import metrics

    monkeypatch.setattr(metrics, "_model_labels", set())
    labels = [metrics.model_label(f"model-{n}") for n in range(metrics.MODEL_LABELS_MAX + 5)]
    assert labels[:metrics.MODEL_LABELS_MAX] == [f"model-{n}" for n in range(metrics.MODEL_LABELS_MAX)]
    assert set(labels[metrics.MODEL_LABELS_MAX:]) == {"other"}
    assert metrics.model_label("model-0") == "model-0"


@pytest.mark.parametrize("budget", [None, "1000 per month"])
def test_a_turns_statements_do_not_grow_with_the_users_usage_history(app, chat, count_statements, budget):
    conversation_id = chat.turn("start")["conversation_id"]
    with app.app_context():  # a month of earlier days with turns
        db.session.add_all(DailyUsage(user_id="alice", day=date(2026, 3, day), turns=1, prompt_tokens=1,
                                      completion_tokens=1, estimated_turns=0) for day in range(1, 14))
        db.session.commit()
        db.session.remove()
    with count_statements() as counter:
        chat.turn("next", conversation_id=conversation_id)
    # On PostgreSQL the claim with the history, and the turn stored with the day's counters; on
    # SQLite the claim, the history, the message count, the day's counters, the messages. With a
    # budget, one more: the period's usage and the user's own limit, read together.
    turn_statements = {"postgresql": 2, "sqlite": 5}[dialect(app)]
    assert len(counter.statements) == turn_statements + (budget is not None), counter.statements
    assert sum("daily_usage" in statement for statement in counter.statements) == 1 + (budget is not None)


# --- the budget -------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["20 per day"])
def test_a_user_at_the_limit_gets_429_until_the_next_day(app, chat, agent_server, store, clock, set_budget, get_usage):
    keyed = chat.turn("one", headers={"Idempotency-Key": "first"})  # 7 tokens
    chat.turn("two")  # 14
    chat.turn("three")  # 21: past the limit, which a turn already running may pass
    calls, counts = len(agent_server.requests), store.counts()

    clock.move_to("2026-03-14T23:59:30+00:00")
    refused = chat.post({"message": "four"})
    assert_error(refused, 429, "quota_exceeded")
    assert refused.headers["Retry-After"] == "30"
    streamed = chat.post({"message": "four", "stream": True})  # refused before any stream begins
    assert_error(streamed, 429, "quota_exceeded")
    assert len(agent_server.requests) == calls and store.counts() == counts
    # A new key is refused and kept by nobody; an earlier key's answer is replayed, at no cost.
    assert_error(chat.post({"message": "new"}, headers={"Idempotency-Key": "second"}), 429, "quota_exceeded")
    replay = chat.post({"message": "one"}, headers={"Idempotency-Key": "first"})
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == keyed
    # Another user is not affected.
    assert chat.post({"message": "hi"}, user_id="bob").status_code == 200
    assert len(agent_server.requests) == calls + 1

    clock.move_to("2026-03-15T00:00:00+00:00")
    assert chat.post({"message": "new"}, headers={"Idempotency-Key": "second"}).status_code == 200
    assert counters(app) == {date(2026, 3, 14): (3, 9, 12, 0), date(2026, 3, 15): (1, 3, 4, 0)}


@pytest.mark.parametrize("budget", ["20 per month"])
def test_a_monthly_budget_resets_on_the_first_of_the_next_month(chat, clock):
    clock.move_to("2026-01-31T10:00:00+00:00")
    for _ in range(3):
        chat.turn("spend")
    clock.move_to("2026-01-31T23:59:59.500000+00:00")
    refused = chat.post({"message": "more"})
    assert_error(refused, 429, "quota_exceeded")
    assert refused.headers["Retry-After"] == "1"  # half a second, rounded up
    clock.move_to("2026-02-01T00:00:00+00:00")
    assert chat.post({"message": "more"}).status_code == 200


@pytest.mark.parametrize("budget", ["20 per month"])
def test_the_days_of_a_month_add_up_against_its_budget(chat, clock):
    clock.move_to("2026-04-01T00:00:00+00:00")
    chat.turn("day one")
    clock.move_to("2026-04-15T12:00:00+00:00")
    chat.turn("day fifteen")
    clock.move_to("2026-04-30T23:00:00+00:00")
    chat.turn("day thirty")  # 21
    refused = chat.post({"message": "more"})
    assert_error(refused, 429, "quota_exceeded")
    assert refused.headers["Retry-After"] == "3600"


@pytest.mark.parametrize("budget", ["20 per day"])
def test_a_users_own_limit_overrides_the_default(chat, set_budget, get_usage):
    for _ in range(3):
        chat.turn("spend")
    assert_error(chat.post({"message": "more"}), 429, "quota_exceeded")

    assert set_budget("alice", "unlimited") == "alice: unlimited a day\n"
    for _ in range(2):
        chat.turn("more")
    assert get_usage().get_json()["budget"] is None  # no limit applies to her

    set_budget("alice", "50")  # 35 used
    chat.turn("more")  # 42
    chat.turn("more")  # 49
    chat.turn("more")  # 56
    assert_error(chat.post({"message": "more"}), 429, "quota_exceeded")
    assert get_usage().get_json()["budget"] == {"limit": 50, "period": "day", "used": 56, "remaining": 0,
                                               "resets_at": "2026-03-15T00:00:00+00:00"}

    set_budget("bob", "0")  # nothing at all for bob
    assert_error(chat.post({"message": "hi"}, user_id="bob"), 429, "quota_exceeded")
    assert "had none of their own" not in set_budget("bob", "default")
    assert chat.post({"message": "hi"}, user_id="bob").status_code == 200

    set_budget("alice", "default")
    assert_error(chat.post({"message": "more"}), 429, "quota_exceeded")
    assert set_budget("alice", "default") == "alice: TOKEN_BUDGET's limit (20 tokens); they had none of their own\n"


@pytest.mark.parametrize("budget", ["unlimited per month"])
def test_an_unlimited_default_limits_only_the_users_given_a_limit(chat, set_budget):
    set_budget("alice", "10")
    chat.turn("one")
    chat.turn("two")  # 14
    assert_error(chat.post({"message": "three"}), 429, "quota_exceeded")
    for _ in range(3):
        chat.turn("no limit for bob", user_id="bob")


def test_set_budget_refuses_what_it_cannot_store(app):
    runner = app.test_cli_runner()
    for args in (["alice", "-5"], ["alice", "lots"], ["alice", "1.5"], ["alice", str(2**63)], ["a/b", "10"],
                 ["x" * 256, "10"], ["alice", "１０"]):
        result = runner.invoke(args=["set-budget", *args])
        assert result.exit_code == 2, (args, result.output)  # click's usage error: nothing stored
    result = runner.invoke(args=["set-budget", "alice", "10"])
    assert result.exit_code == 0
    assert "TOKEN_BUDGET is unset" in result.output  # said, since no budget applies without it
    with app.app_context():
        assert [(row.user_id, row.token_limit) for row in db.session.scalars(select(TokenBudget))] == [("alice", 10)]
        db.session.remove()


# --- GET /usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["100 per day"])
def test_usage_defaults_to_the_budget_period_and_lists_days_with_turns(chat, clock, get_usage):
    clock.move_to("2026-03-10T08:00:00+00:00")
    chat.turn("earlier")
    clock.move_to("2026-03-14T08:00:00+00:00")
    chat.turn("today")
    chat.turn("today again")
    body = get_usage().get_json()
    assert body == {
        "from": "2026-03-14", "to": "2026-03-14", "turns": 2, "prompt_tokens": 6, "completion_tokens": 8,
        "total_tokens": 14, "estimated_turns": 0,
        "days": [{"date": "2026-03-14", "turns": 2, "prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}],
        "budget": {"limit": 100, "period": "day", "used": 14, "remaining": 86, "resets_at": "2026-03-15T00:00:00+00:00"},
    }
    month = get_usage(**{"from": "2026-03-01", "to": "2026-03-31"}).get_json()
    assert [day["date"] for day in month["days"]] == ["2026-03-10", "2026-03-14"]
    assert month["turns"] == 3 and month["budget"]["used"] == 14  # the budget block is always today's


def test_usage_without_a_budget_defaults_to_the_utc_month(chat, clock, get_usage):
    clock.move_to("2026-02-28T23:30:00+00:00")
    chat.turn("last day of february")
    body = get_usage().get_json()
    assert (body["from"], body["to"], body["turns"], body["budget"]) == ("2026-02-01", "2026-02-28", 1, None)
    assert get_usage(user_id="bob").get_json()["days"] == []  # alice's usage is hers


@pytest.mark.parametrize("params, field", [
    ({"from": "2026-13-01", "to": "2026-12-31"}, "from"),
    ({"from": "2026-02-30", "to": "2026-03-01"}, "from"),
    ({"from": "2026-1-5", "to": "2026-03-01"}, "from"),
    ({"from": "20260105", "to": "2026-03-01"}, "from"),
    ({"from": "2026-01-01T00:00:00", "to": "2026-03-01"}, "from"),
    ({"from": "yesterday", "to": "2026-03-01"}, "from"),
    ({"from": "2026-01-01", "to": ""}, "to"),
    ({"from": "2026-03-02", "to": "2026-03-01"}, "from"),  # from after to
    ({"from": "2025-01-01", "to": "2026-01-02"}, "to"),  # 367 days, both ends included
    ({"from": "2026-04-15"}, "from"),  # after the default `to`, the end of March
    ({"from": "2026-01-01", "to": "2026-01-02", "user": "bob"}, "user"),
])
def test_usage_query_is_validated(get_usage, params, field):
    body = assert_error(get_usage(**params), 400, "invalid_request")
    assert list(body["errors"]) == [field], body


def test_usage_ranges_of_366_days_are_fine(chat, get_usage):
    chat.turn("hello")
    assert get_usage(**{"from": "2026-01-01", "to": "2026-12-31"}).get_json()["turns"] == 1
    assert get_usage(**{"from": "2024-01-01", "to": "2024-12-31"}).status_code == 200  # a leap year: 366 days
    assert get_usage(**{"from": "2025-01-01", "to": "2026-01-01"}).status_code == 200  # 366 days
    assert get_usage(**{"from": "2026-03-15", "to": "2026-03-15"}).get_json()["turns"] == 0


def test_usage_needs_the_users_own_token(client, auth):
    assert_error(client.get("/api/alice/usage"), 401, "authentication_required")
    assert_error(client.get("/api/alice/usage", headers=auth.headers("bob")), 403, "forbidden")
    assert_error(client.get("/api/alice/usage", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    # Validation comes first, as everywhere.
    assert_error(client.get("/api/alice/usage?from=nope"), 400, "invalid_request")
    assert_error(client.post("/api/alice/usage", headers=auth.headers()), 405, "method_not_allowed")


# --- time zones -------------------------------------------------------------------------------


@pytest.fixture
def far_time_zones(app, request):
    """The app's process in UTC+14 and, on PostgreSQL, the database's sessions in UTC-8 (UTC-7 in
    summer): only code that keeps to UTC counts the right day."""
    previous = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Kiritimati"
    time.tzset()
    with app.app_context():
        engine = db.engine

    def set_database_time_zone(dbapi_connection, _record):
        if type(dbapi_connection).__module__.startswith("psycopg"):
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'America/Los_Angeles'")
            dbapi_connection.commit()

    event.listen(engine, "connect", set_database_time_zone)
    engine.dispose()  # new connections, each set as above
    with app.app_context():
        if engine.dialect.name == "postgresql":
            assert db.session.scalar(text("SHOW TimeZone")) == "America/Los_Angeles"
        db.session.remove()
    assert time.localtime().tm_gmtoff == 14 * 3600
    yield
    event.remove(engine, "connect", set_database_time_zone)  # the app's teardown closes its connections
    if previous is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = previous
    time.tzset()


@pytest.mark.parametrize("budget", ["14 per month"])
def test_day_and_month_boundaries_are_utcs_whatever_the_time_zones(app, chat, clock, get_usage, far_time_zones):
    clock.move_to("2026-01-31T23:59:59+00:00")  # already February 1st in UTC+14
    chat.turn("last second of january")  # 7
    clock.move_to("2026-02-01T00:00:00+00:00")  # still January 31st in UTC-8
    chat.turn("first second of february")
    chat.turn("another")  # 14 in February
    assert counters(app) == {date(2026, 1, 31): (1, 3, 4, 0), date(2026, 2, 1): (2, 6, 8, 0)}

    refused = chat.post({"message": "over"})
    assert_error(refused, 429, "quota_exceeded")
    assert refused.headers["Retry-After"] == str(28 * 24 * 3600)  # to March 1st, 00:00 UTC
    body = get_usage().get_json()
    assert (body["from"], body["to"], body["turns"]) == ("2026-02-01", "2026-02-28", 2)
    assert body["budget"]["resets_at"] == "2026-03-01T00:00:00+00:00"
    january = get_usage(**{"from": "2026-01-31", "to": "2026-01-31"}).get_json()
    assert january["turns"] == 1
    with app.app_context():  # the answers' times are stored in UTC too
        stored = db.session.scalars(select(Message.created_at).where(Message.role == "assistant").order_by(Message.created_at)).all()
        db.session.remove()
    assert [moment.isoformat() for moment in stored] == [
        "2026-01-31T23:59:59+00:00", "2026-02-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"]
