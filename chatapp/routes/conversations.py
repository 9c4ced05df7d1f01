"""The user's history: list, read, rename and delete conversations, give feedback on answers; and
stop the turn in flight on a conversation."""
from flask import Blueprint, Response, current_app

from chatapp import errors, history_service
from chatapp.auth import authenticate
from chatapp.openapi import documented
from chatapp.routes.inputs import check_user_id, json_body, query_params
from chatapp.schemas import (
    ConversationListQuerySchema,
    ConversationListSchema,
    ConversationSchema,
    ConversationUpdateSchema,
    FeedbackRequestSchema,
    FeedbackResponseSchema,
    MessageListQuerySchema,
    MessageListSchema,
    StopResponseSchema,
)

bp = Blueprint("conversations", __name__, url_prefix="/api/<user_id>/conversations")
# Schema instances are stateless between calls: built once, shared by every thread.
_LIST_QUERY, _LIST = ConversationListQuerySchema(), ConversationListSchema()
_CONVERSATION, _UPDATE = ConversationSchema(), ConversationUpdateSchema()
_MESSAGES_QUERY, _MESSAGES = MessageListQuerySchema(), MessageListSchema()
_FEEDBACK_REQUEST, _FEEDBACK = FeedbackRequestSchema(), FeedbackResponseSchema()
_STOP = StopResponseSchema()


@bp.get("")
@documented(
    summary="The user's conversations, most recently active first",
    query=ConversationListQuerySchema,
    response=ConversationListSchema,
    tags=("history",),
)
def list_conversations(user_id: str):
    check_user_id(user_id)
    query = query_params(_LIST_QUERY)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    page = history_service.list_conversations(user_id, query["limit"], query["before"])  # 3. read
    return _LIST.dump(page)  # 5. return


@bp.get("/<conversation_id>")
@documented(
    summary="One conversation",
    response=ConversationSchema,
    errors=(errors.ConversationNotFound,),
    tags=("history",),
)
def get_conversation(user_id: str, conversation_id: str):
    check_user_id(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    conversation = history_service.get_conversation(user_id, conversation_id)  # 3. resolve
    return _CONVERSATION.dump(conversation)  # 5. return


@bp.patch("/<conversation_id>")
@documented(
    summary="Rename a conversation and/or replace its metadata",
    body=ConversationUpdateSchema,
    response=ConversationSchema,
    errors=(errors.PayloadTooLarge, errors.ConversationNotFound),
    tags=("history",),
)
def update_conversation(user_id: str, conversation_id: str):
    """Allowed while a turn is in flight on the conversation: it touches neither the messages nor
    the turn's claim, nor updated_at (the last activity, which orders the conversation list)."""
    check_user_id(user_id)
    changes = _UPDATE.load(json_body())  # 1. validate
    authenticate(user_id)  # 2. authenticate
    conversation = history_service.update_conversation(user_id, conversation_id, changes)  # 3. resolve, 4. update
    return _CONVERSATION.dump(conversation)  # 5. return


@bp.get("/<conversation_id>/messages")
@documented(
    summary="A page of a conversation's messages, oldest first",
    query=MessageListQuerySchema,
    response=MessageListSchema,
    errors=(errors.ConversationNotFound,),
    tags=("history",),
)
def list_messages(user_id: str, conversation_id: str):
    check_user_id(user_id)
    query = query_params(_MESSAGES_QUERY)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    page = history_service.list_messages(user_id, conversation_id, query["limit"], query["before"])  # 3. read
    return _MESSAGES.dump(page)  # 5. return


@bp.put("/<conversation_id>/messages/<message_id>/feedback")
@documented(
    summary="Give, replace or clear the feedback on an answer",
    body=FeedbackRequestSchema,
    response=FeedbackResponseSchema,
    errors=(errors.PayloadTooLarge, errors.ConversationNotFound, errors.MessageNotFound),
    tags=("history",),
)
def put_feedback(user_id: str, conversation_id: str, message_id: str):
    """Only the conversation's assistant messages take feedback; rating and comment both null clear it."""
    check_user_id(user_id)
    feedback = _FEEDBACK_REQUEST.load(json_body())  # 1. validate
    authenticate(user_id)  # 2. authenticate
    given = history_service.put_feedback(user_id, conversation_id, message_id, **feedback)  # 3. resolve, 4. store
    return _FEEDBACK.dump(given)  # 5. return


@bp.delete("/<conversation_id>")
@documented(
    summary="Delete a conversation, its messages and its idempotency keys",
    status=204,
    errors=(errors.ConversationNotFound, errors.ConversationBusy),
    tags=("history",),
)
def delete_conversation(user_id: str, conversation_id: str):
    check_user_id(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    history_service.delete_conversation(user_id, conversation_id)  # 3. resolve, 4. delete
    response = Response(status=204)  # 5. return
    del response.headers["Content-Type"]  # no body, so no content type
    return response


@bp.post("/<conversation_id>/stop")
@documented(
    summary="Stop the turn in flight on a conversation",
    response=StopResponseSchema,
    errors=(errors.ConversationNotFound, errors.NoTurnInProgress),
    tags=("chat",),
)
def stop_turn(user_id: str, conversation_id: str):
    """Ends the turn in flight within a second, whichever process or host runs it: a stream keeps
    what it received (finish_reason `stopped`); a blocking turn, or a stream before its first
    piece, stores nothing and answers 409 turn_stopped. The conversation is free once this answers."""
    check_user_id(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    current_app.extensions["chat_service"].stop(user_id, conversation_id)  # 3. resolve, 4. stop
    return _STOP.dump({"conversation_id": conversation_id.lower(), "stopped": True})  # 5. return
