"""Regenerating a conversation's latest answer: the agent answers again up to the latest user
message, and the new answer replaces the latest one at its seq, with a turn's claims, idempotency
keys, streams, budget and failure guarantees (on SQLite and PostgreSQL)."""
import json
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select, update

from chatapp.extensions import db
from chatapp.models import Conversation, DailyUsage, IdempotencyKey, Message
from tests.support.agent import USAGE, Reply, Stream
from tests.support.assertions import assert_error, sse_events


@pytest.fixture
def regenerate(client, auth):
    def post(conversation_id, body=None, user_id="alice", headers=None, **kwargs):
        request_headers = {**auth.headers(user_id), **(headers or {})}
        return client.post(f"/api/{user_id}/conversations/{conversation_id}/regenerate", json=body,
                           headers=request_headers, **kwargs)

    return post


@pytest.fixture
def conversation(chat, agent_server):
    """A conversation of two turns: its id and its ChatResponses."""
    first = chat.turn("What is a haiku?")
    second = chat.turn("Write one", conversation_id=first["conversation_id"])
    return first["conversation_id"], first, second


def stored(app, conversation_id):
    """(seq, role, content, message id, feedback rating) of each stored message, and the conversation's row."""
    with app.app_context():
        rows = db.session.execute(
            select(Message.seq, Message.role, Message.content, Message.id, Message.feedback_rating)
            .where(Message.conversation_id == uuid.UUID(conversation_id)).order_by(Message.seq)
        ).all()
        row = db.session.get(Conversation, uuid.UUID(conversation_id))
        found = [tuple(r) for r in rows], (row.message_count, row.updated_at, row.claim_token)
        db.session.remove()
    return found


def test_the_new_answer_replaces_the_latest_at_its_seq(app, conversation, regenerate, agent_server, client, auth):
    conversation_id, first, second = conversation
    agent_server.enqueue(Reply("An old pond; a frog jumps in", usage={"prompt_tokens": 20, "completion_tokens": 9}))
    response = regenerate(conversation_id)
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert body["conversation_id"] == conversation_id and body["role"] == "assistant"
    assert body["message"] == "An old pond; a frog jumps in" and body["finish_reason"] == "stop"
    assert body["message_id"] != second["message_id"] and body["usage"] == {"prompt_tokens": 20, "completion_tokens": 9}
    # The agent saw the conversation up to its latest user message, and not the answer it replaces.
    assert agent_server.requests[-1].json["messages"] == [
        {"role": "user", "content": "What is a haiku?"}, {"role": "assistant", "content": first["message"]},
        {"role": "user", "content": "Write one"}]
    messages, (count, _updated, claim) = stored(app, conversation_id)
    assert [(seq, role, content) for seq, role, content, _, _ in messages] == [
        (1, "user", "What is a haiku?"), (2, "assistant", first["message"]), (3, "user", "Write one"),
        (4, "assistant", "An old pond; a frog jumps in")]
    assert str(messages[3][3]) == body["message_id"] and count == 4 and claim is None
    history = client.get(f"/api/alice/conversations/{conversation_id}/messages", headers=auth.headers()).get_json()
    assert history["messages"][-1]["message_id"] == body["message_id"]
    assert history["messages"][-1]["content"] == body["message"]
    # Regenerated again: the next answer replaces that one.
    again = regenerate(conversation_id).get_json()
    assert [content for _, _, content, _, _ in stored(app, conversation_id)[0]][-1] == again["message"] == "You said: Write one"


def test_the_old_answers_feedback_goes_with_it(app, conversation, regenerate):
    conversation_id, _first, second = conversation
    with app.app_context():
        db.session.execute(update(Message).where(Message.id == uuid.UUID(second["message_id"]))
                           .values(feedback_rating="dislike", feedback_comment="too long", feedback_at=datetime.now(timezone.utc)))
        db.session.commit()
        db.session.remove()
    assert regenerate(conversation_id).status_code == 200
    messages, _ = stored(app, conversation_id)
    assert [rating for *_, rating in messages] == [None, None, None, None]
    with app.app_context():
        assert db.session.get(Message, uuid.UUID(second["message_id"])) is None
        db.session.remove()


