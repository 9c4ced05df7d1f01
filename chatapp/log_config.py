"""Logging to stdout: JSON lines in production, readable text in development."""
import json
import logging
import os
import select
import sys
import threading
import time
from datetime import datetime, timezone

from flask import Flask, g, has_app_context, request
from gunicorn.glogging import Logger as GunicornLogger

request_log = logging.getLogger("chatapp.request")


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request it was logged under."""

    def filter(self, record):
        if not getattr(record, "request_id", None):
            record.request_id = g.get("request_id") if has_app_context() else None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, as log collectors expect; gunicorn.conf.py formats gunicorn's own
    records with it too."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class GunicornJsonLogger(GunicornLogger):
    """gunicorn's logger (gunicorn.conf.py's logger_class in production), its lines written as
    JSON objects by JsonFormatter. (gunicorn's logconfig_dict would do it too, but it turns
    gunicorn's access log on, a second line for every request.)"""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.setFormatter(JsonFormatter())


class LineWriter(logging.Handler):
    """Writes each record as one line with one write() to a file descriptor, from the thread that
    logs it, holding no lock for a line of up to PIPE_BUF bytes: the kernel keeps such a write
    whole, on a pipe as on a file. A longer line (a traceback) takes a lock, so that two of them
    never interleave.

    Stands in for logging.StreamHandler, which writes under a lock: with dozens of request
    threads, the thread holding it waited for the GIL after its write, and a dozen requests queued
    behind it (py-spy, bench S3); measured again, S3 was 7% slower with it
    (bench/results/2026-12-02-libraries.md). A writer thread behind a queue avoided the lock but
    woke for every line: strace of a worker under sequential turns counted 18.5 futex calls (GIL
    hand-overs) a turn with it, 12.4 with this."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self._long_lines = threading.Lock()

    def handle(self, record):
        passed = self.filter(record)  # a filter may return a replacement record (Python 3.12)
        if passed:
            self.emit(passed if isinstance(passed, logging.LogRecord) else record)
        return passed

    def emit(self, record):
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if len(line) <= select.PIPE_BUF:
                self._write(line)
            else:
                with self._long_lines:
                    self._write(line)
        except Exception:
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def stdout_handler() -> logging.Handler:
    """A LineWriter on stdout's descriptor; a StreamHandler where stdout has none (a test's capture)."""
    try:
        return LineWriter(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        return logging.StreamHandler(sys.stdout)


def configure_logging(app: Flask) -> None:
    """Send the app's and the library loggers' records to stdout in the configured format; in
    tests through sys.stdout, so that pytest's capture sees them."""
    handler = logging.StreamHandler(sys.stdout) if app.testing else stdout_handler()
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
