"""Liveness and readiness probes."""
from flask import Blueprint, current_app
from sqlalchemy import text

from chatapp import errors
from chatapp.extensions import db
from chatapp.openapi import documented
from chatapp.schemas import HealthSchema, ReadinessSchema

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@documented(summary="The process is alive", response=HealthSchema, authenticated=False, tags=("operations",))
def healthz():
    """The process is up; touches nothing."""
    return {"status": "ok"}


@bp.get("/readyz")
@documented(
    summary="The database is reachable",
    response=ReadinessSchema,
    authenticated=False,
    errors=(errors.ServiceUnavailable,),
    tags=("operations",),
)
def readyz():
    """The database answers (a failure becomes 503 service_unavailable through the error handlers);
    the body says how the agent's circuit breaker stands, which is no reason to take this process
    out of service."""
    db.session.execute(text("SELECT 1"))
    db.session.rollback()
    agent = current_app.extensions["chat_service"].agent
    breakers = getattr(agent, "breakers", {})
    return {"status": "ready", "agent": breakers["primary"].state if breakers else "closed"}