def test_failures_change_nothing(app, conversation, regenerate, agent_server):
    conversation_id, _first, _second = conversation
    before = stored(app, conversation_id)
    with app.app_context():
        counters_before = db.session.execute(select(DailyUsage.turns, DailyUsage.prompt_tokens)).all()
        db.session.remove()
    agent_server.enqueue(Reply(status=500))
    assert_error(regenerate(conversation_id, headers={"Idempotency-Key": "failing"}), 503, "agent_unavailable")
    agent_server.enqueue(Stream(("half", " an answer"), fail_after=1))
    streamed = regenerate(conversation_id, {"stream": True})
    assert [event for _, event, _ in sse_events(streamed.get_data(as_text=True))] == ["delta", "error"]
    assert stored(app, conversation_id) == before  # same messages, ids, count and updated_at; not claimed
    with app.app_context():
        assert db.session.execute(select(DailyUsage.turns, DailyUsage.prompt_tokens)).all() == counters_before
        assert db.session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0  # the failed key is not kept
        db.session.remove()
    assert regenerate(conversation_id, headers={"Idempotency-Key": "failing"}).status_code == 200  # runs anew


def test_a_turn_in_flight_makes_it_busy(app, conversation, chat, agent_server, auth):
    conversation_id, *_ = conversation
    other, seen = app.test_client(), []
    url = f"/api/alice/conversations/{conversation_id}/regenerate"
    agent_server.on_request = lambda _request: seen.append(other.post(url, headers=auth.headers())) if not seen else None
    assert chat.post({"message": "meanwhile", "conversation_id": conversation_id}).status_code == 200
    assert_error(seen[0], 409, "conversation_busy")
    assert len(agent_server.requests) == 3  # the busy regeneration called no agent
    assert [content for _, _, content, _, _ in stored(app, conversation_id)[0]][-2:] == ["meanwhile", "You said: meanwhile"]


def test_a_key_replays_and_is_the_regenerations_own(conversation, regenerate, chat, agent_server):
    conversation_id, *_ = conversation
    headers = {"Idempotency-Key": "regen-1"}
    first = regenerate(conversation_id, headers=headers)
    calls = len(agent_server.requests)
    replay = regenerate(conversation_id, headers=headers)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == first.data and len(agent_server.requests) == calls
    # The body's request_id is the same key; an empty body and an empty object are the same request.
    assert regenerate(conversation_id, {"request_id": "regen-1"}).data == first.data
    # Another model, or a chat turn, under the same key is another request.
    assert_error(regenerate(conversation_id, {"model": "gpt-3.5"}, headers=headers), 422, "idempotency_key_reused")
    assert_error(chat.post({"message": "hi", "conversation_id": conversation_id}, headers=headers), 422, "idempotency_key_reused")
    streamed = regenerate(conversation_id, {"stream": True}, headers=headers)
    assert streamed.headers["Idempotent-Replayed"] == "true"
    assert [event for _, event, _ in sse_events(streamed.get_data(as_text=True))] == ["delta", "done"]
    assert len(agent_server.requests) == calls


def test_a_streamed_regeneration(app, conversation, regenerate, agent_server):
    conversation_id, _first, second = conversation
    agent_server.enqueue(Stream(("Moon", " over ", "water")))
    response = regenerate(conversation_id, {"stream": True})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    found = sse_events(response.get_data(as_text=True))
    assert [(event_id, event) for event_id, event, _ in found] == [(1, "delta"), (2, "delta"), (3, "delta"), (4, "done")]
    done = json.loads(found[-1][2])
    assert done["message"] == "Moon over water" and done["message_id"] != second["message_id"] and done["usage"] == USAGE
    assert agent_server.requests[-1].json["stream"] is True
    assert [content for _, _, content, _, _ in stored(app, conversation_id)[0]][-1] == "Moon over water"


