"""The chatapp application factory."""
import functools
import os
import threading

import click
from flask import Flask
from flask_cors import CORS
from sqlalchemy.engine import make_url

from chatapp import cli, errors, log_config, metrics, rate_limit, request_ids, usage
from chatapp.agent import build_agent
from chatapp.auth import register_auth
from chatapp.chat_service import ChatService, StreamSettings
from chatapp.claims import TurnLeases
from chatapp.context import ContextPolicy
from chatapp.extensions import db, jwt, ping_idle_connections
from chatapp.models import utcnow
from chatapp.routes import chat, conversations, docs, health
from chatapp.routes import usage as usage_routes
from chatapp.routes import user_data as user_data_routes
from chatapp.schemas import render_chat_response
from chatapp.turn_log import LiveLog
from config import Config, config_from_env, parse_token_budget

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")


def create_app(config: Config | None = None) -> Flask:
    """Build the app from `config` (default: the class CHATAPP_ENV names, production if unset)."""
    config = config if config is not None else config_from_env()
    config.validate()

    app = Flask(__name__)
    app.config.from_object(config)
    configure_database(app)
    app.json.sort_keys = False  # answer in the contract's field order

    log_config.configure_logging(app)
    request_ids.register_request_ids(app)
    log_config.register_request_log(app)
    metrics.register_metrics(app)
    register_extensions(app)
    errors.register_error_handlers(app, request_id=request_ids.current_request_id, note=log_config.note)
    register_blueprints(app)
    cli.register_commands(app)
    register_chat_service(app)
    return app


def configure_database(app: Flask) -> None:
    """Default to a SQLite file in the instance folder; an in-memory SQLite has no pool to size.
    psycopg prepares no statements: see postgres_connect_args()."""
    if not app.config.get("SQLALCHEMY_DATABASE_URI"):
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{os.path.join(app.instance_path, 'chatapp.db')}"
    url = make_url(app.config["SQLALCHEMY_DATABASE_URI"])
    options = dict(app.config["SQLALCHEMY_ENGINE_OPTIONS"])
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        for name in ("pool_size", "max_overflow", "pool_timeout"):
            options.pop(name, None)
    if url.get_driver_name() == "psycopg":
        connect_args = postgres_connect_args(app.config["DATABASE_PREPARED_STATEMENTS"])
        options["connect_args"] = {**connect_args, **options.get("connect_args", {})}
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options


def postgres_connect_args(prepared_statements: bool) -> dict:
    """No server-side prepared statements, unless DATABASE_PREPARED_STATEMENTS is on. psycopg 3
    prepares a statement on the server after it ran five times on a connection; behind a
    transaction-pooling PgBouncer (1.18, Debian 12's) the next transaction may run on a server
    connection that never saw it: `prepared statement "_pg3_0" does not exist`. Connected to
    PostgreSQL itself (or to a PgBouncer that keeps prepared statements, 1.21 and later with
    max_prepared_statements), they are safe, and make bench measured them 12-13% faster in S1 and S2
    (bench/results/2026-12-02-prepared.md)."""
    return {} if prepared_statements else {"prepare_threshold": None}


def register_extensions(app: Flask) -> None:
    db.init_app(app)
    ping_idle_connections(app)
    if app.testing or click.get_current_context(silent=True) is not None:
        register_migrations(app)
    register_auth(app, jwt, on_key_set_fetch=metrics.count_key_set_fetch)
    rate_limit.register_rate_limit(app)
    if app.config["CORS_ORIGINS"]:
        CORS(
            app,
            origins=app.config["CORS_ORIGINS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed", "WWW-Authenticate", "Content-Disposition"],
            max_age=600,
        )


def register_migrations(app: Flask) -> None:
    """Flask-Migrate, for the `flask db` commands (and the tests' migrations). Serving never needs
    it, and Alembic and Mako would cost each gunicorn worker about 12 MB: only the command line
    (a click context while the app is built) and tests load it."""
    from flask_migrate import Migrate

    Migrate(app, db, directory=MIGRATIONS_DIR)


def register_blueprints(app: Flask) -> None:
    app.register_blueprint(chat.bp)
    app.register_blueprint(conversations.bp)
    app.register_blueprint(usage_routes.bp)
    app.register_blueprint(user_data_routes.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(docs.bp)


def register_chat_service(app: Flask) -> None:
    """One ChatService per app, with its settings and its agent, kept on the app (tests swap its
    agent); the usage ledger beside it, with the same budget and clock (tests set CLOCK to move
    through days and months)."""
    config = app.config
    with app.app_context():
        engine = db.engine
    budget = usage.Budget(*parse_token_budget(config["TOKEN_BUDGET"])) if config["TOKEN_BUDGET"] else usage.Budget()
    clock = config.get("CLOCK") or utcnow
    app.extensions["usage"] = usage.UsageLedger(budget, clock)
    app.extensions["chat_service"] = ChatService(
        sessions=db.session,
        agent=build_agent(config, on_breaker=metrics.set_breaker_open),
        policy=ContextPolicy(config["AGENT_SYSTEM_PROMPT"], config["CONTEXT_MAX_MESSAGES"], config["CONTEXT_MAX_CHARS"]),
        leases=TurnLeases(engine, config["TURN_LEASE_SECONDS"]),
        render=render_chat_response,
        idempotency_ttl=config["IDEMPOTENCY_TTL"],
        streams=StreamSettings(
            on_disconnect=config["STREAM_ON_DISCONNECT"],
            keepalive_seconds=config["STREAM_KEEPALIVE_SECONDS"],
            first_byte_seconds=config["STREAM_FIRST_BYTE_SECONDS"],
            longest_seconds=config["AGENT_STREAM_TIMEOUT"],
        ),
        live_log=LiveLog(config["REDIS_URL"], config["STREAM_RESUME_SECONDS"], config["AGENT_STREAM_TIMEOUT"])
        if config["REDIS_URL"] else None,
        spawn=functools.partial(in_an_app_thread, app),
        budget=budget,
        clock=clock,
    )


def in_an_app_thread(app: Flask, work) -> None:
    """Run a streamed turn's work in a thread of its own, in an app context (its own database
    session, removed when the context ends)."""
    def run():
        with app.app_context():
            work()

    threading.Thread(target=run, name="chatapp-stream", daemon=True).start()
