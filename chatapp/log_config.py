"""Logging to stdout: JSON lines in production, readable text in development."""
import atexit
import json
import logging
import queue
import sys
import time
from datetime import datetime, timezone
from logging.handlers import QueueHandler, QueueListener

from flask import Flask, g, has_app_context, request

request_log = logging.getLogger("chatapp.request")


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request it was logged under."""

    def filter(self, record):
        if not getattr(record, "request_id", None):
            record.request_id = g.get("request_id") if has_app_context() else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, as log collectors expect."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": record.request_id,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class HandOffHandler(QueueHandler):
    """Formats a record in the thread that logs it and hands the line to the writer thread.

    A StreamHandler writes under a lock: with dozens of request threads, the thread holding it
    waits for the GIL after its write, and every other request queues behind that lock. Putting
    on a SimpleQueue needs no lock, so this handler takes none."""

    def handle(self, record):
        passed = self.filter(record)  # a filter may return a replacement record (Python 3.12)
        if passed:
            self.emit(passed if isinstance(passed, logging.LogRecord) else record)
        return passed


_writer: QueueListener | None = None


def stop_log_writer() -> None:
    """Write out what is queued and stop the writer thread (at exit, or before a new one)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


atexit.register(stop_log_writer)


def configure_logging(app: Flask) -> None:
    """Send the app's and the library loggers' records to stdout in the configured format; in
    tests synchronously, otherwise through one writer thread per process."""
    global _writer
    if app.testing:
        handler = logging.StreamHandler(sys.stdout)
    else:
        stop_log_writer()
        lines = queue.SimpleQueue()
        _writer = QueueListener(lines, logging.StreamHandler(sys.stdout))
        _writer.start()
        handler = HandOffHandler(lines)
    handler.addFilter(RequestIdFilter())
    if app.config["LOG_FORMAT"] == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("chatapp")
    root.handlers[:] = [handler]
    root.setLevel(app.config["LOG_LEVEL"])
    root.propagate = app.testing  # lets pytest's caplog see records in tests


def note(**fields) -> None:
    """Add fields to this request's log line (user_id, conversation_id, agent_ms, ...)."""
    g.setdefault("log_fields", {}).update(fields)


def log_request(response):
    """One line per request: what was asked, how it ended, how long it took. Never a token, a
    message's content or the agent's key: only the fields noted by the views and error handler."""
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "duration_ms": round((time.perf_counter() - g.request_started) * 1000, 1),
        **g.get("log_fields", {}),
    }
    summary = " ".join(f"{name}={value}" for name, value in fields.items() if name not in ("method", "path"))
    request_log.info("%s %s %s", request.method, request.path, summary, extra={"fields": fields})
    return response


def register_request_log(app: Flask) -> None:
    app.after_request(log_request)
