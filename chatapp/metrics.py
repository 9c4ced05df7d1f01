"""Prometheus metrics at GET /metrics; correct across gunicorn workers in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, which gunicorn.conf.py sets up)."""
import hmac
import os
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from chatapp import errors
from chatapp.agent import FailureKind
from chatapp.auth import bearer_token
from chatapp.errors import InvalidToken
from chatapp.openapi import documented

bp = Blueprint("metrics", __name__)
# prometheus_client picks its storage when imported; /metrics must read the same one.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

HTTP_REQUESTS = Counter("chatapp_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "chatapp_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
AGENT_DURATION = Histogram(
    "chatapp_agent_call_duration_seconds",
    "Time of one agent call, retries included, by outcome and by the agent that answered",
    ["outcome", "agent"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
BREAKER_OPEN = Gauge("chatapp_agent_breaker_open", "1 while the agent's circuit breaker is open (or half open), per process",
                     ["agent"], multiprocess_mode="liveall")
KEY_SET_FETCHES = Counter("chatapp_jwks_fetch_total", "Fetches of the identity provider's key set, by outcome", ["outcome"])
TOKENS = Counter("chatapp_tokens_total", "Tokens counted for stored turns (estimated where the agent reported none), "
                 "by the model that answered and kind (prompt, completion)", ["model", "kind"])
# Models are named by clients (any string, without ALLOWED_MODELS) and by the agent: past this many
# distinct names in a process, the rest are counted as "other", so that the series stay few.
MODEL_LABELS_MAX = 50
_model_labels: set[str] = set()
TURNS_IN_FLIGHT = Gauge("chatapp_turns_in_flight", "Chat turns being served now", multiprocess_mode="livesum")


def agent_outcome(kind: str | None) -> str:
    """A bounded label for an agent call's result: ok, http_429, http_4xx, http_5xx, or the other
    kinds of FailureKind (timeout, connection, malformed, too_large, agent_error, aborted)."""
    if kind is None:
        return "ok"
    if kind.startswith("http_"):
        status = kind[len("http_"):]
        return "http_429" if status == "429" else f"http_{status[:1]}xx"
    return FailureKind(kind).value


def count_key_set_fetch(outcome: str) -> None:
    """A fetch of the identity provider's key set: ok or error."""
    KEY_SET_FETCHES.labels(outcome).inc()


def observe_agent_call(seconds: float, kind: str | None, agent: str = "primary") -> None:
    AGENT_DURATION.labels(agent_outcome(kind), agent).observe(seconds)


def model_label(model: str) -> str:
    """The model's own label while there are few; "other" past MODEL_LABELS_MAX of them."""
    if model in _model_labels:
        return model
    if len(_model_labels) >= MODEL_LABELS_MAX:
        return "other"
    _model_labels.add(model)
    return model


_token_counters: dict[str, tuple] = {}  # by model label (a few): its prompt and completion samples


def count_tokens(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """A stored turn's tokens, as its user's counters took them."""
    label = model_label(model)
    counters = _token_counters.get(label)
    if counters is None:  # labels() takes a lock and builds its key on every call: once a label is enough
        counters = _token_counters.setdefault(label, (TOKENS.labels(label, "prompt"), TOKENS.labels(label, "completion")))
    counters[0].inc(prompt_tokens)
    counters[1].inc(completion_tokens)


def set_breaker_open(agent: str, is_open: bool) -> None:
    """A breaker opened, or closed again."""
    BREAKER_OPEN.labels(agent).set(1 if is_open else 0)


def _count_request(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    HTTP_DURATION.labels(request.method, route).observe(time.perf_counter() - g.request_started)
    return response


def check_metrics_token() -> None:
    """With METRICS_TOKEN set, /metrics wants it as a bearer token: on a platform without a private
    network the metrics are otherwise public. 401 without a token or with another one."""
    expected = current_app.config["METRICS_TOKEN"]
    if expected is None:
        return
    if not hmac.compare_digest(bearer_token().encode(), expected.encode()):
        raise InvalidToken("Invalid metrics token")


@bp.get("/metrics")
@documented(
    summary="Prometheus metrics, summed over the workers",
    response={"type": "string"},
    media_type="text/plain",
    authenticated=False,
    security="metricsToken",
    errors=(errors.AuthenticationRequired, errors.InvalidToken),
    tags=("operations",),
)
def metrics():
    """The Prometheus text exposition, summed over every worker when several serve."""
    check_metrics_token()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        exposition = generate_latest(registry)
    else:
        exposition = generate_latest()
    # content_type, not mimetype: CONTENT_TYPE_LATEST carries its charset already.
    return Response(exposition, content_type=CONTENT_TYPE_LATEST)


def register_metrics(app: Flask) -> None:
    """Time and count every request (from the start the request-id hook notes); the blueprint
    serving /metrics is registered with the others."""
    app.after_request(_count_request)
