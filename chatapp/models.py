"""The stored conversation: Conversation and its Messages, numbered per conversation."""
import json
import uuid
from datetime import date, datetime, timezone

from sqlalchemy import (
    BigInteger, Date, DateTime, ForeignKey, Index, Integer, PrimaryKeyConstraint, String, Text, TypeDecorator,
    UniqueConstraint, Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from chatapp.extensions import db
from chatapp.values import IDEMPOTENCY_KEY_MAX_CHARS, MODEL_MAX_CHARS, TITLE_MAX_CHARS, USER_ID_MAX_CHARS


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every database (SQLite returns naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class JSONText(TypeDecorator):
    """A JSON value kept as compact ASCII text: stored and read back as is on every database (never
    queried inside; PostgreSQL's json type would refuse some escapes that the agent may send)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return json.dumps(value, separators=(",", ":")) if value is not None else None

    def process_result_value(self, value, dialect):
        return json.loads(value) if value is not None else None


class Conversation(db.Model):
    """One user's conversation; `message_count` is also the last sequence number used.

    A turn in flight holds the conversation through `claim_token` until `claimed_until`, so that
    turns of one conversation never interleave, across processes and hosts; `stop_requested` set
    to that token asks the process running the turn to stop it."""

    __tablename__ = "conversations"
    # Serves the conversation list: one user's, most recently active first, paged by (updated_at, id).
    # The retention purge finds old conversations of every user by updated_at.
    __table_args__ = (Index("ix_conversations_user_id_updated_at_id", "user_id", "updated_at", "id"),
                      Index("ix_conversations_updated_at", "updated_at"))

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[str] = mapped_column(String(USER_ID_MAX_CHARS))
    title: Mapped[str] = mapped_column(String(TITLE_MAX_CHARS))
    # The client's own string keys and values (`metadata` is the declarative base's own name).
    meta: Mapped[dict | None] = mapped_column("metadata", JSONText)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    claim_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_requested: Mapped[uuid.UUID | None] = mapped_column(Uuid)  # the claim token of a turn asked to stop


class Message(db.Model):
    """One message of a conversation; `seq` runs 1, 2, 3... without gaps; an assistant message
    keeps the model that answered (the fallback agent's, when it answered) and why it ended."""

    __tablename__ = "messages"
    # The unique (conversation_id, seq) index serves the history query and forbids interleaved turns.
    __table_args__ = (UniqueConstraint("conversation_id", "seq"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    model: Mapped[str | None] = mapped_column(String(MODEL_MAX_CHARS))  # an answer's: the model that gave it
    finish_reason: Mapped[str | None] = mapped_column(String(16))  # an answer's: stop, length or stopped
    usage: Mapped[dict | None] = mapped_column(JSONText)  # an answer's: the token usage the agent reported
    # An answer's feedback from its user: a rating (like, dislike or none), a comment, when it was given.
    feedback_rating: Mapped[str | None] = mapped_column(String(16))
    feedback_comment: Mapped[str | None] = mapped_column(Text)
    feedback_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKey(db.Model):
    """A client's idempotency key: in progress (held by `claim_token` until `locked_until`),
    then completed with the exact response body to replay."""

    __tablename__ = "idempotency_keys"
    # By conversation: deleting, erasing or purging a conversation takes its keys with it.
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),
                      Index("ix_idempotency_keys_conversation_id", "conversation_id"))

    user_id: Mapped[str] = mapped_column(String(USER_ID_MAX_CHARS), primary_key=True)
    key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_MAX_CHARS), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    claim_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    response_body: Mapped[str | None] = mapped_column(Text)
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DailyUsage(db.Model):
    """What one user spent on one UTC day: turns, prompt and completion tokens, and how many of
    those turns were estimated (the agent reported no usage). One row a user and day, added to in
    each turn's own transaction."""

    __tablename__ = "daily_usage"
    __table_args__ = (PrimaryKeyConstraint("user_id", "day"),)

    user_id: Mapped[str] = mapped_column(String(USER_ID_MAX_CHARS))
    day: Mapped[date] = mapped_column(Date)
    turns: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    estimated_turns: Mapped[int] = mapped_column(Integer)


class TokenBudget(db.Model):
    """One user's own token budget, in place of TOKEN_BUDGET's limit (`flask set-budget`):
    `token_limit` None is unlimited."""

    __tablename__ = "token_budgets"

    user_id: Mapped[str] = mapped_column(String(USER_ID_MAX_CHARS), primary_key=True)
    token_limit: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
