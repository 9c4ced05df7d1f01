"""The OpenAPI document, generated from the routes and the same marshmallow schemas that
validate requests: each view declares its schemas and the ApiErrors it can raise (@documented),
and build_openapi() walks the routes with apispec.

This is what flask-smorest's @blp.arguments / @blp.response do, and it stays ours on the merits:
flask-smorest parses the body with webargs before the view, as request.get_json() reads it (NaN
accepted, a key given twice silently resolved, a chunked body cut at MAX_CONTENT_LENGTH), where
the service refuses all three (routes/inputs.py); its validation errors are 422 in its own shape,
so every status would need our handler on top; and it documents responses by status only, where
each of ours names the error codes behind it. What is left here is a decorator and a walk over
the routes on apispec, the library flask-smorest itself builds on."""
import re
from dataclasses import dataclass, field, replace

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema

from chatapp import errors
from chatapp.schemas import IDEMPOTENCY_KEY_JSON_PATTERN, ConversationUpdateSchema, Cursor, Day, ErrorSchema
from chatapp.values import USER_ID_MAX_CHARS

OPENAPI_VERSION = "3.0.3"
# What any authenticated operation can answer, besides its own errors.
AUTHENTICATED_ERRORS = (
    errors.InvalidRequest,
    errors.AuthenticationRequired,
    errors.InvalidToken,
    errors.TokenExpired,
    errors.Forbidden,
    errors.RouteNotFound,
    errors.ApiError,
    errors.ServiceUnavailable,
)
# Every route honours the client's X-Request-ID (contract section 1), so every operation documents it.
REQUEST_ID_HEADER = (
    "X-Request-ID",
    "Your id for this request, sent back in the X-Request-ID response header and in error bodies "
    "when it is 1 to 128 visible ASCII characters (otherwise the service makes one)",
)
# Request headers whose values the service validates (400 otherwise); any other is a plain string.
HEADER_SCHEMAS = {"Idempotency-Key": {"type": "string", "pattern": IDEMPOTENCY_KEY_JSON_PATTERN}}
# One event of a streamed answer: `delta` events ({"content": ...}), then `done` (the JSON answer)
# or `error` (an error body); `data` is that JSON, as text.
SERVER_SENT_EVENT = {
    "type": "object",
    "properties": {"event": {"type": "string", "enum": ["delta", "done", "error"]}, "data": {"type": "string"}},
    "required": ["event", "data"],
}
_METHODS = ("get", "post", "put", "patch", "delete")
_FLASK_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


