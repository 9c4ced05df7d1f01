"""Assertions the tests share: the contract's error answers, and readings of /metrics."""
import re

# The codes whose answers tell the client when to try again.
RETRY_AFTER_CODES = {"conversation_busy", "idempotency_in_progress", "rate_limited", "quota_exceeded",
                     "agent_unavailable", "service_unavailable"}


def _json(response):
    """The decoded body of a Flask test response or a requests response."""
    return response.get_json() if hasattr(response, "get_json") else response.json()


def assert_error(response, status, code):
    """A contract error, whole: the status; JSON; exactly detail, code and request_id (and, on a
    400 from validation, errors by field); request_id equal to the X-Request-ID header; the
    headers its code carries (WWW-Authenticate on a 401, Retry-After where the client should
    wait). Returns the body."""
    body_text = response.data if hasattr(response, "data") else response.content
    assert response.status_code == status, body_text
    assert response.headers["Content-Type"] == "application/json", response.headers["Content-Type"]
    body = _json(response)
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    assert body["request_id"] == response.headers["X-Request-ID"]
    allowed = {"detail", "code", "request_id"} | ({"errors"} if code == "invalid_request" else set())
    assert set(body) <= allowed and {"detail", "code", "request_id"} <= set(body), body
    if "errors" in body:
        assert isinstance(body["errors"], dict) and body["errors"], body
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if code in RETRY_AFTER_CODES:
        assert int(response.headers["Retry-After"]) >= 1
    return body


def metric(text, name, **labels):
    """The value of one sample of the Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def sse_events(text: str) -> list[tuple[int | None, str, str]]:
    """The (id, event, data) of each event of a server-sent event stream's text; comments skipped."""
    found = []
    for block in text.strip().split("\n\n"):
        fields = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            found.append((int(fields["id"]) if "id" in fields else None, fields["event"], fields.get("data", "")))
    return found
