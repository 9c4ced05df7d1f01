"""Configuration from the environment, and production's refusal to start unsafely."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatapp import create_app
import config as config_module
from config import ConfigError, DevelopmentConfig, ProductionConfig, config_from_env, database_url, parse_token_budget

ROOT = Path(__file__).resolve().parent.parent
STRONG_SECRET = "s" * 32


@pytest.fixture
def environ(monkeypatch):
    """A clean slate of chatapp variables."""
    for name in list(os.environ):
        if name.startswith(("AGENT_", "JWT_", "CONTEXT_", "CHATAPP_", "DATABASE_")) or name in ("ALLOWED_MODELS", "DEFAULT_MODEL"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_are_the_contracts(environ):
    config = DevelopmentConfig()
    assert (config.AGENT_CONNECT_TIMEOUT, config.AGENT_TIMEOUT, config.AGENT_MAX_RETRIES) == (3.0, 25.0, 2)
    assert config.AGENT_MAX_RESPONSE_BYTES == 1048576
    assert (config.CONTEXT_MAX_MESSAGES, config.CONTEXT_MAX_CHARS) == (50, 100000)
    assert config.MAX_CONTENT_LENGTH == 262144
    assert (config.DEFAULT_MODEL, config.ALLOWED_MODELS) == ("gpt-4", None)
    assert (config.JWT_ALGORITHM, config.JWT_DECODE_ALGORITHMS, config.JWT_IDENTITY_CLAIM) == ("HS256", ["HS256"], "sub")
    assert config.IDEMPOTENCY_TTL == 86400
    assert config.LOG_FORMAT == "text"
    assert ProductionConfig().LOG_FORMAT == "json"


@pytest.mark.parametrize("value, parsed", [
    ("200000 per day", (200000, "day")), ("5000000 per month", (5000000, "month")), ("0 per day", (0, "day")),
    (" 10  PER  Month ", (10, "month")), ("unlimited per month", (None, "month")), ("Unlimited per day", (None, "day")),
])
def test_token_budget_reads_a_limit_and_a_period(value, parsed):
    assert parse_token_budget(value) == parsed


@pytest.mark.parametrize("value", ["200000", "200000 per week", "200000 a day", "-5 per day", "1e6 per day", "1.5 per day",
                                   "lots per day", "per day", "200000 per day extra", "２ per day"])
def test_a_token_budget_that_cannot_be_read_stops_the_service(environ, value):
    environ.setenv("TOKEN_BUDGET", value)
    with pytest.raises(ConfigError, match="^TOKEN_BUDGET must read like"):
        DevelopmentConfig().validate()


def test_database_pool_settings(environ, tmp_path):
    config = DevelopmentConfig()
    options = config.SQLALCHEMY_ENGINE_OPTIONS
    assert (options["pool_size"], options["max_overflow"], options["pool_timeout"]) == (5, 0, 10.0)
    # One instance with the defaults fits a database plan of 20 connections.
    assert config.WEB_CONCURRENCY * (config.DATABASE_POOL_SIZE + config.DATABASE_MAX_OVERFLOW) == 20
    environ.setenv("DATABASE_POOL_SIZE", "4")
    environ.setenv("DATABASE_MAX_OVERFLOW", "2")
    options = DevelopmentConfig().SQLALCHEMY_ENGINE_OPTIONS
    assert (options["pool_size"], options["max_overflow"], options.get("pool_pre_ping")) == (4, 2, None)
    assert DevelopmentConfig().DATABASE_PING_AFTER_IDLE == 1.0
    environ.setenv("DATABASE_PING_AFTER_IDLE", "0.5")
    assert DevelopmentConfig().DATABASE_PING_AFTER_IDLE == 0.5
    environ.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/pool.db")
    app = create_app(DevelopmentConfig())
    with app.app_context():
        from chatapp.extensions import db

        assert (db.engine.pool.size(), db.engine.pool._max_overflow) == (4, 2)
        db.engine.dispose()
    environ.setenv("DATABASE_URL", "sqlite://")
    in_memory = create_app(DevelopmentConfig())
    assert "pool_size" not in in_memory.config["SQLALCHEMY_ENGINE_OPTIONS"]


def test_environment_is_read_when_the_config_is_built(environ):
    environ.setenv("AGENT_TIMEOUT", "12.5")
    environ.setenv("ALLOWED_MODELS", "gpt-4, llama3 ,")
    environ.setenv("JWT_ALGORITHM", "RS256")
    config = DevelopmentConfig()
    assert config.AGENT_TIMEOUT == 12.5
    assert config.ALLOWED_MODELS == ["gpt-4", "llama3"]
    assert config.JWT_DECODE_ALGORITHMS == ["RS256"]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("postgres://u:p@host:5432/db", "postgresql+psycopg://u:p@host:5432/db"),
        ("postgresql://u@host/db", "postgresql+psycopg://u@host/db"),
        ("postgresql+psycopg://u@host/db", "postgresql+psycopg://u@host/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_url(environ, url, expected):
    assert database_url(url) == expected
    environ.setenv("DATABASE_URL", url)
    assert DevelopmentConfig().SQLALCHEMY_DATABASE_URI == expected


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"AGENT_URL": "http://127.0.0.1:9/v1"}, "JWT_SECRET_KEY must be set to at least 32 bytes"),
        ({"AGENT_URL": "http://127.0.0.1:9/v1", "JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY must be set to at least 32 bytes"),
        ({"JWT_SECRET_KEY": STRONG_SECRET}, "AGENT_URL must be set in production"),
        ({"JWT_SECRET_KEY": STRONG_SECRET, "AGENT_URL": "http://x", "AGENT_TIMEOUT": "soon"}, "AGENT_TIMEOUT must be a number"),
    ],
)
def test_production_refuses_to_start(environ, variables, message):
    for name, value in variables.items():
        environ.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        create_app(ProductionConfig() if "AGENT_TIMEOUT" not in variables else None)


def public_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_production_accepts_a_public_key_instead_of_a_secret(environ):
    environ.setenv("AGENT_URL", "http://127.0.0.1:9/v1")
    environ.setenv("JWT_ALGORITHM", "RS256")
    environ.setenv("JWT_PUBLIC_KEY", public_key_pem())
    ProductionConfig().validate()


def test_a_public_key_on_one_line_has_its_line_breaks_back(environ):
    """Platforms' settings pages keep a value on one line: the PEM's line breaks written as \\n."""
    pem = public_key_pem()
    environ.setenv("JWT_PUBLIC_KEY", pem.strip().replace("\n", "\\n"))
    environ.setenv("JWT_ALGORITHM", "RS256")
    config = DevelopmentConfig()
    assert config.JWT_PUBLIC_KEY == pem.strip()
    config.validate()


def test_production_starts_with_a_strong_secret(environ, tmp_path):
    environ.setenv("AGENT_URL", "http://127.0.0.1:9/v1")
    environ.setenv("JWT_SECRET_KEY", STRONG_SECRET)
    environ.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    app = create_app(ProductionConfig())
    assert not app.testing and not app.debug
    assert type(app.extensions["chat_service"].agent.primary).__name__ == "OpenAIChatAgent"


def test_chatapp_env_selects_the_class(environ):
    assert isinstance(config_from_env(), ProductionConfig)
    environ.setenv("CHATAPP_ENV", "development")
    assert isinstance(config_from_env(), DevelopmentConfig)
    environ.setenv("CHATAPP_ENV", "testing")
    assert isinstance(config_from_env(), config_module.TestingConfig)
    environ.setenv("CHATAPP_ENV", "staging")
    with pytest.raises(ConfigError, match="CHATAPP_ENV"):
        config_from_env()


def test_development_uses_the_echo_agent(environ, tmp_path):
    environ.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    app = create_app(DevelopmentConfig())
    assert type(app.extensions["chat_service"].agent.primary).__name__ == "EchoAgent"


def test_serving_does_not_load_the_migration_tools(tmp_path):
    """Alembic and Mako cost each gunicorn worker about 12 MB: only `flask db` loads them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JWT_", "AGENT_", "CHATAPP_", "DATABASE_"))}
    env.update(CHATAPP_ENV="production", JWT_SECRET_KEY="s" * 40, AGENT_URL="http://127.0.0.1:9/v1",
               DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}")
    probe = "import sys, wsgi; print(sorted(m for m in ('alembic', 'mako', 'flask_migrate') if m in sys.modules))"
    served = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert served.stdout.strip() == "[]", served.stderr

    flask = Path(sys.executable).parent / "flask"
    migrated = subprocess.run([flask, "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    tables = subprocess.run(
        [sys.executable, "-c", f"import sqlite3; print(sorted(r[0] for r in sqlite3.connect({str(tmp_path / 'app.db')!r}).execute(\"select name from sqlite_master where type='table'\")))"],
        capture_output=True, text=True, timeout=60,
    )
    assert tables.stdout.strip() == "['alembic_version', 'conversations', 'daily_usage', 'idempotency_keys', 'messages', 'token_budgets']"
