"""Configuration classes, built from the environment when instantiated (so tests can set variables).

gunicorn.conf.py builds the same configuration in gunicorn's master process, so that a setting that
cannot serve stops the server before any worker boots."""
import ipaddress
import json
import os
import sys
from datetime import datetime, timezone
from urllib.parse import urlsplit

from limits import parse as parse_rate_limit
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Used only by DevelopmentConfig and TestingConfig; production refuses to start without its own key.
_DEV_ONLY_SECRET = "chatapp-development-secret-not-for-production"
_MIN_SECRET_BYTES = 32
LOG_FORMATS = ("json", "text")
STREAM_DISCONNECT_CHOICES = ("continue", "cancel")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


# Every environment variable the configuration reads, filled in as it reads them (the docs and
# app.json are checked against it).
SETTINGS_READ: set[str] = set()


class ConfigError(RuntimeError):
    """The configuration cannot serve; the message names the setting and says why, in one line."""


def _env(name, default=None):
    SETTINGS_READ.add(name)
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _env_int(name, default):
    value = _env(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _env_float(name, default):
    value = _env(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_bool(name, default):
    value = _env(name)
    if value is None:
        return default
    if value.lower() not in _TRUE + _FALSE:
        raise ConfigError(f"{name} must be on or off, got {value!r}")
    return value.lower() in _TRUE


def _multiline(value):
    return value.replace("\\n", "\n") if value else value


def _env_list(name):
    value = _env(name)
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


BUDGET_PERIODS = ("day", "month")


def parse_token_budget(value):
    """TOKEN_BUDGET as (tokens, period): '200000 per day', '5000000 per month', or 'unlimited per
    month' (no limit but the users' own, from `flask set-budget`); tokens None is unlimited.
    ValueError for anything else."""
    words = value.lower().split()
    if len(words) != 3 or words[1] != "per" or words[2] not in BUDGET_PERIODS:
        raise ValueError(value)
    if words[0] == "unlimited":
        return None, words[2]
    if not words[0].isdigit() or not words[0].isascii():
        raise ValueError(value)
    return int(words[0]), words[2]


def _require(name, condition, rule):
    if not condition:
        raise ConfigError(f"{name} {rule}")


def _check_database_url(value):
    try:
        make_url(database_url(value))
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a database URL (postgresql://user:password@host:5432/name)") from None


def _check_url(name, value, schemes, example):
    if value is not None:
        scheme, _, rest = value.partition("://")
        _require(name, scheme.lower() in schemes and rest, f"must be a URL such as {example}")


def _check_public_key(pem):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(pem.encode())
    except ValueError:
        raise ConfigError("JWT_PUBLIC_KEY is not a PEM public key (-----BEGIN PUBLIC KEY-----...)") from None


def https_or_loopback(url: str) -> bool:
    """https, or plain http to this machine (a test's or a sidecar's identity provider)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http":
        return False
    try:
        return parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


def database_url(url):
    """Normalise a DATABASE_URL: Heroku-style postgres:// and plain postgresql:// use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class Config:
    """Settings shared by every environment; defaults are the contract's."""

    ENV_NAME = "base"
    TESTING = False
    DEBUG = False

    def __init__(self):
        self.DATABASE_URL = _env("DATABASE_URL")  # None: SQLite file in the instance folder
        if self.DATABASE_URL:
            self.SQLALCHEMY_DATABASE_URI = database_url(self.DATABASE_URL)
        self.DATABASE_POOL_SIZE = _env_int("DATABASE_POOL_SIZE", 5)
        self.DATABASE_MAX_OVERFLOW = _env_int("DATABASE_MAX_OVERFLOW", 0)
        self.DATABASE_POOL_TIMEOUT = _env_float("DATABASE_POOL_TIMEOUT", 10.0)
        self.SQLALCHEMY_ENGINE_OPTIONS = {
            # Stale connections (a database restart) are replaced at checkout, not failed on: those
            # idle longer than DATABASE_PING_AFTER_IDLE are pinged first (chatapp/extensions.py).
            "pool_recycle": 300,
            # Per process. Turns hold a connection only for their short reads and writes, never
            # while the agent works. One instance opens at most WEB_CONCURRENCY x (size + overflow):
            # 4 x (5 + 0) = 20 fits a small database plan, and measured no slower than 4 x (10 + 10)
            # in S1, S2 or S3 (bench/results/2026-12-01-cb5a4c3-pool-sizes.md); overflow connections
            # are closed when returned, and reopened under load.
            "pool_size": self.DATABASE_POOL_SIZE,
            "max_overflow": self.DATABASE_MAX_OVERFLOW,
            "pool_timeout": self.DATABASE_POOL_TIMEOUT,
        }
        self.DATABASE_PING_AFTER_IDLE = _env_float("DATABASE_PING_AFTER_IDLE", 1.0)
        # Off: safe through a transaction-pooling PgBouncer (chatapp/__init__.py's postgres_connect_args).
        self.DATABASE_PREPARED_STATEMENTS = _env_bool("DATABASE_PREPARED_STATEMENTS", False)
        self.SQLALCHEMY_TRACK_MODIFICATIONS = False

        self.JWT_SECRET_KEY = _env("JWT_SECRET_KEY", self._default_secret())
        # Platforms' settings pages often keep a PEM on one line, with its line breaks written \n.
        self.JWT_PUBLIC_KEY = _multiline(_env("JWT_PUBLIC_KEY"))
        self.JWT_PRIVATE_KEY = _multiline(_env("JWT_PRIVATE_KEY"))
        # The identity provider's key set, by its URL or by its issuer's discovery (chatapp/jwks.py).
        self.JWT_JWKS_URL = _env("JWT_JWKS_URL")
        self.JWT_OIDC_ISSUER = _env("JWT_OIDC_ISSUER")
        self.JWT_JWKS_CACHE_SECONDS = _env_float("JWT_JWKS_CACHE_SECONDS", 300.0)
        self.JWT_JWKS_MIN_REFRESH_SECONDS = _env_float("JWT_JWKS_MIN_REFRESH_SECONDS", 30.0)
        self.JWT_JWKS_TIMEOUT = _env_float("JWT_JWKS_TIMEOUT", 3.0)
        key_set = bool(self.JWT_JWKS_URL or self.JWT_OIDC_ISSUER)
        # One algorithm (an HS256 token signed with an RS256 public key must not verify); with a key
        # set, an allow-list of asymmetric ones.
        self.JWT_DECODE_ALGORITHMS = _env_list("JWT_ALGORITHM") or (["RS256"] if key_set else ["HS256"])
        self.JWT_ALGORITHM = self.JWT_DECODE_ALGORITHMS[0]  # what create-token signs with
        # The audiences are checked by chatapp/auth.py against JWT_AUDIENCE_CLAIM (Amazon Cognito's
        # access tokens carry client_id, not aud): flask-jwt-extended checks none.
        self.TOKEN_AUDIENCES = _env_list("JWT_DECODE_AUDIENCE")
        self.JWT_DECODE_AUDIENCE = None
        self.JWT_AUDIENCE_CLAIM = _env("JWT_AUDIENCE_CLAIM", "aud")
        self.JWT_DECODE_ISSUER = _env("JWT_DECODE_ISSUER", self.JWT_OIDC_ISSUER)
        self.JWT_IDENTITY_CLAIM = _env("JWT_IDENTITY_CLAIM", "sub")
        self.JWT_TOKEN_LOCATION = ["headers"]
        self.JWT_COOKIE_CSRF_PROTECT = False  # tokens travel in headers only: no csrf claim needed

        self.AGENT_URL = _env("AGENT_URL")
        self.AGENT_API_KEY = _env("AGENT_API_KEY")
        self.AGENT_CONNECT_TIMEOUT = _env_float("AGENT_CONNECT_TIMEOUT", 3.0)
        # Under the 30 s within which Heroku-style routers drop a request that sent no first byte.
        self.AGENT_TIMEOUT = _env_float("AGENT_TIMEOUT", 25.0)
        self.AGENT_STREAM_TIMEOUT = _env_float("AGENT_STREAM_TIMEOUT", 300.0)
        self.AGENT_MAX_RETRIES = _env_int("AGENT_MAX_RETRIES", 2)
        self.AGENT_MAX_RESPONSE_BYTES = _env_int("AGENT_MAX_RESPONSE_BYTES", 1048576)
        self.AGENT_SYSTEM_PROMPT = _env("AGENT_SYSTEM_PROMPT")
        # When the agent is down (chatapp/agent/guard.py): a breaker per agent and process, a
        # fallback agent, a cap on the calls in flight (None: none).
        self.AGENT_BREAKER_FAILURES = _env_int("AGENT_BREAKER_FAILURES", 5)
        self.AGENT_BREAKER_SECONDS = _env_float("AGENT_BREAKER_SECONDS", 30.0)
        self.AGENT_FALLBACK_URL = _env("AGENT_FALLBACK_URL")
        self.AGENT_FALLBACK_API_KEY = _env("AGENT_FALLBACK_API_KEY")
        self.AGENT_FALLBACK_MODEL = _env("AGENT_FALLBACK_MODEL")  # None: the turn's model
        self.AGENT_MAX_CONCURRENCY = _env_int("AGENT_MAX_CONCURRENCY", 0) or None
        self.DEFAULT_MODEL = _env("DEFAULT_MODEL", "gpt-4")
        self.ALLOWED_MODELS = _env_list("ALLOWED_MODELS")

        self.CONTEXT_MAX_MESSAGES = _env_int("CONTEXT_MAX_MESSAGES", 50)
        self.CONTEXT_MAX_CHARS = _env_int("CONTEXT_MAX_CHARS", 100000)
        self.MAX_CONTENT_LENGTH = _env_int("MAX_CONTENT_LENGTH", 262144)
        # Seconds a client has to send its whole request (headers and body); chatapp/serving.py.
        self.REQUEST_READ_TIMEOUT = _env_float("REQUEST_READ_TIMEOUT", 10.0)
        self.RATE_LIMIT = _env("RATE_LIMIT", "60 per minute")
        # Each user's tokens per UTC day or month (chatapp/usage.py); None: no budget.
        self.TOKEN_BUDGET = _env("TOKEN_BUDGET")
        self.REDIS_URL = _env("REDIS_URL")
        self.CORS_ORIGINS = _env_list("CORS_ORIGINS")
        self.IDEMPOTENCY_TTL = _env_int("IDEMPOTENCY_TTL", 86400)
        # `flask purge` deletes conversations not updated for this many days (chatapp/user_data.py);
        # None: conversations are kept for good.
        self.RETENTION_DAYS = _env_int("RETENTION_DAYS", None)
        # A turn's claims on its conversation and key are leases this long, renewed while it runs:
        # the claims of a worker that died lapse this long after its last renewal (chatapp/claims.py).
        self.TURN_LEASE_SECONDS = _env_float("TURN_LEASE_SECONDS", 10.0)
        self.METRICS_TOKEN = _env("METRICS_TOKEN")  # None: /metrics is open (keep it on a private network)
        # Streams (chatapp/chat_service.py, chatapp/turn_log.py): what a client that goes away leads
        # to; the silence after which a comment keeps proxies from closing; the seconds after which
        # a stream answers 200 before the agent's first piece (0: it waits for it); how long a
        # turn's events stay in Redis after it ends, for clients that resume it.
        self.STREAM_ON_DISCONNECT = _env("STREAM_ON_DISCONNECT", "continue").lower()
        self.STREAM_KEEPALIVE_SECONDS = _env_float("STREAM_KEEPALIVE_SECONDS", 15.0)
        self.STREAM_FIRST_BYTE_SECONDS = _env_float("STREAM_FIRST_BYTE_SECONDS", 0.0)
        self.STREAM_RESUME_SECONDS = _env_float("STREAM_RESUME_SECONDS", 600.0)

        self.LOG_LEVEL = _env("LOG_LEVEL", "INFO").upper()
        self.LOG_FORMAT = _env("LOG_FORMAT", self._default_log_format()).lower()

        # gunicorn's own settings; gunicorn.conf.py takes them from here.
        self.PORT = _env_int("PORT", 8000)
        # 4 workers a host of 2 cores (make bench, bench/README.md).
        self.WEB_CONCURRENCY = _env_int("WEB_CONCURRENCY", 4)
        self.GUNICORN_THREADS = _env_int("GUNICORN_THREADS", 32)

    def _default_secret(self):
        return None

    def _default_log_format(self):
        return "text"

    def validate(self):
        """Raise ConfigError, naming the setting, when these settings cannot serve."""
        for name in ("AGENT_CONNECT_TIMEOUT", "AGENT_TIMEOUT", "AGENT_STREAM_TIMEOUT", "DATABASE_POOL_TIMEOUT",
                     "REQUEST_READ_TIMEOUT", "TURN_LEASE_SECONDS", "STREAM_KEEPALIVE_SECONDS", "STREAM_RESUME_SECONDS"):
            _require(name, getattr(self, name) > 0, "must be positive")
        _require("STREAM_FIRST_BYTE_SECONDS", self.STREAM_FIRST_BYTE_SECONDS >= 0, "must not be negative (0: off)")
        _require("STREAM_ON_DISCONNECT", self.STREAM_ON_DISCONNECT in STREAM_DISCONNECT_CHOICES,
                 f"must be one of {', '.join(STREAM_DISCONNECT_CHOICES)}")
        for name in ("AGENT_MAX_RESPONSE_BYTES", "MAX_CONTENT_LENGTH", "IDEMPOTENCY_TTL", "DATABASE_POOL_SIZE",
                     "WEB_CONCURRENCY", "GUNICORN_THREADS"):
            _require(name, getattr(self, name) >= 1, "must be at least 1")
        for name in ("AGENT_MAX_RETRIES", "CONTEXT_MAX_MESSAGES", "CONTEXT_MAX_CHARS", "DATABASE_MAX_OVERFLOW",
                     "DATABASE_PING_AFTER_IDLE"):
            _require(name, getattr(self, name) >= 0, "must not be negative")
        _require("PORT", 1 <= self.PORT <= 65535, "must be a TCP port, 1 to 65535")
        _require("RETENTION_DAYS", self.RETENTION_DAYS is None or self.RETENTION_DAYS >= 1,
                 "must be at least 1 (unset: conversations are kept for good)")
        _require("LOG_FORMAT", self.LOG_FORMAT in LOG_FORMATS, f"must be one of {', '.join(LOG_FORMATS)}")
        _require("LOG_LEVEL", self.LOG_LEVEL in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}")
        try:
            parse_rate_limit(self.RATE_LIMIT)
        except ValueError:
            raise ConfigError(f"RATE_LIMIT must read like '60 per minute', got {self.RATE_LIMIT!r}") from None
        if self.TOKEN_BUDGET is not None:
            try:
                parse_token_budget(self.TOKEN_BUDGET)
            except ValueError:
                raise ConfigError("TOKEN_BUDGET must read like '200000 per day' or '5000000 per month' "
                                  f"(or 'unlimited per month'), got {self.TOKEN_BUDGET!r}") from None
        if self.ALLOWED_MODELS and self.DEFAULT_MODEL not in self.ALLOWED_MODELS:
            raise ConfigError("DEFAULT_MODEL is not one of ALLOWED_MODELS")
        if self.DATABASE_URL:
            _check_database_url(self.DATABASE_URL)
        _check_url("AGENT_URL", self.AGENT_URL, ("http", "https"), "https://api.openai.com/v1")
        _check_url("AGENT_FALLBACK_URL", self.AGENT_FALLBACK_URL, ("http", "https"), "https://api.openai.com/v1")
        _require("AGENT_BREAKER_FAILURES", self.AGENT_BREAKER_FAILURES >= 0, "must not be negative (0 turns the breaker off)")
        _require("AGENT_BREAKER_SECONDS", self.AGENT_BREAKER_SECONDS > 0, "must be positive")
        _require("AGENT_MAX_CONCURRENCY", self.AGENT_MAX_CONCURRENCY is None or self.AGENT_MAX_CONCURRENCY >= 1,
                 "must be at least 1 (unset: no cap)")
        _check_url("REDIS_URL", self.REDIS_URL, ("redis", "rediss", "unix"), "redis://host:6379/0")
        self._check_token_keys()

    def _check_token_keys(self):
        """One source of keys; the algorithms fit it; a public key is one; the URLs are URLs."""
        sources = [name for name in ("JWT_PUBLIC_KEY", "JWT_JWKS_URL", "JWT_OIDC_ISSUER") if getattr(self, name)]
        _require(" and ".join(sources), len(sources) <= 1, "are all set: set one source of keys")
        algorithms = self.JWT_DECODE_ALGORITHMS
        if self.JWT_JWKS_URL or self.JWT_OIDC_ISSUER:
            for name in ("JWT_JWKS_URL", "JWT_OIDC_ISSUER"):
                value = getattr(self, name)
                _require(name, value is None or value.split("://", 1)[0] in ("http", "https"),
                         "must be an https:// URL")
            wrong = [algorithm for algorithm in algorithms if algorithm not in PUBLIC_KEY_ALGORITHMS]
            _require("JWT_ALGORITHM", not wrong, f"with a key set lists asymmetric algorithms only "
                     f"({', '.join(PUBLIC_KEY_ALGORITHMS)}), got {', '.join(wrong)}")
            for name in ("JWT_JWKS_CACHE_SECONDS", "JWT_JWKS_TIMEOUT"):
                _require(name, getattr(self, name) > 0, "must be positive")
            _require("JWT_JWKS_MIN_REFRESH_SECONDS", self.JWT_JWKS_MIN_REFRESH_SECONDS >= 0, "must not be negative")
            if self.JWT_OIDC_ISSUER and self.JWT_DECODE_ISSUER != self.JWT_OIDC_ISSUER:
                raise ConfigError("JWT_DECODE_ISSUER differs from JWT_OIDC_ISSUER: the issuer's tokens name it as iss")
            return
        _require("JWT_ALGORITHM", len(algorithms) == 1, "names one algorithm (a list only with JWT_JWKS_URL or JWT_OIDC_ISSUER)")
        if self.JWT_PUBLIC_KEY is not None:
            _require("JWT_ALGORITHM", self.JWT_ALGORITHM in PUBLIC_KEY_ALGORITHMS,
                     f"must be one of {', '.join(PUBLIC_KEY_ALGORITHMS)} with JWT_PUBLIC_KEY, got {self.JWT_ALGORITHM!r}")
            _check_public_key(self.JWT_PUBLIC_KEY)
        else:
            _require("JWT_ALGORITHM", self.JWT_ALGORITHM in HMAC_ALGORITHMS,
                     f"must be one of {', '.join(HMAC_ALGORITHMS)} with JWT_SECRET_KEY "
                     f"(or set JWT_PUBLIC_KEY), got {self.JWT_ALGORITHM!r}")


class DevelopmentConfig(Config):
    """`make run`: SQLite in instance/, the echo agent, readable logs."""

    ENV_NAME = "development"
    DEBUG = False  # the debugger's HTML pages would break the JSON-only contract

    def _default_secret(self):
        return _DEV_ONLY_SECRET


class TestingConfig(Config):
    """The test suite: small timeouts so failure paths are fast."""

    ENV_NAME = "testing"
    TESTING = True

    def __init__(self, **overrides):
        super().__init__()
        self.AGENT_CONNECT_TIMEOUT = 0.5
        self.AGENT_TIMEOUT = 2.0
        self.AGENT_STREAM_TIMEOUT = 10.0
        for name, value in overrides.items():
            setattr(self, name, value)

    def _default_secret(self):
        return _DEV_ONLY_SECRET


class ProductionConfig(Config):
    """Production: refuses weak secrets and a missing agent."""

    ENV_NAME = "production"

    def _default_log_format(self):
        return "json"

    def validate(self):
        super().validate()
        key_source = self.JWT_PUBLIC_KEY or self.JWT_JWKS_URL or self.JWT_OIDC_ISSUER
        if not key_source and len((self.JWT_SECRET_KEY or "").encode()) < _MIN_SECRET_BYTES:
            raise ConfigError(
                f"JWT_SECRET_KEY must be set to at least {_MIN_SECRET_BYTES} bytes in production "
                "(or set JWT_PUBLIC_KEY, JWT_JWKS_URL or JWT_OIDC_ISSUER)"
            )
        for name in ("JWT_JWKS_URL", "JWT_OIDC_ISSUER"):
            value = getattr(self, name)
            # A key set over plain http could be anyone's: https, but for this machine's own provider.
            _require(name, value is None or https_or_loopback(value),
                     "must be an https:// URL in production (plain http only for a loopback host)")
        if not self.AGENT_URL:
            raise ConfigError("AGENT_URL must be set in production (the echo agent is for development)")


CONFIGS = {"development": DevelopmentConfig, "testing": TestingConfig, "production": ProductionConfig}


def config_from_env(default="production"):
    """The config class CHATAPP_ENV names (default: production), instantiated from the environment."""
    name = _env("CHATAPP_ENV", default).lower()
    if name not in CONFIGS:
        raise ConfigError(f"CHATAPP_ENV must be one of {', '.join(CONFIGS)}, got {name!r}")
    return CONFIGS[name]()


def log_format_from_env() -> str:
    """The log format the environment asks for, read without building a config (which may be what failed)."""
    value = (os.environ.get("LOG_FORMAT") or "").strip().lower()
    if value in LOG_FORMATS:
        return value
    return "json" if (_env("CHATAPP_ENV", "production") or "").lower() == "production" else "text"


def startup_failure(error: ConfigError) -> str:
    """The one line that says why the service does not start: a JSON object where logs are JSON."""
    message = f"chatapp: configuration error: {error}"
    if log_format_from_env() != "json":
        return message
    entry = {"time": datetime.now(timezone.utc).isoformat(), "level": "CRITICAL", "logger": "chatapp.config",
             "message": message, "request_id": None}
    return json.dumps(entry)


def exit_on_config_error(error: ConfigError) -> None:
    """Print the one line and stop with gunicorn's 'worker failed to boot' status (3): gunicorn's
    master then stops too, instead of booting the worker again and again. Any other status
    (1 included) only has the worker restarted."""
    print(startup_failure(error), file=sys.stderr, flush=True)
    sys.exit(3)
