"""The ApiError family and the one place that turns any failure into the contract's JSON body."""
import logging
from collections.abc import Callable

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the client is told about: HTTP status, stable code, human detail, extra headers."""

    status = 500
    code = "internal_error"
    detail = "Internal server error"
    retry_after: int | None = None  # seconds; sent as Retry-After when set

    def __init__(self, detail=None, *, errors=None, headers=None, retry_after=None):
        super().__init__(detail or self.detail)
        if detail:
            self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.retry_after = max(1, int(retry_after))
        if self.retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after))


class InvalidRequest(ApiError):
    status, code, detail = 400, "invalid_request", "Invalid request"


class PayloadTooLarge(ApiError):
    status, code, detail = 413, "payload_too_large", "Request body too large"


class Unauthorized(ApiError):
    """Base of the 401s: all carry the Bearer challenge."""

    status = 401

    def __init__(self, detail=None, **kwargs):
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class AuthenticationRequired(Unauthorized):
    code, detail = "authentication_required", "Authentication required"


class InvalidToken(Unauthorized):
    code, detail = "invalid_token", "Invalid token"


class TokenExpired(Unauthorized):
    code, detail = "token_expired", "Token has expired"


class Forbidden(ApiError):
    status, code, detail = 403, "forbidden", "Cannot access another user's chat"


class RouteNotFound(ApiError):
    status, code, detail = 404, "not_found", "Not found"


class MethodNotAllowed(ApiError):
    status, code, detail = 405, "method_not_allowed", "Method not allowed"


class RateLimited(ApiError):
    status, code, detail = 429, "rate_limited", "Rate limit exceeded"


class QuotaExceeded(ApiError):
    """The user's token budget is used up; Retry-After: the seconds until its period resets."""

    status, code, detail = 429, "quota_exceeded", "Token budget used up for this period"


class ConversationNotFound(ApiError):
    status, code, detail = 404, "conversation_not_found", "Conversation not found"


class MessageNotFound(ApiError):
    status, code, detail = 404, "message_not_found", "Message not found"


class ConversationBusy(ApiError):
    status, code, detail = 409, "conversation_busy", "Another turn of this conversation is in progress"
    retry_after = 1


class TurnStopped(ApiError):
    status, code, detail = 409, "turn_stopped", "The turn was stopped before the agent's answer began"


class NoTurnInProgress(ApiError):
    status, code, detail = 409, "no_turn_in_progress", "No turn of this conversation is in progress"


class IdempotencyInProgress(ApiError):
    status, code, detail = 409, "idempotency_in_progress", "A request with this idempotency key is in progress"
    retry_after = 1


class IdempotencyKeyReused(ApiError):
    status, code, detail = 422, "idempotency_key_reused", "Idempotency key was used for a different request"


class AgentUnavailable(ApiError):
    """The agent failed; `detail` is ours, never the agent's URL, key or body. `kind` (one of
    chatapp.agent.transport.FailureKind, http_<status> for an error status) and `attempts` are
    for the log line."""

    status, code, detail = 503, "agent_unavailable", "The agent is unavailable, try again later"
    retry_after = 1

    def __init__(self, detail=None, *, kind="unavailable", attempts=0, agent=None, **kwargs):
        super().__init__(detail, **kwargs)
        self.kind = kind
        self.attempts = attempts
        self.agent = agent  # primary or fallback: the last one tried

    @property
    def log_fields(self) -> dict:
        fields = {"agent_kind": self.kind, "agent_attempts": self.attempts}
        if self.agent:
            fields["agent"] = self.agent
        return fields


class ServiceUnavailable(ApiError):
    status, code, detail = 503, "service_unavailable", "Service temporarily unavailable"
    retry_after = 1


# Werkzeug's HTTP errors that reach us, by status; anything else becomes InvalidRequest (4xx) or 500.
_HTTP_ERRORS = {404: RouteNotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def error_body(error: ApiError, request_id: str) -> dict:
    """The contract's error body (also the data of a stream's `error` event)."""
    body = {"detail": error.detail, "code": error.code, "request_id": request_id}
    if error.errors is not None:
        body["errors"] = error.errors
    return body


def error_response(error: ApiError, request_id: str) -> Response:
    """The contract's JSON error body with the error's status and headers."""
    response = jsonify(error_body(error, request_id))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _from_http_exception(exc: HTTPException) -> ApiError:
    error_class = _HTTP_ERRORS.get(exc.code)
    if error_class is not None:
        error = error_class()
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            error.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return error
    if exc.code is not None and 400 <= exc.code < 500:
        return InvalidRequest()
    return ApiError()


def _from_validation_error(exc: ValidationError) -> ApiError:
    messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
    fields = sorted(name for name in messages if name != "_schema")
    detail = f"Invalid request: {', '.join(fields)}" if fields else str(messages["_schema"][0])
    return InvalidRequest(detail, errors=messages)


def _database_unavailable(exc: Exception) -> bool:
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def as_api_error(exc: Exception) -> ApiError:
    """What the client is told about any exception; unexpected ones are logged with their traceback."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return _from_validation_error(exc)
    if isinstance(exc, HTTPException):
        return _from_http_exception(exc)
    if _database_unavailable(exc):
        # The driver's message only: SQLAlchemy's own would carry the statement's parameters.
        reason = (str(getattr(exc, "orig", "")).strip().splitlines() or [type(exc).__name__])[0]
        log.error("database unavailable: %s", reason)
        return ServiceUnavailable()
    log.error("unhandled error", exc_info=exc)
    return ApiError()


def log_fields(error: ApiError) -> dict:
    """What the request's log line says of how it failed."""
    return {"error": error.code, **getattr(error, "log_fields", {})}


def register_error_handlers(app: Flask, *, request_id: Callable[[], str], note: Callable[..., None]) -> None:
    """Route every exception, ours or not, through as_api_error() and error_response(); the
    request's log line (`note`) says how it failed."""

    @app.errorhandler(Exception)
    def handle_any(exc: Exception):
        error = as_api_error(exc)
        note(**log_fields(error))
        return error_response(error, request_id())
