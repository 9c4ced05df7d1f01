"""Managing history: renaming a conversation and its metadata (PATCH), feedback on answers (PUT)."""
import contextlib
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from chatapp.extensions import db
from chatapp.models import Conversation, Message
from tests.support.assertions import assert_error

CONVERSATION_FIELDS = ["conversation_id", "title", "created_at", "updated_at", "message_count", "metadata"]
ANSWER_FIELDS = ["message_id", "seq", "role", "content", "created_at", "model", "usage", "finish_reason", "feedback"]
SIXTEEN_KEYS = {f"key-{n}": f"value {n}" for n in range(16)}


@pytest.fixture
def get(client, auth):
    def get(path, user_id="alice"):
        return client.get(f"/api/{user_id}{path}", headers=auth.headers(user_id))

    return get


@pytest.fixture
def patch(client, auth):
    """PATCH a conversation as its user (or with `headers` of the test's own)."""

    def patch(conversation_id, body=None, user_id="alice", headers=None, **kwargs):
        headers = auth.headers(user_id) if headers is None else headers
        return client.patch(f"/api/{user_id}/conversations/{conversation_id}", json=body, headers=headers, **kwargs)

    return patch


@pytest.fixture
def put_feedback(client, auth):
    """PUT the feedback on a message as its user (or with `headers` of the test's own)."""

    def put(conversation_id, message_id, body=None, user_id="alice", headers=None, **kwargs):
        headers = auth.headers(user_id) if headers is None else headers
        return client.put(f"/api/{user_id}/conversations/{conversation_id}/messages/{message_id}/feedback", json=body,
                          headers=headers, **kwargs)

    return put


@pytest.fixture
def answered(store, chat, get):
    """A conversation of alice's with one turn: (conversation id, the question's id, the answer's id).
    After `store`, whose app context the test's reads of the database use."""
    conversation_id = chat.turn("What is a kettle?")["conversation_id"]
    question, answer = get(f"/conversations/{conversation_id}/messages").get_json()["messages"]
    return conversation_id, question["message_id"], answer["message_id"]


def conversation_row(conversation_id):
    db.session.expire_all()
    return db.session.get(Conversation, uuid.UUID(conversation_id))


def feedback_columns(message_id):
    """(rating, comment, given at) as stored on the message."""
    db.session.expire_all()
    return tuple(db.session.execute(
        select(Message.feedback_rating, Message.feedback_comment, Message.feedback_at).where(Message.id == uuid.UUID(message_id))
    ).one())


def all_feedback_columns():
    db.session.expire_all()
    return [tuple(row) for row in db.session.execute(select(Message.feedback_rating, Message.feedback_comment, Message.feedback_at))]


