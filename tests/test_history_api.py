"""Reading and deleting history (contract section 9)."""
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from chatapp.extensions import db
from chatapp.models import IdempotencyKey, Message
from tests.support.assertions import assert_error


@pytest.fixture
def get(client, auth):
    def get(path, user_id="alice", **params):
        return client.get(f"/api/{user_id}{path}", query_string=params, headers=auth.headers(user_id))

    return get


def test_empty_list(get):
    response = get("/conversations")
    assert response.status_code == 200
    assert response.get_json() == {"conversations": [], "next_cursor": None}


def test_list_pages_most_recently_active_first(chat, get):
    ids = [chat.turn(f"conversation {n}")["conversation_id"] for n in range(5)]
    chat.turn("back to the first", conversation_id=ids[0])  # now the most recently active

    first = get("/conversations", limit=2).get_json()
    assert [c["conversation_id"] for c in first["conversations"]] == [ids[0], ids[4]]
    second = get("/conversations", limit=2, before=first["next_cursor"]).get_json()
    assert [c["conversation_id"] for c in second["conversations"]] == [ids[3], ids[2]]
    last = get("/conversations", limit=2, before=second["next_cursor"]).get_json()
    assert [c["conversation_id"] for c in last["conversations"]] == [ids[1]]
    assert last["next_cursor"] is None
    assert get("/conversations", limit=4).get_json()["next_cursor"] is not None
    assert get("/conversations", limit=5).get_json()["next_cursor"] is None


def test_list_item_fields(chat, get):
    long_message = "  A first message\nthat is long " + "x" * 100
    conversation_id = chat.turn(long_message)["conversation_id"]
    chat.turn("second", conversation_id=conversation_id)
    [item] = get("/conversations").get_json()["conversations"]
    assert list(item) == ["conversation_id", "title", "created_at", "updated_at", "message_count", "metadata"]
    assert item["metadata"] == {}
    assert item["conversation_id"] == conversation_id
    assert item["title"] == ("A first message that is long " + "x" * 100)[:80]
    assert item["message_count"] == 4
    created, updated = datetime.fromisoformat(item["created_at"]), datetime.fromisoformat(item["updated_at"])
    assert created.utcoffset() == updated.utcoffset() == timedelta(0)
    assert updated > created
    assert get(f"/conversations/{conversation_id}").get_json() == item


def test_conversations_of_other_users_are_invisible(chat, get):
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    chat.turn("alice's")
    assert [c["title"] for c in get("/conversations").get_json()["conversations"]] == ["alice's"]
    assert_error(get(f"/conversations/{bobs}"), 404, "conversation_not_found")
    assert_error(get(f"/conversations/{bobs}/messages"), 404, "conversation_not_found")


@pytest.mark.parametrize("conversation_id", [str(uuid.uuid4()), "not-a-uuid", "5B0B6C1E2F4E4A539D1A8F0C3C1F2B7E"])
def test_unknown_conversation(get, conversation_id):
    assert_error(get(f"/conversations/{conversation_id}"), 404, "conversation_not_found")
    assert_error(get(f"/conversations/{conversation_id}/messages"), 404, "conversation_not_found")


def test_message_pages_go_backwards(chat, get):
    conversation_id = chat.turn("m1")["conversation_id"]
    for n in range(2, 8):
        chat.turn(f"m{n}", conversation_id=conversation_id)  # 14 messages

    latest = get(f"/conversations/{conversation_id}/messages", limit=5).get_json()
    assert latest["conversation_id"] == conversation_id
    assert [m["seq"] for m in latest["messages"]] == [10, 11, 12, 13, 14]
    assert latest["has_more"] is True
    older = get(f"/conversations/{conversation_id}/messages", limit=5, before=10).get_json()
    assert [m["seq"] for m in older["messages"]] == [5, 6, 7, 8, 9]
    oldest = get(f"/conversations/{conversation_id}/messages", limit=5, before=5).get_json()
    assert [m["seq"] for m in oldest["messages"]] == [1, 2, 3, 4]
    assert oldest["has_more"] is False
    first = oldest["messages"][0]
    assert set(first) == {"message_id", "seq", "role", "content", "created_at"}
    assert (first["role"], first["content"]) == ("user", "m1")
    answer = oldest["messages"][1]
    assert (answer["content"], answer["model"], answer["finish_reason"]) == ("You said: m1", "gpt-4", "stop")
    assert list(answer) == ["message_id", "seq", "role", "content", "created_at", "model", "usage", "finish_reason", "feedback"]
    assert answer["feedback"] is None
    assert datetime.fromisoformat(first["created_at"]).utcoffset() == timedelta(0)
    assert get(f"/conversations/{conversation_id}/messages").get_json()["has_more"] is False  # default 50


