"""Steps 3 and 4 of a chat turn: resolve the conversation, call the agent, store the turn atomically."""
import uuid
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from sqlalchemy.exc import IntegrityError

from chatapp import queries
from chatapp.agent_client import AgentRunner
from chatapp.errors import ConversationBusy, ConversationNotFound
from chatapp.extensions import db
from chatapp.models import TITLE_LENGTH, Conversation, Message, utcnow


@dataclass(frozen=True)
class ChatTurn:
    """The stored result of one turn, as ChatResponseSchema dumps it."""

    conversation_id: str
    message_id: str
    message: str
    role: str
    created_at: datetime
    usage: dict | None
    model: str


def parse_conversation_id(value: str) -> uuid.UUID:
    """The UUID a client sent; anything malformed is just a conversation that does not exist."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ConversationNotFound() from None
    if str(parsed) != value.lower():  # refuse the braced, URN and bare-hex spellings
        raise ConversationNotFound()
    return parsed


def resolve_conversation(user_id: str, conversation_id: str | None) -> queries.ConversationState | None:
    """Step 3: the user's existing conversation, or None for a new one; 404 for any other id."""
    if conversation_id is None:
        return None
    conversation = queries.find_conversation(user_id, parse_conversation_id(conversation_id))
    if conversation is None:
        raise ConversationNotFound()
    return conversation


def build_context(history: list[tuple[str, str]], user_message: str) -> list[dict]:
    """What the agent sees: the optional system prompt, the kept history, the new message."""
    system_prompt = current_app.config["AGENT_SYSTEM_PROMPT"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": role, "content": content} for role, content in history]
    messages.append({"role": "user", "content": user_message})
    return messages


def conversation_title(first_message: str) -> str:
    """The start of the first user message, on one line."""
    return " ".join(first_message.split())[:TITLE_LENGTH]


def send_message(user_id: str, chat_request: dict, agent: AgentRunner, request_id: str | None = None) -> ChatTurn:
    """Steps 3 and 4. Reads, then releases the database connection while the agent works, then
    stores the conversation (if new) and both messages in one short transaction."""
    config = current_app.config
    user_message, model = chat_request["message"], chat_request["model"]
    asked_at = utcnow()

    conversation = resolve_conversation(user_id, chat_request["conversation_id"])
    history = []
    if conversation is not None:
        history = queries.recent_history(conversation.id, config["CONTEXT_MAX_MESSAGES"], config["CONTEXT_MAX_CHARS"])
    # End the read transaction: a slow agent must not hold a pooled connection.
    db.session.rollback()

    reply = agent.run(build_context(history, user_message), model, request_id=request_id)

    answered_at = utcnow()
    try:
        if conversation is None:
            conversation_id, first_seq = uuid.uuid4(), 1
            db.session.add(
                Conversation(
                    id=conversation_id,
                    user_id=user_id,
                    title=conversation_title(user_message),
                    message_count=2,
                    created_at=asked_at,
                    updated_at=answered_at,
                )
            )
        else:
            conversation_id, first_seq = conversation.id, conversation.message_count + 1
            if not queries.advance_message_count(conversation_id, conversation.message_count, 2, answered_at):
                raise ConversationBusy()
        message_id = uuid.uuid4()
        db.session.add_all(
            [
                Message(
                    id=uuid.uuid4(),  # both ids given, so both rows go in one batched INSERT
                    conversation_id=conversation_id,
                    seq=first_seq,
                    role="user",
                    content=user_message,
                    created_at=asked_at,
                ),
                Message(
                    id=message_id,
                    conversation_id=conversation_id,
                    seq=first_seq + 1,
                    role="assistant",
                    content=reply.content,
                    created_at=answered_at,
                ),
            ]
        )
        db.session.commit()
    except IntegrityError:
        # Another turn took these sequence numbers first.
        db.session.rollback()
        raise ConversationBusy() from None
    except BaseException:
        db.session.rollback()
        raise

    return ChatTurn(
        conversation_id=str(conversation_id),
        message_id=str(message_id),
        message=reply.content,
        role="assistant",
        created_at=answered_at,
        usage=reply.usage,
        model=model,
    )