INFO_DESCRIPTION = """\
A chat back end between client applications and an OpenAI-compatible LLM server.

Every chat request runs the same five steps, in order, and the first that fails decides the
answer: validate the request (400, 413), authenticate the bearer JWT (401, 403; then the per-user
rate limit, 429, the idempotency key, 409 or 422, and the user's token budget, 429), resolve the
conversation (404, 409), call the agent and store the turn in one transaction (503, nothing
stored), return the answer.

Every error is JSON: `{"detail", "code", "request_id"}` (and `errors` per field for a 400 from
validation), with the `X-Request-ID` header that every answer carries. Send `Idempotency-Key` to
make retries safe: a finished key replays its answer byte for byte with `Idempotent-Replayed:
true`. The project's docs/api.md is the full reference."""
TAGS = (
    {"name": "chat", "description": "Send a message and get the agent's answer, whole or streamed (server-sent events)."},
    {"name": "history", "description": "The user's stored conversations and their messages; renaming a conversation, its "
                                       "metadata, feedback on answers; deleting a conversation; exporting or erasing "
                                       "everything of the user."},
    {"name": "usage", "description": "What each user spent, day by day, and their token budget."},
    {"name": "operations", "description": "Probes for load balancers and platforms, and Prometheus metrics."},
)
CONVERSATION_ID_EXAMPLE = "5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e"
# The answers documented as examples, by operationId (each operation has one; tests check it).
EXAMPLES = {
    "send_message": {
        "request": {"message": "Hello!", "conversation_id": CONVERSATION_ID_EXAMPLE},
        "response": {
            "conversation_id": CONVERSATION_ID_EXAMPLE,
            "message": "Hello! How can I help?",
            "role": "assistant",
            "created_at": "2026-11-25T21:04:05.123456+00:00",
            "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
            "message_id": "c3a1f0d2-7a4b-4c1e-9f3a-2b6d8e0f1a2c",
            "model": "gpt-4",
            "finish_reason": "stop",
        },
        "events": "event: delta\ndata: {\"content\":\"Hello!\"}\n\nevent: done\ndata: {\"conversation_id\":...}\n\n",
    },
    "regenerate_answer": {
        "request": {"model": "gpt-4"},
        "response": {
            "conversation_id": CONVERSATION_ID_EXAMPLE,
            "message": "Hi! What can I do for you?",
            "role": "assistant",
            "created_at": "2026-11-25T21:06:12.654321+00:00",
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
            "message_id": "7e2d4b1a-9c3f-4a5e-8b6d-1f0a2c3e4d5b",
            "model": "gpt-4",
            "finish_reason": "stop",
        },
        "events": "event: delta\ndata: {\"content\":\"Hi!\"}\n\nevent: done\ndata: {\"conversation_id\":...}\n\n",
    },
    "list_conversations": {
        "response": {
            "conversations": [{
                "conversation_id": CONVERSATION_ID_EXAMPLE,
                "title": "Hello!",
                "created_at": "2026-11-25T21:04:04.001234+00:00",
                "updated_at": "2026-11-25T21:04:05.123456+00:00",
                "message_count": 2,
                "metadata": {},
            }],
            "next_cursor": None,
        },
    },
    "get_conversation": {
        "response": {
            "conversation_id": CONVERSATION_ID_EXAMPLE,
            "title": "Hello!",
            "created_at": "2026-11-25T21:04:04.001234+00:00",
            "updated_at": "2026-11-25T21:04:05.123456+00:00",
            "message_count": 2,
            "metadata": {"project": "onboarding"},
        },
    },
    "update_conversation": {
        "request": {"title": "Onboarding questions", "metadata": {"project": "onboarding", "pinned": "yes"}},
        "response": {
            "conversation_id": CONVERSATION_ID_EXAMPLE,
            "title": "Onboarding questions",
            "created_at": "2026-11-25T21:04:04.001234+00:00",
            "updated_at": "2026-11-25T21:04:05.123456+00:00",
            "message_count": 2,
            "metadata": {"project": "onboarding", "pinned": "yes"},
        },
    },
    "list_messages": {
        "response": {
            "conversation_id": CONVERSATION_ID_EXAMPLE,
            "messages": [
                {"message_id": "0d6f3c2a-1b4e-4f5a-8c7d-9e0f1a2b3c4d", "seq": 1, "role": "user",
                 "content": "Hello!", "created_at": "2026-11-25T21:04:04.001234+00:00"},
                {"message_id": "c3a1f0d2-7a4b-4c1e-9f3a-2b6d8e0f1a2c", "seq": 2, "role": "assistant",
                 "content": "Hello! How can I help?", "created_at": "2026-11-25T21:04:05.123456+00:00",
                 "model": "gpt-4", "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
                 "finish_reason": "stop",
                 "feedback": {"rating": "like", "comment": "Short and clear.", "updated_at": "2026-11-25T21:05:10.654321+00:00"}},
            ],
            "has_more": False,
        },
    },
    "put_feedback": {
        "request": {"rating": "like", "comment": "Short and clear."},
        "response": {"message_id": "c3a1f0d2-7a4b-4c1e-9f3a-2b6d8e0f1a2c", "rating": "like", "comment": "Short and clear.",
                     "updated_at": "2026-11-25T21:05:10.654321+00:00"},
    },
    "delete_conversation": {"response": None},
    "erase_user_data": {"response": None},
    "stop_turn": {"response": {"conversation_id": CONVERSATION_ID_EXAMPLE, "stopped": True}},
    "get_usage": {
        "response": {
            "from": "2026-12-01", "to": "2026-12-31", "turns": 42, "prompt_tokens": 51234, "completion_tokens": 9876,
            "total_tokens": 61110, "estimated_turns": 2,
            "days": [{"date": "2026-12-05", "turns": 30, "prompt_tokens": 40000, "completion_tokens": 7000, "total_tokens": 47000},
                     {"date": "2026-12-06", "turns": 12, "prompt_tokens": 11234, "completion_tokens": 2876, "total_tokens": 14110}],
            "budget": {"limit": 5000000, "period": "month", "used": 61110, "remaining": 4938890,
                       "resets_at": "2027-01-01T00:00:00+00:00"},
        },
    },
    "healthz": {"response": {"status": "ok"}},
    "readyz": {"response": {"status": "ready", "agent": "closed"}},
    "metrics": {"response": "# HELP chatapp_turns_in_flight Chat turns being served now\n"
                            "# TYPE chatapp_turns_in_flight gauge\nchatapp_turns_in_flight 0.0\n"},
}
# The export holds the conversation and its messages exactly as the examples above show them.
EXAMPLES["export_user_data"] = {"response": {
    "user_id": "demo",
    "exported_at": "2026-12-01T09:30:00.123456+00:00",
    "conversations": [{**EXAMPLES["get_conversation"]["response"], "messages": EXAMPLES["list_messages"]["response"]["messages"]}],
}}
ERROR_EXAMPLE = {"detail": "Conversation not found", "code": "conversation_not_found",
                 "request_id": "9f1c2b7e4d3a4c5b8e6f0a1b2c3d4e5f"}