@pytest.mark.parametrize(
    "path, params, field",
    [
        ("/conversations", {"limit": 0}, "limit"),
        ("/conversations", {"limit": 101}, "limit"),
        ("/conversations", {"limit": "ten"}, "limit"),
        ("/conversations", {"before": "garbage!"}, "before"),
        ("/conversations", {"before": "W1sxXV0"}, "before"),
        ("/conversations", {"sort": "asc"}, "sort"),
        ("/conversations/{id}/messages", {"limit": 201}, "limit"),
        ("/conversations/{id}/messages", {"before": 0}, "before"),
        ("/conversations/{id}/messages", {"before": "x"}, "before"),
        ("/conversations/{id}/messages", {"before": 2**31}, "before"),
        ("/conversations/{id}/messages", {"page": 2}, "page"),
    ],
)
def test_invalid_query_parameters(chat, get, client, path, params, field):
    conversation_id = chat.turn("hi")["conversation_id"]
    path = path.replace("{id}", conversation_id)
    body = assert_error(get(path, **params), 400, "invalid_request")
    assert field in body["errors"]
    # Validation comes before authentication, as on the chat endpoint.
    assert_error(client.get(f"/api/alice{path}", query_string=params), 400, "invalid_request")


@pytest.mark.parametrize("path", ["/conversations", "/conversations/{id}", "/conversations/{id}/messages"])
def test_history_needs_the_users_token(chat, client, auth, path):
    path = path.replace("{id}", chat.turn("hi")["conversation_id"])
    response = client.get(f"/api/alice{path}")
    assert_error(response, 401, "authentication_required")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(client.get(f"/api/alice{path}", headers=auth.headers("bob")), 403, "forbidden")


def test_delete_needs_the_users_token(chat, client, store):
    conversation_id = chat.turn("hi")["conversation_id"]
    response = client.delete(f"/api/alice/conversations/{conversation_id}", headers={"Authorization": "Bearer nope"})
    assert_error(response, 401, "invalid_token")
    assert store.counts() == (1, 2)


def test_delete_removes_the_conversation_its_messages_and_keys(chat, client, auth, get, store):
    keep = chat.turn("keep me")["conversation_id"]
    conversation_id = chat.post({"message": "delete me"}, headers={"Idempotency-Key": "k1"}).get_json()["conversation_id"]
    chat.post({"message": "again", "conversation_id": conversation_id}, headers={"Idempotency-Key": "k2"})

    response = client.delete(f"/api/alice/conversations/{conversation_id}", headers=auth.headers())

    assert response.status_code == 204
    assert response.data == b"" and "Content-Type" not in response.headers
    assert response.headers["X-Request-ID"]
    assert_error(get(f"/conversations/{conversation_id}"), 404, "conversation_not_found")
    assert [c["conversation_id"] for c in get("/conversations").get_json()["conversations"]] == [keep]
    db.session.expire_all()
    assert db.session.scalar(select(func.count()).select_from(Message).where(Message.conversation_id == uuid.UUID(conversation_id))) == 0
    assert db.session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    assert store.counts() == (1, 2)
    assert_error(client.delete(f"/api/alice/conversations/{conversation_id}", headers=auth.headers()), 404, "conversation_not_found")


def test_delete_of_another_users_conversation_is_not_found(chat, client, auth, store):
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    assert_error(client.delete(f"/api/alice/conversations/{bobs}", headers=auth.headers()), 404, "conversation_not_found")
    assert_error(client.delete(f"/api/bob/conversations/{bobs}", headers=auth.headers("alice")), 403, "forbidden")
    assert store.counts() == (1, 2)


def test_delete_while_a_turn_is_in_flight_is_busy(app, auth, chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    other = app.test_client()
    seen = []
    agent_server.on_request = lambda _request: seen.append(
        other.delete(f"/api/alice/conversations/{conversation_id}", headers=auth.headers()) if not seen else None
    )
    assert chat.post({"message": "two", "conversation_id": conversation_id}).status_code == 200
    assert_error(seen[0], 409, "conversation_busy")
    assert seen[0].headers["Retry-After"] == "1"
    assert store.counts() == (1, 4)


@pytest.mark.parametrize("view", ["list", "messages"])
def test_reading_history_takes_the_same_statements_whatever_its_size(chat, get, count_statements, view):
    counts = []
    for size in (3, 30):
        user_id = f"user-{size}"
        conversation_id = None
        for n in range(size):
            if view == "list":
                conversation_id = chat.turn(f"conversation {n}", user_id=user_id)["conversation_id"]
            else:
                conversation_id = chat.turn(f"m{n}", user_id=user_id, conversation_id=conversation_id)["conversation_id"]
        path = "/conversations" if view == "list" else f"/conversations/{conversation_id}/messages"
        with count_statements() as counter:
            response = get(path, user_id=user_id, limit=100 if view == "list" else 200)
        assert response.status_code == 200
        counts.append(len(counter.statements))
    assert counts[0] == counts[1] == (1 if view == "list" else 2)