def test_it_counts_as_a_turn_and_is_refused_past_the_budget(app, conversation, regenerate):
    conversation_id, *_ = conversation
    regenerate(conversation_id)
    with app.app_context():
        assert db.session.execute(select(DailyUsage.turns, DailyUsage.prompt_tokens, DailyUsage.completion_tokens)).one() == (
            3, 3 * USAGE["prompt_tokens"], 3 * USAGE["completion_tokens"])
        db.session.remove()


@pytest.mark.parametrize("config_overrides", [{"TOKEN_BUDGET": "14 per day"}])
def test_a_user_past_the_budget_cannot_regenerate(app, conversation, regenerate, agent_server):
    conversation_id, *_ = conversation
    calls, before = len(agent_server.requests), stored(app, conversation_id)
    assert_error(regenerate(conversation_id), 429, "quota_exceeded")
    assert len(agent_server.requests) == calls and stored(app, conversation_id) == before


def test_what_cannot_be_regenerated_is_404(app, conversation, regenerate, chat):
    assert_error(regenerate(str(uuid.uuid4())), 404, "conversation_not_found")
    assert_error(regenerate("not-a-uuid"), 404, "conversation_not_found")
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    assert_error(regenerate(bobs), 404, "conversation_not_found")
    empty = uuid.uuid4()
    with app.app_context():  # a conversation without an answer (none is stored so, but a row may say so)
        db.session.add(Conversation(id=empty, user_id="alice", title="empty", message_count=0))
        db.session.commit()
        db.session.remove()
    assert_error(regenerate(str(empty)), 404, "message_not_found")
    with app.app_context():
        assert db.session.get(Conversation, empty).claim_token is None  # given back
        db.session.remove()


@pytest.mark.parametrize("body, field", [
    ({"stream": "true"}, "stream"),
    ({"model": ""}, "model"),
    ({"model": 4}, "model"),
    ({"message": "again"}, "message"),
    ({"request_id": "has space"}, "request_id"),
    ([], "_schema"),
    ("regenerate", "_schema"),
])
def test_the_body_is_validated(conversation, regenerate, agent_server, body, field):
    conversation_id, *_ = conversation
    calls = len(agent_server.requests)
    response = assert_error(regenerate(conversation_id, body), 400, "invalid_request")
    assert list(response["errors"]) == [field]
    assert len(agent_server.requests) == calls


def test_a_body_is_optional_but_must_be_json_when_sent(conversation, client, auth):
    conversation_id, *_ = conversation
    url = f"/api/alice/conversations/{conversation_id}/regenerate"
    assert client.post(url, headers=auth.headers()).status_code == 200  # no body, no content type
    assert client.post(url, data="", content_type="text/plain", headers=auth.headers()).status_code == 200
    assert_error(client.post(url, data="model=gpt-4", content_type="application/x-www-form-urlencoded",
                             headers=auth.headers()), 400, "invalid_request")
    assert_error(client.post(url, data="{", content_type="application/json", headers=auth.headers()), 400, "invalid_request")


@pytest.mark.parametrize("config_overrides", [{"ALLOWED_MODELS": ["gpt-4", "small"]}])
def test_the_model_is_one_allowed(conversation, regenerate, agent_server):
    conversation_id, *_ = conversation
    assert_error(regenerate(conversation_id, {"model": "gpt-5"}), 400, "invalid_request")
    assert regenerate(conversation_id, {"model": "small"}).get_json()["model"] == "small"
    assert agent_server.requests[-1].json["model"] == "small"


def test_authentication(conversation, client, auth):
    conversation_id, *_ = conversation
    url = f"/api/alice/conversations/{conversation_id}/regenerate"
    assert_error(client.post(url), 401, "authentication_required")
    assert_error(client.post(url, headers=auth.headers("bob")), 403, "forbidden")
    assert_error(client.get(url, headers=auth.headers()), 405, "method_not_allowed")
