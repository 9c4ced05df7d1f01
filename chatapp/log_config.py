"""Logging to stdout: JSON lines in production, readable text in development."""
import json
import logging
import sys
from datetime import datetime, timezone

from flask import Flask, g, has_app_context


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
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(app: Flask) -> None:
    """Send the app's and the library loggers' records to stdout in the configured format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RequestIdFilter())
    if app.config["LOG_FORMAT"] == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger("chatapp")
    root.handlers[:] = [handler]
    root.setLevel(app.config["LOG_LEVEL"])
    root.propagate = app.testing  # lets pytest's caplog see records in tests
