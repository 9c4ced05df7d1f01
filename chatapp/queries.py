"""The SQL of a chat turn: every query reads or writes a bounded number of rows."""
import uuid
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select, update

from chatapp.extensions import db
from chatapp.models import Conversation, Message


class ConversationState(NamedTuple):
    """What a turn needs to know of an existing conversation, read before the agent call."""

    id: uuid.UUID
    message_count: int


def find_conversation(user_id: str, conversation_id: uuid.UUID) -> ConversationState | None:
    """The user's conversation with this id, or None (unknown or another user's look the same)."""
    row = db.session.execute(
        select(Conversation.id, Conversation.message_count).where(
            Conversation.id == conversation_id, Conversation.user_id == user_id
        )
    ).first()
    return ConversationState(*row) if row else None


def recent_history(conversation_id: uuid.UUID, max_messages: int, max_chars: int) -> list[tuple[str, str]]:
    """(role, content) of the latest messages, oldest first: at most `max_messages`, dropping the
    oldest until their contents total at most `max_chars`. Reads only those rows, through the
    (conversation_id, seq) index, whatever the length of the conversation."""
    if max_messages <= 0:
        return []
    latest = (
        select(Message.seq, Message.role, Message.content)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq.desc())
        .limit(max_messages)
        .subquery()
    )
    newest_first_chars = func.sum(func.length(latest.c.content)).over(order_by=latest.c.seq.desc())
    windowed = select(latest, newest_first_chars.label("chars_so_far")).subquery()
    rows = db.session.execute(
        select(windowed.c.role, windowed.c.content)
        .where(windowed.c.chars_so_far <= max_chars)
        .order_by(windowed.c.seq)
    )
    return [(role, content) for role, content in rows]


def advance_message_count(conversation_id: uuid.UUID, seen_count: int, added: int, now: datetime) -> bool:
    """Reserve the next `added` sequence numbers, if nobody took them since we read `seen_count`."""
    result = db.session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.message_count == seen_count)
        .values(message_count=seen_count + added, updated_at=now)
    )
    return result.rowcount == 1
