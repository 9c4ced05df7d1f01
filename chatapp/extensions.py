"""Extension instances, bound to the app in create_app()."""
import time

from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError

# Stable constraint names, so Alembic migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING_CONVENTION))
jwt = JWTManager()


@event.listens_for(Engine, "connect")
def _configure_sqlite(dbapi_connection, _record):
    """SQLite: enforce foreign keys, let readers and a writer work at once (WAL), and let a writer
    wait its turn: SQLite's busy handler polls, so under many concurrent writers a short wait
    can starve."""
    if type(dbapi_connection).__module__ != "sqlite3":
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def ping_idle_connections(app: Flask) -> None:
    """Ping a pooled connection at checkout when it has been idle longer than
    DATABASE_PING_AFTER_IDLE seconds; a dead one is replaced before the turn uses it (a database
    restart while the service was quiet costs no request).

    Stands in for SQLAlchemy's pool_pre_ping, which pings at every checkout: two round trips a
    continued turn (2.0 pings a turn with SQLAlchemy 2.1.9, 0.0 with this, measured again in
    bench/results/2026-12-02-libraries.md), a fifth of the throughput with a slow agent when first
    measured (make bench, S3). A connection checked in a moment ago is alive; if the database goes
    away under load, the first failure invalidates the whole pool anyway."""
    with app.app_context():
        engine = db.engine
    if engine.dialect.name == "sqlite":
        return  # a file does not go stale
    idle_limit = app.config["DATABASE_PING_AFTER_IDLE"]

    @event.listens_for(engine, "checkin")
    def _note_checkin(_dbapi_connection, record):
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy):
        checked_in_at = record.info.get("checked_in_at")
        if checked_in_at is None or time.monotonic() - checked_in_at <= idle_limit:
            return  # just opened, or just used
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("a pooled connection went stale while idle") from exc
