"""The OpenAPI document, generated from the routes and the same marshmallow schemas that
validate requests: each view declares its schemas and the ApiErrors it can raise."""
import re
from dataclasses import dataclass, field

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema

from chatapp import errors
from chatapp.schemas import IDEMPOTENCY_KEY_JSON_PATTERN, Cursor, ErrorSchema

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


@dataclass(frozen=True)
class Operation:
    """What a view documents about itself."""

    summary: str
    status: int = 200
    response: Schema | type[Schema] | None = None
    body: Schema | type[Schema] | None = None
    query: Schema | type[Schema] | None = None
    errors: tuple = ()
    headers: tuple = ()  # request headers: (name, description)
    authenticated: bool = True
    streams: bool = False  # also answers 200 as server-sent events ("stream": true)
    tags: tuple = field(default=())


def documented(**kwargs):
    """Attach an Operation to a view; build_openapi() turns it into the document."""

    def attach(view):
        view.openapi = Operation(**kwargs)
        return view

    return attach


def _response_headers(status: int) -> dict:
    headers = {"X-Request-ID": {"schema": {"type": "string"}, "description": "The request's id"}}
    if status in (409, 429, 503):
        headers["Retry-After"] = {"schema": {"type": "integer"}, "description": "Seconds to wait"}
    if status == 401:
        headers["WWW-Authenticate"] = {"schema": {"type": "string"}}
    return headers


def _operation(path_params: list[str], operation: Operation) -> dict:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
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
    success = {"description": operation.summary, "headers": _response_headers(operation.status)}
    if operation.response is not None:
        success["content"] = {"application/json": {"schema": operation.response}}
    if operation.streams:
        success["content"]["text/event-stream"] = {"schema": SERVER_SENT_EVENT}
    responses = {str(operation.status): success}
    raised = (AUTHENTICATED_ERRORS if operation.authenticated else ()) + tuple(operation.errors)
    for status in sorted({error.status for error in raised}):
        codes = sorted({error.code for error in raised if error.status == status})
        responses[str(status)] = {
            "description": " or ".join(f"`{code}`" for code in codes),
            "headers": _response_headers(status),
            "content": {"application/json": {"schema": "Error"}},
        }
    spec = {"summary": operation.summary, "parameters": parameters, "responses": responses}
    if operation.body is not None:
        spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": operation.body}}}
    if operation.authenticated:
        spec["security"] = [{"bearerAuth": []}]
    if operation.tags:
        spec["tags"] = list(operation.tags)
    return spec


def build_openapi(app: Flask) -> dict:
    """The OpenAPI document of every documented route of `app`."""
    marshmallow = MarshmallowPlugin()
    spec = APISpec(title="chatapp", version="1.0.0", openapi_version=OPENAPI_VERSION, plugins=[marshmallow])
    marshmallow.map_to_openapi_type(Cursor, "string", None)
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.schema("Error", schema=ErrorSchema)
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        operation = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if operation is None:
            continue
        path = _FLASK_ARGUMENT.sub(r"{\1}", rule.rule)
        path_params = _FLASK_ARGUMENT.findall(rule.rule)
        for method in sorted(m.lower() for m in rule.methods if m.lower() in _METHODS):
            paths.setdefault(path, {})[method] = _operation(path_params, operation)
    for path, operations in sorted(paths.items()):
        spec.path(path=path, operations=operations)
    return spec.to_dict()
