"""Everything of a user at once: the export of their data, and its erasure."""
from flask import Blueprint, Response, stream_with_context

from chatapp import errors, user_data
from chatapp.auth import authenticate
from chatapp.extensions import db
from chatapp.openapi import documented
from chatapp.routes.inputs import check_user_id, query_params
from chatapp.schemas import ExportQuerySchema, UserExportSchema

bp = Blueprint("user_data", __name__, url_prefix="/api/<user_id>")
# Schema instances are stateless between calls: built once, shared by every thread.
_EXPORT_QUERY = ExportQuerySchema()
EXPORT_DISPOSITION = 'attachment; filename="chatapp-export.json"'


@bp.get("/export")
@documented(
    summary="Everything of the user as one JSON document, to download",
    operation_id="export_user_data",
    query=ExportQuerySchema,
    response=UserExportSchema,
    tags=("history",),
)
def export_user_data(user_id: str):
    """Every conversation (most recently active first) with every one of its messages (oldest
    first), each as the history shows it; sent as it is read, however large the history."""
    check_user_id(user_id)
    query_params(_EXPORT_QUERY)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    document = user_data.export_document(db.session, user_id)  # 3. read its first page
    # 5. return the rest as it is read, in the request's context (its database session)
    return Response(stream_with_context(document), mimetype="application/json",
                    headers={"Content-Disposition": EXPORT_DISPOSITION})


@bp.delete("/conversations")
@documented(
    summary="Erase everything of the user: conversations, messages, feedback, idempotency keys, usage, budget",
    operation_id="erase_user_data",
    status=204,
    errors=(errors.ConversationBusy,),
    tags=("history",),
)
def erase_user_data(user_id: str):
    check_user_id(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    user_data.erase_user_data(db.session, user_id)  # 4. erase
    response = Response(status=204)  # 5. return
    del response.headers["Content-Type"]  # no body, so no content type
    return response
