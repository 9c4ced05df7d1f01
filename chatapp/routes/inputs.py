"""Reading request input strictly: the path's user id, query parameters, a JSON body."""
import json

from flask import request
from marshmallow import Schema

from chatapp.errors import InvalidRequest
from chatapp.schemas import PathUserSchema


# Schema instances are stateless between calls: built once, shared by every thread.
_PATH_USER = PathUserSchema()


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def check_user_id(user_id: str) -> None:
    """The path's user id: 1 to 255 characters (400 otherwise)."""
    _PATH_USER.load({"user_id": user_id})


def query_params(schema: Schema) -> dict:
    """The query string, validated by `schema` (400 for unknown or invalid parameters)."""
    return schema.load(request.args.to_dict())


def json_body() -> object:
    """The decoded JSON body; 400 for another content type or invalid JSON, 413 past
    MAX_CONTENT_LENGTH. Not get_json(): it accepts NaN and lets deep nesting escape as a 500."""
    if request.mimetype != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    raw = request.get_data(cache=False)  # raises RequestEntityTooLarge past MAX_CONTENT_LENGTH
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest("Request body is not valid JSON") from None
