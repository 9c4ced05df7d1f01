"""The per-user rate limit of the chat endpoint (Flask-Limiter's storage and strategy).

Flask-Limiter's decorators check before the view runs, that is before validation and
authentication; the contract wants requests that fail steps 1 or 2 to use no quota, so the view
calls enforce_rate_limit() right after authenticate()."""
import logging
import math
import time

from flask import Flask, current_app
from flask_limiter import Limiter
from limits import parse

from chatapp.errors import RateLimited

log = logging.getLogger(__name__)

def register_rate_limit(app: Flask) -> None:
    """Storage in memory, or Redis at REDIS_URL so that every process and host shares one budget."""
    app.config["RATELIMIT_STORAGE_URI"] = app.config["REDIS_URL"] or "memory://"
    # A Redis that is down must cost a request little time: fail fast, then fail open.
    app.config["RATELIMIT_STORAGE_OPTIONS"] = {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}
    app.config["RATELIMIT_STRATEGY"] = "moving-window"
    app.config["RATELIMIT_KEY_PREFIX"] = "chatapp"
    # Keyed explicitly per user in enforce_rate_limit(); no limit applies to any route by itself.
    limiter = Limiter(key_func=lambda: "unused", default_limits=[], headers_enabled=False)
    limiter.init_app(app)
    app.extensions["chat_rate_limit"] = (limiter, parse(app.config["RATE_LIMIT"]))


def enforce_rate_limit(user_id: str) -> None:
    """Count one chat request for the user; 429 with Retry-After past RATE_LIMIT. If the storage
    is unreachable the request goes through (fail open) and the failure is logged."""
    limiter, rate = current_app.extensions["chat_rate_limit"]
    try:
        if limiter.limiter.hit(rate, "chat", user_id):
            return
        reset_at = limiter.limiter.get_window_stats(rate, "chat", user_id).reset_time
    except Exception as exc:  # any storage failure: Redis down, timing out, restarting
        log.warning("rate limit storage unavailable, request allowed: %s", type(exc).__name__)
        return
    raise RateLimited(retry_after=math.ceil(max(1.0, reset_at - time.time())))
