"""The turns: POST /api/<user_id>/chat, and regenerating a conversation's latest answer; each
runs the five steps, in order."""
import functools
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from chatapp import errors
from chatapp.auth import authenticate
from chatapp.chat_service import ResumedStream, TurnResponse, TurnStream, replay_events
from chatapp.log_config import note
from chatapp.metrics import TURNS_IN_FLIGHT
from chatapp.openapi import documented
from chatapp.rate_limit import enforce_rate_limit
from chatapp.routes.inputs import check_user_id, json_body, optional_json_body
from chatapp.schemas import ChatRequest, ChatRequestSchema, ChatResponseSchema, RegenerateRequestSchema, TurnSchema
from chatapp.turn_log import KEEP_ALIVE, Event

bp = Blueprint("chat", __name__)


@functools.cache
def turn_schema(schema_class: type[TurnSchema], default_model: str | None, allowed_models: tuple[str, ...]) -> TurnSchema:
    """A request schema for an app's model settings, built once (schemas hold no state between calls)."""
    return schema_class(default_model=default_model, allowed_models=allowed_models)


def app_turn_schema(schema_class: type[TurnSchema]) -> TurnSchema:
    config = current_app.config
    return turn_schema(schema_class, config["DEFAULT_MODEL"], tuple(config["ALLOWED_MODELS"] or ()))


def load_chat_request(user_id: str) -> ChatRequest:
    """Step 1: the path's user id, the JSON body and the idempotency key, validated."""
    check_user_id(user_id)
    return app_turn_schema(ChatRequestSchema).load_chat_request(
        json_body(), request.headers.get("Idempotency-Key"), request.headers.get("Last-Event-ID"))


def load_regenerate_request(user_id: str, conversation_id: str) -> ChatRequest:
    """Step 1 of a regeneration: the path's user id, the optional JSON body and the idempotency key."""
    check_user_id(user_id)
    return app_turn_schema(RegenerateRequestSchema).load_regenerate_request(
        optional_json_body(), conversation_id, request.headers.get("Idempotency-Key"), request.headers.get("Last-Event-ID"))


def respond(chat_request: ChatRequest, turn: TurnResponse | TurnStream | ResumedStream) -> Response:
    """Step 5: the ChatResponse, or the answer as server-sent events (a replay streams too, when asked)."""
    if chat_request.stream:
        note(stream=True)
        return event_stream_response(turn, chat_request.last_event_id or 0)
    note(conversation_id=turn.conversation_id, replayed=turn.replayed)
    # The line end that jsonify adds to every other body: a terminal's prompt starts on a line of its own.
    response = Response(turn.body + "\n", status=200, mimetype="application/json")
    if turn.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def relay(events: Iterator[Event | None]):
    """Each event with its id; a keep-alive comment after each STREAM_KEEPALIVE_SECONDS of silence."""
    try:
        for event in events:
            yield KEEP_ALIVE if event is None else event.sse()
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # before the end: the client went away (the turn goes on, or is cancelled)


def event_stream_response(turn: TurnResponse | TurnStream | ResumedStream, last_event_id: int) -> Response:
    if isinstance(turn, TurnResponse):  # a replay: the whole message, which replaces what the client had
        events = iter(replay_events(turn))
    else:
        events = turn.follow(last_event_id)
    response = Response(stream_with_context(relay(events)), status=200, mimetype="text/event-stream")
    # Proxies must pass each event on at once.
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if isinstance(turn, TurnResponse):
        response.headers["Idempotent-Replayed"] = "true"
    return response


# What a turn can answer besides its ChatResponse, and the request headers it reads: the same for a
# message sent and an answer regenerated.
TURN_ERRORS = (
    errors.PayloadTooLarge,
    errors.RateLimited,
    errors.QuotaExceeded,
    errors.ConversationNotFound,
    errors.ConversationBusy,
    errors.IdempotencyInProgress,
    errors.IdempotencyKeyReused,
    errors.TurnStopped,
    errors.AgentUnavailable,
)
TURN_HEADERS = (
    ("Idempotency-Key", "Makes retries safe (same as request_id)"),
    ("X-Request-ID", "Traced through to the agent"),
    ("Last-Event-ID", "Resumes a stream after this event (with the same Idempotency-Key and stream: true)"),
)


@bp.post("/api/<user_id>/chat")
@documented(
    summary="Send a message; the agent's answer",
    operation_id="send_message",
    replays=True,
    body=ChatRequestSchema,
    response=ChatResponseSchema,
    errors=TURN_ERRORS,
    headers=TURN_HEADERS,
    streams=True,
    tags=("chat",),
)
def chat(user_id: str):
    """One chat turn."""
    chat_request = load_chat_request(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate,
    note(user_id=user_id, conversation_id=chat_request.conversation_id)
    enforce_rate_limit(user_id)  # then the rate limit (and, in the service, the idempotency key and the budget)
    with TURNS_IN_FLIGHT.track_inprogress():
        turn = current_app.extensions["chat_service"].send(  # 3. resolve the conversation; 4. execute the agent
            user_id, chat_request, request_id=g.request_id, note=note)
    return respond(chat_request, turn)  # 5. return


@bp.post("/api/<user_id>/conversations/<conversation_id>/regenerate")
@documented(
    summary="Answer the conversation's latest message again; the new answer replaces the latest one",
    operation_id="regenerate_answer",
    replays=True,
    body=RegenerateRequestSchema,
    body_required=False,
    response=ChatResponseSchema,
    errors=(*TURN_ERRORS, errors.MessageNotFound),
    headers=TURN_HEADERS,
    streams=True,
    tags=("chat",),
)
def regenerate(user_id: str, conversation_id: str):
    """The agent answers the conversation again up to its latest user message; the new answer (a new
    message_id, the same seq) replaces the latest one, in one transaction, as a turn is stored."""
    regenerate_request = load_regenerate_request(user_id, conversation_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate,
    note(user_id=user_id, conversation_id=conversation_id, regenerate=True)
    enforce_rate_limit(user_id)  # then the rate limit (and, in the service, the idempotency key and the budget)
    with TURNS_IN_FLIGHT.track_inprogress():
        turn = current_app.extensions["chat_service"].send(  # 3. resolve the conversation; 4. execute the agent
            user_id, regenerate_request, request_id=g.request_id, note=note)
    return respond(regenerate_request, turn)  # 5. return
