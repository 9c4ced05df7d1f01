"""Reading, changing and deleting a user's history (contract section 9): steps 3 and 4 of the
history endpoints (conversations, their titles and metadata, feedback on answers)."""
import uuid
from dataclasses import dataclass
from datetime import datetime

from chatapp import queries
from chatapp.errors import ConversationBusy, ConversationNotFound, MessageNotFound
from chatapp.extensions import db
from chatapp.models import utcnow
from chatapp.values import parse_conversation_id, parse_message_id


@dataclass(frozen=True)
class ConversationPage:
    """A page of conversations, and where the next one starts (None: this is the last)."""

    conversations: list[queries.ConversationSummary]
    next_position: tuple[datetime, uuid.UUID] | None


@dataclass(frozen=True)
class MessagePage:
    """A page of one conversation's messages, oldest first."""

    conversation_id: uuid.UUID
    messages: list[queries.StoredMessage]
    has_more: bool


@dataclass(frozen=True)
class FeedbackGiven:
    """The feedback now on an answer (rating and comment None: none), and when it was put."""

    message_id: uuid.UUID
    rating: str | None
    comment: str | None
    updated_at: datetime


def list_conversations(user_id: str, limit: int, after: tuple[datetime, uuid.UUID] | None) -> ConversationPage:
    """The user's conversations, most recently active first, `limit` at a time."""
    rows = queries.list_conversations(db.session, user_id, limit + 1, after)  # one more tells whether a next page exists
    page = rows[:limit]
    next_position = (page[-1].updated_at, page[-1].id) if len(rows) > limit else None
    return ConversationPage(page, next_position)


def get_conversation(user_id: str, conversation_id: str) -> queries.ConversationSummary:
    """The user's conversation; 404 for any id that is not one."""
    summary = queries.find_conversation_summary(db.session, user_id, parse_conversation_id(conversation_id))
    if summary is None:
        raise ConversationNotFound()
    return summary


def list_messages(user_id: str, conversation_id: str, limit: int, before_seq: int | None) -> MessagePage:
    """The `limit` messages just before `before_seq` (the latest when None), oldest first."""
    conversation = get_conversation(user_id, conversation_id)
    rows = queries.list_messages(db.session, conversation.id, limit + 1, before_seq)
    return MessagePage(conversation.id, list(reversed(rows[:limit])), has_more=len(rows) > limit)


def update_conversation(user_id: str, conversation_id: str, changes: dict) -> queries.ConversationSummary:
    """Rename the user's conversation and/or replace its metadata (`changes`: `title`, `meta`, as
    ConversationUpdateSchema loads them); a turn in flight on it goes on untouched."""
    parsed_id = parse_conversation_id(conversation_id)
    if "meta" in changes:
        changes = {**changes, "meta": changes["meta"] or None}  # {} and null both mean none: one spelling in the table
    summary = queries.update_conversation(db.session, user_id, parsed_id, changes)
    if summary is None:
        raise ConversationNotFound()
    db.session.commit()
    return summary


def put_feedback(user_id: str, conversation_id: str, message_id: str, rating: str | None, comment: str | None) -> FeedbackGiven:
    """Give, replace or (rating and comment both None) clear the user's feedback on an answer of
    their conversation; 404 for a conversation that is not theirs, then for any message that is
    not one of its answers."""
    parsed_conversation_id = parse_conversation_id(conversation_id)
    if not queries.conversation_exists(db.session, user_id, parsed_conversation_id):
        raise ConversationNotFound()
    parsed_message_id = parse_message_id(message_id)
    now = utcnow()
    # A cleared feedback keeps no time either: the answer reads as one never rated.
    given_at = None if rating is None and comment is None else now
    if not queries.put_feedback(db.session, parsed_conversation_id, parsed_message_id, rating, comment, given_at):
        raise MessageNotFound()
    db.session.commit()
    return FeedbackGiven(parsed_message_id, rating, comment, now)


def delete_conversation(user_id: str, conversation_id: str) -> None:
    """Delete the conversation with its messages and idempotency keys; 409 while a turn holds it."""
    parsed_id = parse_conversation_id(conversation_id)
    if not queries.delete_conversation(db.session, user_id, parsed_id, utcnow()):
        if queries.conversation_exists(db.session, user_id, parsed_id):
            raise ConversationBusy()
        raise ConversationNotFound()
    db.session.commit()
