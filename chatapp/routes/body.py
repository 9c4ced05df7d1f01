"""Reading a JSON request body strictly: Flask's get_json() accepts NaN and lets deep nesting escape as a 500."""
import json

from flask import request

from chatapp.errors import InvalidRequest


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def json_body() -> object:
    """The decoded JSON body; 400 for another content type or invalid JSON, 413 past MAX_CONTENT_LENGTH."""
    if request.mimetype != "application/json":
        raise InvalidRequest("Content-Type must be application/json")
    raw = request.get_data(cache=False)  # raises RequestEntityTooLarge past MAX_CONTENT_LENGTH
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("Request body is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest("Request body is not valid JSON") from None
