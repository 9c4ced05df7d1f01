"""X-Request-ID: the client's when sane, else a new one; echoed on every response."""
import re
import time
import uuid

from flask import Flask, g, request

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def current_request_id() -> str:
    """The id of the request being served (the request-id hook sets it first), or a fresh one."""
    return g.setdefault("request_id", uuid.uuid4().hex)


def assign_request_id() -> None:
    """Adopt the client's X-Request-ID when it is 1 to 128 visible ASCII characters; note when
    the request started (for its log line and metrics)."""
    g.request_started = time.perf_counter()
    client_id = request.headers.get(REQUEST_ID_HEADER, "")
    g.request_id = client_id if _SANE_REQUEST_ID.fullmatch(client_id) else uuid.uuid4().hex


def register_request_ids(app: Flask) -> None:
    """Assign the id before anything else runs, and return it on every response, errors included."""
    app.before_request_funcs.setdefault(None, []).insert(0, assign_request_id)

    @app.after_request
    def add_request_id_header(response):
        response.headers[REQUEST_ID_HEADER] = current_request_id()
        return response
