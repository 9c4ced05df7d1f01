"""GET /api/<user_id>/usage: what the user spent, day by day, and their token budget."""
from flask import Blueprint, current_app, request

from chatapp.auth import authenticate
from chatapp.extensions import db
from chatapp.routes.inputs import check_user_id
from chatapp.openapi import documented
from chatapp.schemas import UsageQuerySchema, UsageSchema

bp = Blueprint("usage", __name__)
# Schema instances are stateless between calls: built once, shared by every thread.
_QUERY, _USAGE = UsageQuerySchema(), UsageSchema()


@bp.get("/api/<user_id>/usage")
@documented(
    summary="The user's token usage, day by day, and their token budget",
    query=UsageQuerySchema,
    response=UsageSchema,
    tags=("usage",),
)
def get_usage(user_id: str):
    """Totals of the days from `from` to `to` (UTC, both included; by default the current budget
    period, or the current UTC month without a budget), the days with turns, and the budget now."""
    check_user_id(user_id)
    ledger = current_app.extensions["usage"]
    default = ledger.default_range()
    first_day, last_day = _QUERY.load_range(request.args.to_dict(), default.first_day, default.last_day)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    return _USAGE.dump(ledger.report(db.session, user_id, first_day, last_day))  # 3. read, 5. return
