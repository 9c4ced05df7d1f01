"""The per-user rate limit of the chat endpoint: the `limits` library's moving window, kept in
memory or in Redis.

The view calls enforce_rate_limit() right after authenticate(): the contract wants requests that
fail steps 1 or 2 to use no quota. (Flask-Limiter, built on the same library, checks before the
view and adds three hooks to every request of the app; the one limit here needs none of them.)"""
import logging
import math
import time
from typing import NamedTuple

from flask import Flask, current_app
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from chatapp.errors import RateLimited

log = logging.getLogger(__name__)

KEY_PREFIX = "chatapp"


class ChatRateLimit(NamedTuple):
    limiter: MovingWindowRateLimiter
    rate: RateLimitItem


def register_rate_limit(app: Flask) -> None:
    """Storage in memory, or Redis at REDIS_URL so that every process and host shares one budget."""
    if app.config["REDIS_URL"]:
        # A Redis that is down must cost a request little time: fail fast, then fail open.
        storage = storage_from_string(app.config["REDIS_URL"], socket_connect_timeout=0.25, socket_timeout=0.25)
    else:
        storage = storage_from_string("memory://")
    app.extensions["chat_rate_limit"] = ChatRateLimit(MovingWindowRateLimiter(storage), parse(app.config["RATE_LIMIT"]))


def enforce_rate_limit(user_id: str) -> None:
    """Count one chat request for the user; 429 with Retry-After past RATE_LIMIT. If the storage
    is unreachable the request goes through (fail open) and the failure is logged."""
    limiter, rate = current_app.extensions["chat_rate_limit"]
    try:
        if limiter.hit(rate, KEY_PREFIX, "chat", user_id):
            return
        reset_at = limiter.get_window_stats(rate, KEY_PREFIX, "chat", user_id).reset_time
    except Exception as exc:  # any storage failure: Redis down, timing out, restarting
        log.warning("rate limit storage unavailable, request allowed: %s", type(exc).__name__)
        return
    raise RateLimited(retry_after=math.ceil(max(1.0, reset_at - time.time())))