def at(text):
    """A timestamp of an answer, checked to be in UTC."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0)
    return moment


# Renaming a conversation, its metadata ------------------------------------------------------------


def test_rename_answers_the_conversation_and_shows_in_the_list_and_the_conversation(chat, get, patch, store):
    conversation_id = chat.turn("first message")["conversation_id"]
    before = get(f"/conversations/{conversation_id}").get_json()

    response = patch(conversation_id, {"title": "Kettles, and how they boil"})

    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == CONVERSATION_FIELDS
    assert body == {**before, "title": "Kettles, and how they boil"}
    assert get(f"/conversations/{conversation_id}").get_json() == body
    assert get("/conversations").get_json() == {"conversations": [body], "next_cursor": None}
    row = store.conversation(conversation_id)
    assert (row.title, row.meta, row.message_count, row.claim_token, row.claimed_until) == (
        "Kettles, and how they boil", None, 2, None, None)


def test_a_rename_is_no_activity_the_list_keeps_its_order(chat, get, patch, store):
    older = chat.turn("older")["conversation_id"]
    newer = chat.turn("newer")["conversation_id"]
    updated_at = store.conversation(older).updated_at

    assert patch(older, {"title": "Renamed", "metadata": {"a": "b"}}).status_code == 200

    assert store.conversation(older).updated_at == updated_at
    assert [c["conversation_id"] for c in get("/conversations").get_json()["conversations"]] == [newer, older]


def test_a_title_of_200_characters_and_any_text(chat, patch, store):
    conversation_id = chat.turn("hi")["conversation_id"]
    for title in ("t" * 200, "é" * 200, "  spaced out\tand\non lines  ", "🫖" * 200, "x"):
        body = patch(conversation_id, {"title": title}).get_json()
        assert body["title"] == title
        assert store.conversation(conversation_id).title == title


def test_metadata_is_replaced_whole_and_null_clears_it(chat, get, patch, store):
    conversation_id = chat.turn("hi")["conversation_id"]

    first = patch(conversation_id, {"metadata": {"project": "kitchen", "colour": "red"}}).get_json()
    assert first["metadata"] == {"project": "kitchen", "colour": "red"}
    assert store.conversation(conversation_id).meta == {"project": "kitchen", "colour": "red"}

    second = patch(conversation_id, {"metadata": {"colour": "blue"}}).get_json()
    assert second == {**first, "metadata": {"colour": "blue"}}  # the whole of it replaced, the title kept
    assert get(f"/conversations/{conversation_id}").get_json() == second
    assert get("/conversations").get_json()["conversations"] == [second]

    cleared = patch(conversation_id, {"metadata": None}).get_json()
    assert cleared == {**first, "metadata": {}}
    assert store.conversation(conversation_id).meta is None

    patch(conversation_id, {"metadata": {"a": "b"}})
    assert patch(conversation_id, {"metadata": {}}).get_json()["metadata"] == {}
    assert store.conversation(conversation_id).meta is None  # {} and null alike: none


def test_title_and_metadata_together(chat, patch, store):
    conversation_id = chat.turn("hi")["conversation_id"]
    body = patch(conversation_id, {"title": "Both", "metadata": SIXTEEN_KEYS}).get_json()
    assert (body["title"], body["metadata"]) == ("Both", SIXTEEN_KEYS)
    row = store.conversation(conversation_id)
    assert (row.title, row.meta) == ("Both", SIXTEEN_KEYS)


@pytest.mark.parametrize("metadata", [
    SIXTEEN_KEYS,
    {"k" * 64: "v" * 512},
    {"k": ""},
    {"ключ": "значение 🫖", " ": "a key of white space is a key"},
])
def test_metadata_at_its_limits(chat, patch, store, metadata):
    conversation_id = chat.turn("hi")["conversation_id"]
    assert patch(conversation_id, {"metadata": metadata}).get_json()["metadata"] == metadata
    assert store.conversation(conversation_id).meta == metadata


TOO_MANY_KEYS = {f"key-{n}": "v" for n in range(17)}


@pytest.mark.parametrize("body, errors", [
    ({"title": ""}, {"title": ["Length must be between 1 and 200.", "Must not be only white space."]}),
    ({"title": " \t\n "}, {"title": ["Must not be only white space."]}),
    ({"title": "t" * 201}, {"title": ["Length must be between 1 and 200."]}),
    ({"title": "a\x00b"}, {"title": ["Must not contain NUL characters."]}),
    ({"title": "lone \ud800"}, {"title": ["Must be valid Unicode (no lone surrogates)."]}),
    ({"title": None}, {"title": ["Field may not be null."]}),
    ({"title": 42}, {"title": ["Not a valid string."]}),
    ({"metadata": TOO_MANY_KEYS}, {"metadata": ["Must have at most 16 keys."]}),
    ({"metadata": {"": "v"}}, {"metadata": {"": {"key": ["Length must be between 1 and 64."]}}}),
    ({"metadata": {"k" * 65: "v"}}, {"metadata": {"k" * 65: {"key": ["Length must be between 1 and 64."]}}}),
    ({"metadata": {"k\x00": "v"}}, {"metadata": {"k\x00": {"key": ["Must not contain NUL characters."]}}}),
    ({"metadata": {"k": "v" * 513}}, {"metadata": {"k": {"value": ["Longer than maximum length 512."]}}}),
    ({"metadata": {"k": "v\x00"}}, {"metadata": {"k": {"value": ["Must not contain NUL characters."]}}}),
    ({"metadata": {"k": 1}}, {"metadata": {"k": {"value": ["Not a valid string."]}}}),
    ({"metadata": {"k": None}}, {"metadata": {"k": {"value": ["Field may not be null."]}}}),
    ({"metadata": {"k": {"nested": "object"}}}, {"metadata": {"k": {"value": ["Not a valid string."]}}}),
    ({"metadata": {"k": ["a", "list"]}}, {"metadata": {"k": {"value": ["Not a valid string."]}}}),
    ({"metadata": {"k": True}}, {"metadata": {"k": {"value": ["Not a valid string."]}}}),
    ({"metadata": "project=kitchen"}, {"metadata": ["Not a valid mapping type."]}),
    ({"metadata": ["project", "kitchen"]}, {"metadata": ["Not a valid mapping type."]}),
    ({"metadata": 7}, {"metadata": ["Not a valid mapping type."]}),
    ({"title": "fine", "pinned": True}, {"pinned": ["Unknown field."]}),
    ({"title": "fine", "message_count": 0, "updated_at": "2026-01-01T00:00:00+00:00"},
     {"message_count": ["Unknown field."], "updated_at": ["Unknown field."]}),
])
def test_invalid_changes(chat, patch, store, body, errors):
    conversation_id = chat.turn("hi")["conversation_id"]
    before = store.conversation(conversation_id)
    kept = (before.title, before.meta, before.updated_at)

    answer = assert_error(patch(conversation_id, body), 400, "invalid_request")
    assert answer["errors"] == errors
    assert answer["detail"] == f"Invalid request: {', '.join(sorted(errors))}"
    # Validation comes first: without a token, or for a conversation that does not exist, the same 400.
    assert assert_error(patch(conversation_id, body, headers={}), 400, "invalid_request")["errors"] == errors
    assert assert_error(patch(uuid.uuid4(), body), 400, "invalid_request")["errors"] == errors
    row = store.conversation(conversation_id)
    assert (row.title, row.meta, row.updated_at) == kept


@pytest.mark.parametrize("body, detail", [
    ({}, "Request body must have a title, metadata or both."),
    ([], "Request body must be a JSON object."),
    ([{"title": "in an array"}], "Request body must be a JSON object."),
    ("a title", "Request body must be a JSON object."),
    (None, "Request body must be a JSON object."),
])
def test_a_body_that_changes_nothing_or_is_no_object(chat, patch, store, body, detail):
    conversation_id = chat.turn("hi")["conversation_id"]
    answer = assert_error(patch(conversation_id, data=json.dumps(body), content_type="application/json"), 400,
                          "invalid_request")
    assert answer == {"detail": detail, "code": "invalid_request", "request_id": answer["request_id"], "errors": {"_schema": [detail]}}
    assert store.conversation(conversation_id).title == "hi"


@pytest.mark.parametrize("data, content_type, detail", [
    ('{"title": "cut', "application/json", "Request body is not valid JSON"),
    ('{"title": NaN}', "application/json", "Request body is not valid JSON"),
    ("", "application/json", "Request body is not valid JSON"),
    ('{"title": "x"}', "text/plain", "Content-Type must be application/json"),
])
def test_a_body_that_is_not_json(chat, patch, store, data, content_type, detail):
    conversation_id = chat.turn("hi")["conversation_id"]
    answer = assert_error(patch(conversation_id, data=data, content_type=content_type), 400, "invalid_request")
    assert answer == {"detail": detail, "code": "invalid_request", "request_id": answer["request_id"]}
    assert store.conversation(conversation_id).title == "hi"


def test_a_key_given_twice_and_a_body_too_large(app, chat, patch, store):
    conversation_id = chat.turn("hi")["conversation_id"]
    twice = assert_error(patch(conversation_id, data='{"title": "a", "title": "b"}', content_type="application/json"), 400,
                         "invalid_request")
    assert twice["errors"] == {"title": ["Given more than once."]}
    assert_error(patch(conversation_id, {"title": "x" * app.config["MAX_CONTENT_LENGTH"]}), 413, "payload_too_large")
    assert store.conversation(conversation_id).title == "hi"


def test_the_path_user_id_is_validated_first(patch):
    answer = assert_error(patch(uuid.uuid4(), {"title": ""}, user_id="u" * 256), 400, "invalid_request")
    assert answer["errors"] == {"user_id": ["Length must be between 1 and 255."]}


def test_renaming_needs_the_users_token(chat, patch, auth, store):
    conversation_id = chat.turn("hi")["conversation_id"]
    response = patch(conversation_id, {"title": "mine"}, headers={})
    assert_error(response, 401, "authentication_required")
    assert_error(patch(conversation_id, {"title": "mine"}, headers={"Authorization": "Bearer nope"}), 401, "invalid_token")
    assert_error(patch(conversation_id, {"title": "mine"}, headers=auth.headers("bob")), 403, "forbidden")
    assert store.conversation(conversation_id).title == "hi"


@pytest.mark.parametrize("conversation_id", ["bobs", str(uuid.uuid4()), "not-a-uuid", "{bobs}", "bobs-bare-hex"])
def test_renaming_a_conversation_that_is_not_the_users(chat, patch, store, conversation_id):
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    conversation_id = {"bobs": bobs, "{bobs}": "{" + bobs + "}", "bobs-bare-hex": bobs.replace("-", "")}.get(conversation_id, conversation_id)
    assert_error(patch(conversation_id, {"title": "mine now"}), 404, "conversation_not_found")
    assert store.conversation(bobs).title == "bob's"


def test_the_id_in_upper_case_is_the_same_conversation(chat, patch):
    conversation_id = chat.turn("hi")["conversation_id"]
    body = patch(conversation_id.upper(), {"title": "shouting"}).get_json()
    assert (body["conversation_id"], body["title"]) == (conversation_id, "shouting")


def test_renaming_is_one_statement(chat, patch, count_statements):
    conversation_id = chat.turn("hi")["conversation_id"]
    with count_statements() as counter:
        assert patch(conversation_id, {"title": "renamed", "metadata": {"a": "b"}}).status_code == 200
    assert len(counter.statements) == 1


@contextlib.contextmanager
def a_turn_in_flight(app, auth, agent_server, conversation_id):
    """A turn "two" on the conversation, held at the agent until the block ends; its answer, after."""
    arrived, release, answers = threading.Event(), threading.Event(), []

    def hold(_request):
        arrived.set()
        release.wait(15)

    agent_server.on_request = hold
    turn_client = app.test_client()
    with ThreadPoolExecutor(1) as pool:
        turn = pool.submit(turn_client.post, "/api/alice/chat", json={"message": "two", "conversation_id": conversation_id},
                           headers=auth.headers())
        try:
            assert arrived.wait(15)
            yield answers
        finally:
            release.set()
        answers.append(turn.result(timeout=15))


def test_renaming_while_a_turn_is_in_flight(app, auth, chat, patch, get, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    with a_turn_in_flight(app, auth, agent_server, conversation_id) as answers:
        held = store.conversation(conversation_id)
        assert held.claim_token is not None and held.message_count == 2
        claim = (held.claim_token, held.claimed_until, held.message_count, held.updated_at)

        response = patch(conversation_id, {"title": "Renamed mid-turn", "metadata": {"state": "thinking"}})

        assert response.status_code == 200
        assert response.get_json()["message_count"] == 2
        row = store.conversation(conversation_id)
        assert (row.claim_token, row.claimed_until, row.message_count, row.updated_at) == claim
        assert (row.title, row.meta) == ("Renamed mid-turn", {"state": "thinking"})
    answer = answers[0]
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["message"] == "You said: two"
    body = get(f"/conversations/{conversation_id}").get_json()
    assert (body["title"], body["metadata"], body["message_count"]) == ("Renamed mid-turn", {"state": "thinking"}, 4)
    assert at(body["updated_at"]) > claim[3]  # the turn, which is activity, moved it
    assert store.conversation(conversation_id).claim_token is None
    assert [(seq, role) for seq, role, _ in store.messages(conversation_id)] == [(1, "user"), (2, "assistant"), (3, "user"),
                                                                                 (4, "assistant")]


# Feedback on an answer ----------------------------------------------------------------------------


@pytest.mark.parametrize("body, rating, comment", [
    ({"rating": "like"}, "like", None),
    ({"rating": "dislike", "comment": "It was about teapots."}, "dislike", "It was about teapots."),
    ({"rating": None, "comment": "No rating, a word only."}, None, "No rating, a word only."),
    ({"comment": "c" * 2000}, None, "c" * 2000),
    ({"rating": "like", "comment": ""}, "like", ""),
    ({"rating": "like", "comment": "é 🫖\nsecond line"}, "like", "é 🫖\nsecond line"),
])
def test_feedback_is_stored_and_shown_on_the_answer(answered, put_feedback, get, body, rating, comment):
    conversation_id, _question_id, answer_id = answered
    conversation_before = get(f"/conversations/{conversation_id}").get_json()

    response = put_feedback(conversation_id, answer_id, body)

    assert response.status_code == 200
    given = response.get_json()
    assert list(given) == ["message_id", "rating", "comment", "updated_at"]
    assert given == {"message_id": answer_id, "rating": rating, "comment": comment, "updated_at": given["updated_at"]}
    given_at = at(given["updated_at"])
    assert feedback_columns(answer_id) == (rating, comment, given_at)
    question, answer = get(f"/conversations/{conversation_id}/messages").get_json()["messages"]
    assert list(answer) == ANSWER_FIELDS
    assert answer["feedback"] == {"rating": rating, "comment": comment, "updated_at": given["updated_at"]}
    assert "feedback" not in question
    # Feedback is not activity: the conversation is as it was.
    assert get(f"/conversations/{conversation_id}").get_json() == conversation_before


def test_putting_feedback_again_replaces_it(answered, put_feedback, get):
    conversation_id, _question_id, answer_id = answered
    first = put_feedback(conversation_id, answer_id, {"rating": "like", "comment": "Great"}).get_json()
    second = put_feedback(conversation_id, answer_id, {"rating": "dislike"}).get_json()

    assert second == {"message_id": answer_id, "rating": "dislike", "comment": None, "updated_at": second["updated_at"]}
    assert at(second["updated_at"]) >= at(first["updated_at"])
    assert feedback_columns(answer_id) == ("dislike", None, at(second["updated_at"]))
    answer = get(f"/conversations/{conversation_id}/messages").get_json()["messages"][1]
    assert answer["feedback"] == {"rating": "dislike", "comment": None, "updated_at": second["updated_at"]}


@pytest.mark.parametrize("clearing", [{"rating": None, "comment": None}, {}, {"rating": None}])
def test_both_null_clears_the_feedback(answered, put_feedback, get, clearing):
    conversation_id, _question_id, answer_id = answered
    put_feedback(conversation_id, answer_id, {"rating": "like", "comment": "Great"})

    response = put_feedback(conversation_id, answer_id, clearing)

    assert response.status_code == 200
    cleared = response.get_json()
    assert cleared == {"message_id": answer_id, "rating": None, "comment": None, "updated_at": cleared["updated_at"]}
    at(cleared["updated_at"])
    assert feedback_columns(answer_id) == (None, None, None)
    answer = get(f"/conversations/{conversation_id}/messages").get_json()["messages"][1]
    assert list(answer) == ANSWER_FIELDS and answer["feedback"] is None


def test_feedback_shows_only_on_the_answers_it_was_given(chat, put_feedback, get):
    conversation_id = chat.turn("one")["conversation_id"]
    chat.turn("two", conversation_id=conversation_id)
    messages = get(f"/conversations/{conversation_id}/messages").get_json()["messages"]
    given = put_feedback(conversation_id, messages[3]["message_id"], {"rating": "like"}).get_json()

    shown = get(f"/conversations/{conversation_id}/messages").get_json()["messages"]
    assert [message.get("feedback", "absent") for message in shown] == [
        "absent", None, "absent", {"rating": "like", "comment": None, "updated_at": given["updated_at"]}]
    assert [list(message) for message in shown if message["role"] == "user"] == [
        ["message_id", "seq", "role", "content", "created_at"]] * 2


@pytest.mark.parametrize("body, errors", [
    ({"rating": "love"}, {"rating": ["Must be one of: like, dislike."]}),
    ({"rating": "Like"}, {"rating": ["Must be one of: like, dislike."]}),
    ({"rating": ""}, {"rating": ["Must be one of: like, dislike."]}),
    ({"rating": 1}, {"rating": ["Not a valid string."]}),
    ({"rating": True}, {"rating": ["Not a valid string."]}),
    ({"comment": "c" * 2001}, {"comment": ["Longer than maximum length 2000."]}),
    ({"rating": "like", "comment": 5}, {"comment": ["Not a valid string."]}),
    ({"comment": ["a", "list"]}, {"comment": ["Not a valid string."]}),
    ({"comment": {"an": "object"}}, {"comment": ["Not a valid string."]}),
    ({"comment": "nul \x00"}, {"comment": ["Must not contain NUL characters."]}),
    ({"comment": "lone \udfff"}, {"comment": ["Must be valid Unicode (no lone surrogates)."]}),
    ({"rating": "like", "stars": 5}, {"stars": ["Unknown field."]}),
])
def test_invalid_feedback(answered, put_feedback, body, errors):
    conversation_id, _question_id, answer_id = answered
    put_feedback(conversation_id, answer_id, {"rating": "like", "comment": "kept"})
    kept = feedback_columns(answer_id)

    answer = assert_error(put_feedback(conversation_id, answer_id, body), 400, "invalid_request")
    assert answer["errors"] == errors
    assert answer["detail"] == f"Invalid request: {', '.join(sorted(errors))}"
    # Validation comes first: without a token, or for a message that does not exist, the same 400.
    assert assert_error(put_feedback(conversation_id, answer_id, body, headers={}), 400, "invalid_request")["errors"] == errors
    assert assert_error(put_feedback(uuid.uuid4(), uuid.uuid4(), body), 400, "invalid_request")["errors"] == errors
    assert feedback_columns(answer_id) == kept


@pytest.mark.parametrize("data, content_type, detail, errors", [
    ('[{"rating": "like"}]', "application/json", "Request body must be a JSON object.",
     {"_schema": ["Request body must be a JSON object."]}),
    ('"like"', "application/json", "Request body must be a JSON object.", {"_schema": ["Request body must be a JSON object."]}),
    ("null", "application/json", "Request body must be a JSON object.", {"_schema": ["Request body must be a JSON object."]}),
    ('{"rating": "like"', "application/json", "Request body is not valid JSON", None),
    ("", "application/json", "Request body is not valid JSON", None),
    ('{"rating": "like"}', "text/plain", "Content-Type must be application/json", None),
])
def test_feedback_that_is_no_json_object(answered, put_feedback, data, content_type, detail, errors):
    conversation_id, _question_id, answer_id = answered
    answer = assert_error(put_feedback(conversation_id, answer_id, data=data, content_type=content_type), 400, "invalid_request")
    expected = {"detail": detail, "code": "invalid_request", "request_id": answer["request_id"]}
    assert answer == (expected if errors is None else {**expected, "errors": errors})
    assert all_feedback_columns() == [(None, None, None)] * 2


def test_a_user_message_takes_no_feedback(answered, put_feedback):
    conversation_id, question_id, _answer_id = answered
    assert_error(put_feedback(conversation_id, question_id, {"rating": "like"}), 404, "message_not_found")
    assert all_feedback_columns() == [(None, None, None)] * 2


def test_an_answer_of_another_conversation_is_not_found(answered, chat, get, put_feedback):
    conversation_id, _question_id, answer_id = answered
    other = chat.turn("another")["conversation_id"]
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    bobs_answer = get(f"/conversations/{bobs}/messages", user_id="bob").get_json()["messages"][1]["message_id"]

    assert_error(put_feedback(other, answer_id, {"rating": "like"}), 404, "message_not_found")
    assert_error(put_feedback(conversation_id, bobs_answer, {"rating": "like"}), 404, "message_not_found")
    assert all_feedback_columns() == [(None, None, None)] * 6


@pytest.mark.parametrize("message_id", [str(uuid.uuid4()), "not-a-uuid", "12345", "{answer}", "answer-bare-hex"])
def test_an_unknown_or_malformed_message_id_is_not_found(answered, put_feedback, message_id):
    conversation_id, _question_id, answer_id = answered
    message_id = {"{answer}": "{" + answer_id + "}", "answer-bare-hex": answer_id.replace("-", "")}.get(message_id, message_id)
    body = assert_error(put_feedback(conversation_id, message_id, {"rating": "like"}), 404, "message_not_found")
    assert body["detail"] == "Message not found"
    assert all_feedback_columns() == [(None, None, None)] * 2


def test_the_answers_id_in_upper_case_is_the_same_answer(answered, put_feedback):
    conversation_id, _question_id, answer_id = answered
    given = put_feedback(conversation_id.upper(), answer_id.upper(), {"rating": "like"}).get_json()
    assert given["message_id"] == answer_id
    assert feedback_columns(answer_id)[0] == "like"


@pytest.mark.parametrize("message", ["bobs-answer", "malformed"])
@pytest.mark.parametrize("conversation", ["bobs", "unknown", "malformed"])
def test_the_conversation_is_checked_first(store, chat, get, put_feedback, conversation, message):
    bobs = chat.turn("bob's", user_id="bob")["conversation_id"]
    bobs_answer = get(f"/conversations/{bobs}/messages", user_id="bob").get_json()["messages"][1]["message_id"]
    conversation_id = {"bobs": bobs, "unknown": str(uuid.uuid4()), "malformed": "nope"}[conversation]
    message_id = {"bobs-answer": bobs_answer, "malformed": "nope"}[message]

    assert_error(put_feedback(conversation_id, message_id, {"rating": "dislike"}), 404, "conversation_not_found")
    assert all_feedback_columns() == [(None, None, None)] * 2


def test_feedback_needs_the_users_token(answered, auth, put_feedback):
    conversation_id, _question_id, answer_id = answered
    assert_error(put_feedback(conversation_id, answer_id, {"rating": "like"}, headers={}), 401, "authentication_required")
    assert_error(put_feedback(conversation_id, answer_id, {"rating": "like"}, headers={"Authorization": "Bearer nope"}), 401,
                 "invalid_token")
    assert_error(put_feedback(conversation_id, answer_id, {"rating": "like"}, headers=auth.headers("bob")), 403, "forbidden")
    assert all_feedback_columns() == [(None, None, None)] * 2


def test_feedback_is_two_statements(answered, put_feedback, count_statements):
    conversation_id, _question_id, answer_id = answered
    with count_statements() as counter:
        assert put_feedback(conversation_id, answer_id, {"rating": "like"}).status_code == 200
    assert len(counter.statements) == 2


def test_feedback_while_a_turn_is_in_flight(app, auth, answered, put_feedback, get, agent_server):
    conversation_id, _question_id, answer_id = answered
    with a_turn_in_flight(app, auth, agent_server, conversation_id) as answers:
        response = put_feedback(conversation_id, answer_id, {"rating": "like"})
        assert response.status_code == 200
    assert answers[0].status_code == 200
    messages = get(f"/conversations/{conversation_id}/messages").get_json()["messages"]
    assert [message.get("feedback", "absent") for message in messages] == [
        "absent", {"rating": "like", "comment": None, "updated_at": response.get_json()["updated_at"]}, "absent", None]
