"""Prometheus metrics at GET /metrics; correct across gunicorn workers in multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, which gunicorn.conf.py sets up)."""
import os
import time

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

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
    "Time of one agent call, retries included, by outcome",
    ["outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)
TURNS_IN_FLIGHT = Gauge("chatapp_turns_in_flight", "Chat turns being served now", multiprocess_mode="livesum")


def agent_outcome(kind: str | None) -> str:
    """A bounded label for an agent call's result: ok, timeout, connection, http_429, http_4xx,
    http_5xx, malformed, too_large."""
    if kind is None:
        return "ok"
    if kind.startswith("http_"):
        status = kind[len("http_"):]
        return "http_429" if status == "429" else f"http_{status[:1]}xx"
    return kind


def observe_agent_call(seconds: float, kind: str | None) -> None:
    AGENT_DURATION.labels(agent_outcome(kind)).observe(seconds)


def _count_request(response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    HTTP_DURATION.labels(request.method, route).observe(time.perf_counter() - g.request_started)
    return response


@bp.get("/metrics")
def metrics():
    """The Prometheus text exposition, summed over every worker when several serve."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)


def register_metrics(app: Flask) -> None:
    """Time and count every request (from the start the request-id hook notes); serve /metrics."""
    app.after_request(_count_request)
    app.register_blueprint(bp)
