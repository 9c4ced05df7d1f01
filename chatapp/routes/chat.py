"""POST /api/<user_id>/chat: the five steps of the contract, in order."""
from flask import Blueprint, current_app, g

from chatapp.auth import authenticate
from chatapp.chat_service import send_message
from chatapp.routes.body import json_body
from chatapp.schemas import ChatRequestSchema, ChatResponseSchema, PathUserSchema

bp = Blueprint("chat", __name__)


def load_chat_request(user_id: str) -> dict:
    """Step 1: the path's user id and the JSON body, validated."""
    PathUserSchema().load({"user_id": user_id})
    schema = ChatRequestSchema(
        default_model=current_app.config["DEFAULT_MODEL"], allowed_models=current_app.config["ALLOWED_MODELS"]
    )
    return schema.load(json_body())


@bp.post("/api/<user_id>/chat")
def chat(user_id: str):
    """One chat turn."""
    chat_request = load_chat_request(user_id)  # 1. validate
    authenticate(user_id)  # 2. authenticate
    turn = send_message(  # 3. resolve the conversation, 4. execute the agent and store the turn
        user_id, chat_request, agent=current_app.extensions["chat_agent"], request_id=g.request_id
    )
    return ChatResponseSchema().dump(turn)  # 5. return
