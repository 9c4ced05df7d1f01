"""POST /api/<user_id>/chat: the five steps of the contract, in order."""
import functools
import json

from flask import Blueprint, Response, current_app, g, request, stream_with_context

from chatapp import errors
from chatapp.auth import authenticate
from chatapp.chat_service import ChatTurn, TurnResult, TurnStream, send_message
from chatapp.errors import as_api_error, error_body
from chatapp.log_config import note
from chatapp.metrics import TURNS_IN_FLIGHT
from chatapp.openapi import documented
from chatapp.rate_limit import enforce_rate_limit
from chatapp.routes.inputs import check_user_id, json_body
from chatapp.schemas import ChatRequestSchema, ChatResponseSchema, idempotency_key

bp = Blueprint("chat", __name__)


# Schema instances are stateless between calls: built once, shared by every thread.
_CHAT_RESPONSE = ChatResponseSchema()


@functools.cache
def chat_request_schema(default_model: str | None, allowed_models: tuple[str, ...]) -> ChatRequestSchema:
    """The request schema for an app's model settings, built once."""
    return ChatRequestSchema(default_model=default_model, allowed_models=allowed_models)


def load_chat_request(user_id: str) -> dict:
    """Step 1: the path's user id, the JSON body and the idempotency key, validated."""
    check_user_id(user_id)
    config = current_app.config
    schema = chat_request_schema(config["DEFAULT_MODEL"], tuple(config["ALLOWED_MODELS"] or ()))
    chat_request = schema.load(json_body())
    chat_request["idempotency_key"] = idempotency_key(request.headers.get("Idempotency-Key"), chat_request.pop("request_id"))
    return chat_request


def compact_json(data) -> str:
    """JSON as every other body of the service is written (jsonify's compact form), on one line."""
    return current_app.json.dumps(data, separators=(",", ":"))


def render_chat_response(turn: ChatTurn) -> str:
    """The ChatResponse, exactly as sent (and stored for idempotent replays); the data of `done`."""
    return compact_json(_CHAT_RESPONSE.dump(turn))


def chat_response(result: TurnResult) -> Response:
    # The line end that jsonify adds to every other body: a terminal's prompt starts on a line of its own.
    response = Response(result.body + "\n", status=200, mimetype="application/json")
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def server_sent_event(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


def delta_event(content: str) -> str:
    return server_sent_event("delta", compact_json({"content": content}))


def relay(turn: TurnStream):
    """The agent's pieces as `delta` events; `done` once the turn is stored; `error` if it fails."""
    with TURNS_IN_FLIGHT.track_inprogress():
        try:
            for piece in turn:
                yield delta_event(piece)
            result = turn.finish()
        except GeneratorExit:  # the client went away: end the agent call, store nothing
            turn.abort()
            raise
        except Exception as exc:
            error = as_api_error(exc)
            turn.abort(exc)
            yield server_sent_event("error", compact_json(error_body(error)))
            return
        yield server_sent_event("done", result.body)


def replay_events(result: TurnResult):
    """A finished turn, streamed again: its whole message as one delta, then done."""
    yield delta_event(json.loads(result.body)["message"])
    yield server_sent_event("done", result.body)


def event_stream_response(outcome: TurnResult | TurnStream) -> Response:
    events = replay_events(outcome) if isinstance(outcome, TurnResult) else relay(outcome)
    response = Response(stream_with_context(events), status=200, mimetype="text/event-stream")
    # Proxies must pass each event on at once.
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if isinstance(outcome, TurnResult):
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
    note(user_id=user_id, conversation_id=chat_request["conversation_id"])
    enforce_rate_limit(user_id)  # then the rate limit (and, in the service, the idempotency key)
    with TURNS_IN_FLIGHT.track_inprogress():
        outcome = send_message(  # 3. resolve the conversation; 4. execute the agent, store the turn
            user_id, chat_request, current_app.extensions["chat_agent"], render_chat_response, request_id=g.request_id
        )
    if chat_request["stream"]:  # 5. return: the answer as it is written, stored when complete
        note(stream=True)
        return event_stream_response(outcome)
    note(conversation_id=outcome.conversation_id, agent_ms=outcome.agent_ms, agent_attempts=outcome.agent_attempts, replayed=outcome.replayed)
    return chat_response(outcome)  # 5. return
