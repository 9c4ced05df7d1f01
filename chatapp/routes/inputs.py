"""Reading request input strictly: the path's user id, query parameters, a JSON body."""
import json

from flask import current_app, request
from marshmallow import Schema

from chatapp.errors import InvalidRequest, PayloadTooLarge
from chatapp.schemas import PathUserSchema


# Schema instances are stateless between calls: built once, shared by every thread.
_PATH_USER = PathUserSchema()


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


class _DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs):
    """An object's members, refusing a key given twice: a proxy or a validator in front may have
    read the first value where json.loads keeps the last."""
    members = dict(pairs)
    if len(members) != len(pairs):
        seen = set()
        for key, _value in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return members


def check_user_id(user_id: str) -> None:
    """The path's user id: 1 to 255 characters (400 otherwise)."""
    _PATH_USER.load({"user_id": user_id})


def query_params(schema: Schema) -> dict:
    """The query string, validated by `schema` (400 for unknown or invalid parameters)."""
    return schema.load(request.args.to_dict())


_READ_BYTES = 64 * 1024


def body_bytes() -> bytes:
    """The request body; 413 past MAX_CONTENT_LENGTH, having read at most one byte more.

    Werkzeug refuses a larger Content-Length before reading. A chunked body has none, and
    Werkzeug's limit then ends the body at MAX_CONTENT_LENGTH without a word: a body cut there
    would be parsed as if it were whole. So it is read here, up to one byte past the limit."""
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        return request.get_data(cache=False)  # RequestEntityTooLarge (413) past MAX_CONTENT_LENGTH
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    stream, body = request.environ["wsgi.input"], bytearray()
    while chunk := stream.read(min(_READ_BYTES, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge()
    return bytes(body)


def json_body() -> object:
    """The decoded JSON body; 400 for another content type or invalid JSON, 413 past
    MAX_CONTENT_LENGTH. Not get_json(): it accepts NaN and lets deep nesting escape as a 500."""
    if request.mimetype != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    return _decode(body_bytes())


def optional_json_body() -> object:
    """The decoded JSON body as json_body() reads it, or an empty object for a request without one."""
    raw = body_bytes()
    if not raw:
        return {}
    if request.mimetype != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    return _decode(raw)


def _decode(raw: bytes) -> object:
    try:
        return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply") from None
    except _DuplicateKey as duplicate:
        raise InvalidRequest(f"Request body has the key {duplicate.key!r} more than once",
                             errors={duplicate.key: ["Given more than once."]}) from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest("Request body is not valid JSON") from None