@dataclass(frozen=True)
class Operation:
    """What a view documents about itself."""

    summary: str
    operation_id: str = ""  # default: the view's name
    status: int = 200
    response: Schema | type[Schema] | None = None
    body: Schema | type[Schema] | None = None
    body_required: bool = True  # False: a request without a body is the empty object
    query: Schema | type[Schema] | None = None
    errors: tuple = ()
    headers: tuple = ()  # request headers: (name, description)
    authenticated: bool = True
    streams: bool = False  # also answers 200 as server-sent events ("stream": true)
    replays: bool = False  # answers a finished idempotency key again (Idempotent-Replayed)
    media_type: str = "application/json"  # of the success answer
    security: str | None = None  # another security scheme than the users' bearer JWT
    tags: tuple = field(default=())


def documented(**kwargs):
    """Attach an Operation to a view; build_openapi() turns it into the document."""

    def attach(view):
        view.openapi = Operation(**{"operation_id": view.__name__, **kwargs})
        return view

    return attach


def _response_headers(status: int) -> dict:
    headers = {"X-Request-ID": {"schema": {"type": "string"}, "description": "The request's id (yours, or a new one)"}}
    if status in (409, 429, 503):
        headers["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds to wait"}
    if status == 401:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
    return headers


def _operation(path_params: list[str], operation: Operation) -> dict:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": USER_ID_MAX_CHARS}}
        for name in path_params
    ]
    if operation.query is not None:
        parameters.append({"in": "query", "schema": operation.query})
    headers = operation.headers
    if not any(name.lower() == REQUEST_ID_HEADER[0].lower() for name, _ in headers):
        headers = (*headers, REQUEST_ID_HEADER)
    parameters += [
        {
            "name": name,
            "in": "header",
            "required": False,
            "schema": HEADER_SCHEMAS.get(name, {"type": "string"}),
            "description": description,
        }
        for name, description in headers
    ]
    examples = EXAMPLES[operation.operation_id]
    success = {"description": operation.summary, "headers": _response_headers(operation.status)}
    if operation.replays:
        success["headers"]["Idempotent-Replayed"] = {
            "schema": {"type": "string", "enum": ["true"]},
            "description": "Present when this is the stored answer of an idempotency key that already ran",
        }
    if operation.response is not None:
        success["content"] = {operation.media_type: {"schema": operation.response, "example": examples["response"]}}
    if operation.streams:
        success["content"]["text/event-stream"] = {"schema": SERVER_SENT_EVENT, "example": examples["events"]}
    responses = {str(operation.status): success}
    raised = (AUTHENTICATED_ERRORS if operation.authenticated else ()) + tuple(operation.errors)
    for status in sorted({error.status for error in raised}):
        codes = sorted({error.code for error in raised if error.status == status})
        responses[str(status)] = {
            "description": " or ".join(f"`{code}`" for code in codes),
            "headers": _response_headers(status),
            "content": {"application/json": {"schema": "Error", "example": {**ERROR_EXAMPLE, "code": codes[0]}}},
        }
    spec = {"operationId": operation.operation_id, "summary": operation.summary, "parameters": parameters,
            "responses": responses}
    if operation.body is not None:
        spec["requestBody"] = {
            "required": operation.body_required,
            "content": {"application/json": {"schema": operation.body, "example": examples["request"]}},
        }
    if operation.authenticated:
        spec["security"] = [{"bearerAuth": []}]
    elif operation.security:
        spec["security"] = [{operation.security: []}]
    if operation.tags:
        spec["tags"] = list(operation.tags)
    return spec


def build_openapi(app: Flask) -> dict:
    """The OpenAPI document of every documented route of `app`."""
    marshmallow = MarshmallowPlugin()
    spec = APISpec(title="chatapp", version="1.0.0", openapi_version=OPENAPI_VERSION, plugins=[marshmallow],
                   info={"description": INFO_DESCRIPTION})
    marshmallow.map_to_openapi_type(Cursor, "string", None)
    marshmallow.map_to_openapi_type(Day, "string", "date")
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.security_scheme("metricsToken", {
        "type": "http", "scheme": "bearer", "description": "METRICS_TOKEN, when the service has one set"})
    spec.components.schema("Error", schema=ErrorSchema)
    # What a schema's fields cannot say: a rename must change something.
    spec.components.schema("ConversationUpdate", component={"minProperties": 1}, schema=ConversationUpdateSchema)
    for tag in TAGS:
        spec.tag(tag)
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        operation = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if operation is None:
            continue
        if operation.security == "metricsToken" and not app.config["METRICS_TOKEN"]:
            operation = replace(operation, security=None, errors=())  # without a token /metrics is open
        path = _FLASK_ARGUMENT.sub(r"{\1}", rule.rule)
        path_params = _FLASK_ARGUMENT.findall(rule.rule)
        for method in sorted(m.lower() for m in rule.methods if m.lower() in _METHODS):
            paths.setdefault(path, {})[method] = _operation(path_params, operation)
    for path, operations in sorted(paths.items()):
        spec.path(path=path, operations=operations)
    return spec.to_dict()
