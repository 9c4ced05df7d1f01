"""Liveness and readiness probes."""
from flask import Blueprint
from sqlalchemy import text

from chatapp.extensions import db

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """The process is up; touches nothing."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """The database answers; a failure becomes 503 service_unavailable through the error handlers."""
    db.session.execute(text("SELECT 1"))
    db.session.rollback()
    return {"status": "ready"}
