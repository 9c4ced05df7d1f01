"""POST /api/<user_id>/chat: the five steps of the contract, in order."""
import functools
import json

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from chatapp import errors
from chatapp.auth import authenticate
from chatapp.chat_service import TurnResponse, TurnStream
from chatapp.errors import as_api_error, error_body, log_fields
from chatapp.log_config import note
from chatapp.metrics import TURNS_IN_FLIGHT
from chatapp.openapi import documented
from chatapp.rate_limit import enforce_rate_limit
from chatapp.routes.inputs import check_user_id, json_body
from chatapp.schemas import ChatRequest, ChatRequestSchema, ChatResponseSchema

bp = Blueprint("chat", __name__)


@functools.cache
def chat_request_schema(default_model: str | None, allowed_models: tuple[str, ...]) -> ChatRequestSchema:
    """The request schema for an app's model settings, built once (schemas hold no state between calls)."""
    return ChatRequestSchema(default_model=default_model, allowed_models=allowed_models)


def load_chat_request(user_id: str) -> ChatRequest:
    """Step 1: the path's user id, the JSON body and the idempotency key, validated."""
    check_user_id(user_id)
    config = current_app.config
    schema = chat_request_schema(config["DEFAULT_MODEL"], tuple(config["ALLOWED_MODELS"] or ()))
    return schema.load_chat_request(json_body(), request.headers.get("Idempotency-Key"))


def respond(chat_request: ChatRequest, turn: TurnResponse | TurnStream) -> Response:
    """Step 5: the ChatResponse, or the answer as server-sent events (a replay streams too, when asked)."""
    if chat_request.stream:
        note(stream=True)
        return event_stream_response(turn)
    note(conversation_id=turn.conversation_id, replayed=turn.replayed)
    # The line end that jsonify adds to every other body: a terminal's prompt starts on a line of its own.
    response = Response(turn.body + "\n", status=200, mimetype="application/json")
    if turn.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def server_sent_event(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def delta_event(content: str) -> str:
    return server_sent_event("delta", json.dumps({"content": content}, separators=(",", ":")))


def relay(turn: TurnStream):
    """The agent's pieces as `delta` events; `done` once the turn is stored; `error` if it fails."""
    with TURNS_IN_FLIGHT.track_inprogress():
        try:
            for piece in turn:
                yield delta_event(piece)
            stored = turn.finish()
        except GeneratorExit:  # the client went away: end the agent call, store nothing
            turn.abort()
            raise
        except Exception as exc:
            error = as_api_error(exc)
            turn.abort(exc)
            note(**log_fields(error))
            yield server_sent_event("error", json.dumps(error_body(error, g.request_id), separators=(",", ":")))
            return
        yield server_sent_event("done", stored.body)


def replay_events(replay: TurnResponse):
    """A finished turn, streamed again: its whole message as one delta, then done."""
    yield delta_event(replay.message)
    yield server_sent_event("done", replay.body)


def event_stream_response(turn: TurnResponse | TurnStream) -> Response:
    events = relay(turn) if isinstance(turn, TurnStream) else replay_events(turn)
    response = Response(stream_with_context(events), status=200, mimetype="text/event-stream")
    # Proxies must pass each event on at once.
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if isinstance(turn, TurnResponse):
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.post("/api/<user_id>/chat")
@documented(
    summary="Send a message; the agent's answer",
    operation_id="send_message",
    replays=True,
    body=ChatRequestSchema,
    response=ChatResponseSchema,
    errors=(
        errors.PayloadTooLarge,
        errors.RateLimited,
        errors.ConversationNotFound,
        errors.ConversationBusy,
        errors.IdempotencyInProgress,
        errors.IdempotencyKeyReused,
        errors.AgentUnavailable,
    ),
    headers=(("Idempotency-Key", "Makes retries safe (same as request_id)"), ("X-Request-ID", "Traced through to the agent")),
    streams=True,
    tags=("chat",),
)
def chat(user_id: str):
    """One chat turn."""
    chat_request = load_chat_request(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate,
    note(user_id=user_id, conversation_id=chat_request.conversation_id)
    enforce_rate_limit(user_id)  # then the rate limit (and, in the service, the idempotency key)
    with TURNS_IN_FLIGHT.track_inprogress():
        turn = current_app.extensions["chat_service"].send(  # 3. resolve the conversation; 4. execute the agent
            user_id, chat_request, request_id=g.request_id, note=note)
    return respond(chat_request, turn)  # 5. return
