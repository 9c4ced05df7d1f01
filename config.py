"""Configuration classes, built from the environment when instantiated (so tests can set variables)."""
import os

from limits import parse as parse_rate_limit

# Used only by DevelopmentConfig and TestingConfig; production refuses to start without its own key.
_DEV_ONLY_SECRET = "chatapp-development-secret-not-for-production"
_MIN_SECRET_BYTES = 32


class ConfigError(RuntimeError):
    """The configuration cannot serve; the message says why in one line."""


def _env(name, default=None):
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


def _env_list(name):
    value = _env(name)
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


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
        self.SQLALCHEMY_ENGINE_OPTIONS = {
            # Stale connections (a database restart) are replaced at checkout, not failed on: those
            # idle longer than DATABASE_PING_AFTER_IDLE are pinged first (chatapp/extensions.py).
            "pool_recycle": 300,
            # Per process. Turns hold a connection only for their short reads and writes, never
            # while the agent works; keep workers x (size + overflow) under the server's max_connections.
            "pool_size": _env_int("DATABASE_POOL_SIZE", 10),
            "max_overflow": _env_int("DATABASE_MAX_OVERFLOW", 10),
            "pool_timeout": _env_float("DATABASE_POOL_TIMEOUT", 10.0),
        }
        self.DATABASE_PING_AFTER_IDLE = _env_float("DATABASE_PING_AFTER_IDLE", 1.0)
        self.SQLALCHEMY_TRACK_MODIFICATIONS = False

        self.JWT_SECRET_KEY = _env("JWT_SECRET_KEY", self._default_secret())
        self.JWT_ALGORITHM = _env("JWT_ALGORITHM", "HS256")
        # One algorithm only: an HS256 token signed with an RS256 public key must not verify.
        self.JWT_DECODE_ALGORITHMS = [self.JWT_ALGORITHM]
        self.JWT_PUBLIC_KEY = _env("JWT_PUBLIC_KEY")
        self.JWT_PRIVATE_KEY = _env("JWT_PRIVATE_KEY")
        self.JWT_DECODE_AUDIENCE = _env("JWT_DECODE_AUDIENCE")
        self.JWT_DECODE_ISSUER = _env("JWT_DECODE_ISSUER")
        self.JWT_IDENTITY_CLAIM = _env("JWT_IDENTITY_CLAIM", "sub")
        self.JWT_TOKEN_LOCATION = ["headers"]
        self.JWT_COOKIE_CSRF_PROTECT = False  # tokens travel in headers only: no csrf claim needed

        self.AGENT_URL = _env("AGENT_URL")
        self.AGENT_API_KEY = _env("AGENT_API_KEY")
        self.AGENT_CONNECT_TIMEOUT = _env_float("AGENT_CONNECT_TIMEOUT", 3.0)
        self.AGENT_TIMEOUT = _env_float("AGENT_TIMEOUT", 30.0)
        self.AGENT_STREAM_TIMEOUT = _env_float("AGENT_STREAM_TIMEOUT", 300.0)
        self.AGENT_MAX_RETRIES = _env_int("AGENT_MAX_RETRIES", 2)
        self.AGENT_MAX_RESPONSE_BYTES = _env_int("AGENT_MAX_RESPONSE_BYTES", 1048576)
        self.AGENT_SYSTEM_PROMPT = _env("AGENT_SYSTEM_PROMPT")
        self.DEFAULT_MODEL = _env("DEFAULT_MODEL", "gpt-4")
        self.ALLOWED_MODELS = _env_list("ALLOWED_MODELS")

        self.CONTEXT_MAX_MESSAGES = _env_int("CONTEXT_MAX_MESSAGES", 50)
        self.CONTEXT_MAX_CHARS = _env_int("CONTEXT_MAX_CHARS", 100000)
        self.MAX_CONTENT_LENGTH = _env_int("MAX_CONTENT_LENGTH", 262144)
        self.RATE_LIMIT = _env("RATE_LIMIT", "60 per minute")
        self.REDIS_URL = _env("REDIS_URL")
        self.CORS_ORIGINS = _env_list("CORS_ORIGINS")
        self.IDEMPOTENCY_TTL = _env_int("IDEMPOTENCY_TTL", 86400)
        # A turn holds its conversation and key for AGENT_TIMEOUT plus this; then it is presumed dead.
        self.TURN_HOLD_MARGIN = _env_float("TURN_HOLD_MARGIN", 15.0)

        self.LOG_LEVEL = _env("LOG_LEVEL", "INFO").upper()
        self.LOG_FORMAT = _env("LOG_FORMAT", self._default_log_format())

    def _default_secret(self):
        return None

    def _default_log_format(self):
        return "text"

    def validate(self):
        """Raise ConfigError when these settings cannot serve."""
        for name in ("AGENT_CONNECT_TIMEOUT", "AGENT_TIMEOUT", "AGENT_STREAM_TIMEOUT"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("AGENT_MAX_RETRIES", "CONTEXT_MAX_MESSAGES", "CONTEXT_MAX_CHARS"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        try:
            parse_rate_limit(self.RATE_LIMIT)
        except ValueError:
            raise ConfigError(f"RATE_LIMIT must read like '60 per minute', got {self.RATE_LIMIT!r}") from None
        if self.ALLOWED_MODELS and self.DEFAULT_MODEL not in self.ALLOWED_MODELS:
            raise ConfigError("DEFAULT_MODEL is not one of ALLOWED_MODELS")


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
        if self.JWT_PUBLIC_KEY is None and len((self.JWT_SECRET_KEY or "").encode()) < _MIN_SECRET_BYTES:
            raise ConfigError(
                f"JWT_SECRET_KEY must be set to at least {_MIN_SECRET_BYTES} bytes in production "
                "(or set JWT_PUBLIC_KEY)"
            )
        if not self.AGENT_URL:
            raise ConfigError("AGENT_URL must be set in production (the echo agent is for development)")


CONFIGS = {"development": DevelopmentConfig, "testing": TestingConfig, "production": ProductionConfig}


def config_from_env(default="production"):
    """The config class CHATAPP_ENV names (default: production), instantiated from the environment."""
    name = _env("CHATAPP_ENV", default).lower()
    if name not in CONFIGS:
        raise ConfigError(f"CHATAPP_ENV must be one of {', '.join(CONFIGS)}, got {name!r}")
    return CONFIGS[name]()
