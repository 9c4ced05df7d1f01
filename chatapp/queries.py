"""The SQL of the service: every statement reads or writes a bounded number of rows. Each function
runs on the session it is given (the request's, or one of a background thread's)."""
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from typing import NamedTuple

from sqlalchemy import and_, bindparam, delete, exists, func, insert, literal, not_, or_, select, true, tuple_, union_all, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, scoped_session

from chatapp.models import Conversation, DailyUsage, IdempotencyKey, Message, TokenBudget, utcnow

# The hot path writes through the tables (SQLAlchemy Core): the ORM's unit of work and session
# synchronisation cost a turn more than its SQL does, and no ORM object is loaded anyway.
conversations = Conversation.__table__
messages = Message.__table__
# Plain ORM-enabled UPDATE/DELETE elsewhere: nothing loaded needs synchronizing.
_BULK = {"synchronize_session": False}


def _param(name: str, column):
    """A named parameter of a statement built once, typed like the column it is compared to."""
    return bindparam(name, type_=column.type)


# The statements of every turn are built once, with named parameters: building a statement and
# computing its cache key on every call cost a turn more CPU than running it did.
_CLAIM = (
    update(conversations)
    .where(
        conversations.c.id == _param("conversation_id", conversations.c.id),
        conversations.c.user_id == _param("owner", conversations.c.user_id),
        or_(conversations.c.claimed_until.is_(None), conversations.c.claimed_until < _param("now", conversations.c.claimed_until)),
    )
    .values(claim_token=_param("new_token", conversations.c.claim_token), claimed_until=_param("until", conversations.c.claimed_until))
)
_CLAIM_CONVERSATION = _CLAIM.returning(conversations.c.message_count)
_FINISH_CONVERSATION_TURN = (
    update(conversations)
    .where(
        conversations.c.id == _param("conversation_id", conversations.c.id),
        conversations.c.claim_token == _param("token", conversations.c.claim_token),
    )
    .values(
        message_count=_param("new_message_count", conversations.c.message_count),
        updated_at=_param("now", conversations.c.updated_at),
        claim_token=None,
        claimed_until=None,
    )
)
_INSERT_CONVERSATION = insert(conversations).values({
    name: _param(name, conversations.c[name]) for name in ("id", "user_id", "title", "message_count", "created_at", "updated_at")})
# A turn stores two messages in one statement: with RETURNING, SQLAlchemy sends an executemany of
# an INSERT as one multi-row INSERT ("insertmanyvalues"), cached once compiled; without it, psycopg
# runs an executemany as a pipeline, which costs a turn more.
_INSERT_MESSAGES = insert(messages).returning(messages.c.seq)


def _history_window(before_seq: bool = False):
    """The latest `max_messages` messages of a conversation (with `before_seq`: of those before
    that sequence number), with the characters of each and of the newer ones (newest first),
    through the (conversation_id, seq) index."""
    conditions = [messages.c.conversation_id == _param("conversation_id", messages.c.conversation_id)]
    if before_seq:
        conditions.append(messages.c.seq < _param("before_seq", messages.c.seq))
    latest = (
        select(messages.c.seq, messages.c.role, messages.c.content)
        .where(*conditions)
        .order_by(messages.c.seq.desc())
        .limit(bindparam("max_messages"))
        .subquery()
    )
    newest_first_chars = func.sum(func.length(latest.c.content)).over(order_by=latest.c.seq.desc())
    return select(latest, newest_first_chars.label("chars_so_far")).subquery("history")


def _recent_history_statement(before_seq: bool = False):
    """The window's messages whose contents, with the newer ones', total at most `max_chars`, oldest first."""
    windowed = _history_window(before_seq)
    return (
        select(windowed.c.role, windowed.c.content)
        .where(windowed.c.chars_so_far <= bindparam("max_chars"))
        .order_by(windowed.c.seq)
    )


_RECENT_HISTORY = _recent_history_statement()
_HISTORY_BEFORE = _recent_history_statement(before_seq=True)


class StoredKey(NamedTuple):
    """An idempotency key's row, as a claim attempt found it."""

    fingerprint: str
    response_body: str | None
    locked_until: datetime | None
    created_at: datetime


def claim_conversation(session: Session, user_id: str, conversation_id: uuid.UUID, token: uuid.UUID, now: datetime, until: datetime) -> int | None:
    """Hold the user's conversation for one turn, atomically, unless another turn holds it.
    Its message count when claimed; None when it is held, another user's or absent."""
    row = session.execute(
        _CLAIM_CONVERSATION,
        {"conversation_id": conversation_id, "owner": user_id, "now": now, "new_token": token, "until": until},
    ).first()
    return row[0] if row else None


def conversation_exists(session: Session, user_id: str, conversation_id: uuid.UUID) -> bool:
    """Whether the user has this conversation."""
    return session.scalar(
        select(exists().where(Conversation.id == conversation_id, Conversation.user_id == user_id))
    )


def finish_conversation_turn(session: Session, conversation_id: uuid.UUID, token: uuid.UUID, message_count: int, now: datetime,
                             day_usage: dict) -> bool:
    """Record the turn's new message count and release the claim, if it is still ours; count the
    turn in its user's day (`day_usage`, from day_usage())."""
    parameters = {"conversation_id": conversation_id, "token": token, "new_message_count": message_count, "now": now}
    return _counting_the_turn(session, "finish", parameters, day_usage).rowcount == 1


def insert_conversation(session: Session, values: dict, day_usage: dict) -> None:
    """A new conversation row; its first turn counted in its user's day."""
    _counting_the_turn(session, "insert", values, day_usage)


def insert_messages(session: Session, rows: list[dict]) -> None:
    """Message rows, in one statement."""
    session.execute(_INSERT_MESSAGES, rows).all()


_RENEW_CONVERSATION_CLAIM = (
    update(conversations)
    .where(conversations.c.id == _param("conversation_id", conversations.c.id),
           conversations.c.claim_token == _param("token", conversations.c.claim_token))
    .values(claimed_until=_param("until", conversations.c.claimed_until))
)
keys = IdempotencyKey.__table__
_INSERT_KEY_UNLESS_THERE = postgresql.insert(keys).on_conflict_do_nothing().returning(keys.c.key)
_RENEW_KEY_CLAIM = (
    update(keys)
    .where(keys.c.user_id == _param("owner", keys.c.user_id), keys.c.key == _param("name", keys.c.key),
           keys.c.claim_token == _param("token", keys.c.claim_token))
    .values(locked_until=_param("until", keys.c.locked_until))
)


def renew_claims(session: Session, conversations_held: list[tuple[uuid.UUID, uuid.UUID]], keys_held: list[tuple[str, str, uuid.UUID]],
                 until: datetime) -> None:
    """Extend the claims of running turns, each by its primary key and only while it is still the
    turn's: (conversation id, token) and (user id, key, token)."""
    if conversations_held:
        session.execute(_RENEW_CONVERSATION_CLAIM, [
            {"conversation_id": conversation_id, "token": token, "until": until} for conversation_id, token in conversations_held])
    if keys_held:
        session.execute(_RENEW_KEY_CLAIM, [
            {"owner": owner, "name": name, "token": token, "until": until} for owner, name, token in keys_held])


def request_stop(session: Session, user_id: str, conversation_id: uuid.UUID, now: datetime) -> uuid.UUID | None:
    """Ask the turn holding the user's conversation to stop: the token of its claim, or None when
    no turn holds it (or it is not the user's)."""
    return session.scalar(
        update(conversations)
        .where(conversations.c.id == conversation_id, conversations.c.user_id == user_id,
               conversations.c.claim_token.is_not(None), conversations.c.claimed_until >= now)
        .values(stop_requested=conversations.c.claim_token)
        .returning(conversations.c.claim_token)
    )


def claim_token(session: Session, conversation_id: uuid.UUID) -> uuid.UUID | None:
    """The token of the claim on the conversation now (None: free)."""
    return session.scalar(select(conversations.c.claim_token).where(conversations.c.id == conversation_id))


def stops_requested(session: Session, held: list[tuple[uuid.UUID, uuid.UUID]]) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """Of the (conversation id, claim token) pairs held by this process's turns, those asked to stop:
    one statement, by primary key."""
    rows = session.execute(
        select(conversations.c.id, conversations.c.claim_token)
        .where(conversations.c.id.in_([conversation_id for conversation_id, _ in held]),
               conversations.c.stop_requested == conversations.c.claim_token)
    )
    return set(rows.tuples()) & set(held)


def release_conversation(session: Session, conversation_id: uuid.UUID, token: uuid.UUID) -> None:
    """Give the conversation back after a failed turn (only if the claim is still ours)."""
    session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.claim_token == token)
        .values(claim_token=None, claimed_until=None)
        .execution_options(**_BULK)
    )


def recent_history(session: Session | Connection, conversation_id: uuid.UUID, max_messages: int, max_chars: int,
                   before_seq: int | None = None) -> list[tuple[str, str]]:
    """(role, content) of the latest messages (before sequence number `before_seq`, when given),
    oldest first: at most `max_messages`, dropping the oldest until their contents total at most
    `max_chars`. Reads only those rows, through the (conversation_id, seq) index, whatever the
    length of the conversation."""
    if max_messages <= 0:
        return []
    parameters = {"conversation_id": conversation_id, "max_messages": max_messages, "max_chars": max_chars}
    statement = _RECENT_HISTORY
    if before_seq is not None:
        statement, parameters["before_seq"] = _HISTORY_BEFORE, before_seq
    rows = session.execute(statement, parameters).all()  # one fetch: iterating the result fetches row by row
    return [(role, content) for role, content in rows]


def delete_message(session: Session, conversation_id: uuid.UUID, seq: int) -> bool:
    """Delete the conversation's message `seq` (an answer being replaced), feedback and all."""
    return session.execute(
        delete(messages).where(messages.c.conversation_id == conversation_id, messages.c.seq == seq)
    ).rowcount == 1


def insert_idempotency_key(session: Session, user_id: str, key: str, fingerprint: str, token: uuid.UUID, now: datetime, locked_until: datetime) -> bool:
    """Record the key as in progress and commit (on PostgreSQL, one statement in autocommit: one
    round trip instead of three); False when the user already has this key."""
    values = {"user_id": user_id, "key": key, "fingerprint": fingerprint, "claim_token": token, "locked_until": locked_until,
              "created_at": now}
    if is_postgresql(session):
        with statements_alone(session) as connection:
            return connection.execute(_INSERT_KEY_UNLESS_THERE, values).first() is not None
    try:
        session.execute(insert(keys).values(values))
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
        return False


def find_idempotency_key(session: Session, user_id: str, key: str) -> StoredKey | None:
    """The user's stored key, or None."""
    row = session.execute(
        select(
            IdempotencyKey.fingerprint,
            IdempotencyKey.response_body,
            IdempotencyKey.locked_until,
            IdempotencyKey.created_at,
        ).where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
    ).first()
    return StoredKey(*row) if row else None


def delete_idempotency_key(session: Session, user_id: str, key: str, created_at: datetime) -> None:
    """Remove an expired or abandoned key and commit, unless it was replaced since it was read."""
    session.execute(
        delete(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key, IdempotencyKey.created_at == created_at)
        .execution_options(**_BULK)
    )
    session.commit()


def complete_idempotency_key(session: Session, user_id: str, key: str, token: uuid.UUID, response_body: str, conversation_id: uuid.UUID) -> bool:
    """Store the response to replay, if the key is still held by this claim."""
    result = session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key, IdempotencyKey.claim_token == token)
        .values(response_body=response_body, conversation_id=conversation_id, claim_token=None, locked_until=None)
        .execution_options(**_BULK)
    )
    return result.rowcount == 1


def release_idempotency_key(session: Session, user_id: str, key: str, token: uuid.UUID) -> None:
    """Forget a key whose request failed, if it is still held by this claim."""
    session.execute(
        delete(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key, IdempotencyKey.claim_token == token)
        .execution_options(**_BULK)
    )


def delete_expired_keys(session: Session, created_before: datetime, limit: int) -> int:
    """Delete up to `limit` keys created before `created_before`, found through the created_at
    index; how many went. The age is checked again on the row deleted: a key expired, removed and
    claimed anew meanwhile has the same primary key."""
    expired = keys.c.created_at < created_before
    batch = select(keys.c.user_id, keys.c.key).where(expired).limit(limit)
    return session.execute(delete(keys).where(tuple_(keys.c.user_id, keys.c.key).in_(batch), expired)).rowcount


class ConversationSummary(NamedTuple):
    """A conversation as the history endpoints show it."""

    id: uuid.UUID
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int
    meta: dict | None  # the client's metadata (None: none)


class Feedback(NamedTuple):
    """A user's feedback on an answer: a rating (like, dislike or None), a comment, when it was given."""

    rating: str | None
    comment: str | None
    updated_at: datetime


class StoredMessage(NamedTuple):
    """A message as the history endpoints show it."""

    id: uuid.UUID
    seq: int
    role: str
    content: str
    created_at: datetime
    model: str | None
    finish_reason: str | None
    usage: dict | None
    feedback_rating: str | None
    feedback_comment: str | None
    feedback_at: datetime | None

    @property
    def feedback(self) -> Feedback | None:
        """The user's feedback on this answer; None when none was given, or it was cleared."""
        if self.feedback_at is None:
            return None
        return Feedback(self.feedback_rating, self.feedback_comment, self.feedback_at)


_SUMMARY_COLUMNS = (
    Conversation.id,
    Conversation.title,
    Conversation.created_at,
    Conversation.updated_at,
    Conversation.message_count,
    Conversation.meta,
)
# A StoredMessage's, in its order: the message pages and the export read the same.
_MESSAGE_COLUMNS = (
    Message.id, Message.seq, Message.role, Message.content, Message.created_at, Message.model, Message.finish_reason,
    Message.usage, Message.feedback_rating, Message.feedback_comment, Message.feedback_at,
)


def list_conversations(session: Session, user_id: str, limit: int, after: tuple[datetime, uuid.UUID] | None) -> list[ConversationSummary]:
    """Up to `limit` of the user's conversations, most recently active first, starting after the
    (updated_at, id) position `after`: one range scan of the (user_id, updated_at, id) index."""
    query = select(*_SUMMARY_COLUMNS).where(Conversation.user_id == user_id)
    if after is not None:
        query = query.where(tuple_(Conversation.updated_at, Conversation.id) < tuple_(*after))
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit)
    return [ConversationSummary(*row) for row in session.execute(query)]


def find_conversation_summary(session: Session, user_id: str, conversation_id: uuid.UUID) -> ConversationSummary | None:
    """The user's conversation, or None (unknown or another user's look the same)."""
    row = session.execute(
        select(*_SUMMARY_COLUMNS).where(Conversation.id == conversation_id, Conversation.user_id == user_id)
    ).first()
    return ConversationSummary(*row) if row else None


def list_messages(session: Session, conversation_id: uuid.UUID, limit: int, before_seq: int | None) -> list[StoredMessage]:
    """Up to `limit` messages just before sequence number `before_seq` (the latest when None),
    newest first: one range scan of the (conversation_id, seq) index."""
    query = select(*_MESSAGE_COLUMNS).where(Message.conversation_id == conversation_id)
    if before_seq is not None:
        query = query.where(Message.seq < before_seq)
    query = query.order_by(Message.seq.desc()).limit(limit)
    return [StoredMessage(*row) for row in session.execute(query)]


def messages_after(session: Session, conversation_id: uuid.UUID, after_seq: int, last_seq: int, limit: int) -> list[StoredMessage]:
    """Up to `limit` messages after sequence number `after_seq`, up to `last_seq`, oldest first:
    one range scan of the (conversation_id, seq) index."""
    return [StoredMessage(*row) for row in session.execute(
        select(*_MESSAGE_COLUMNS)
        .where(Message.conversation_id == conversation_id, Message.seq > after_seq, Message.seq <= last_seq)
        .order_by(Message.seq)
        .limit(limit)
    )]


def update_conversation(session: Session, user_id: str, conversation_id: uuid.UUID, changes: dict) -> ConversationSummary | None:
    """Set the user's conversation's `title` and/or `meta` (the keys of `changes`): the conversation
    as it is now, or None when the user has no such conversation. A turn in flight is left alone
    (its claim, the message count), and so is updated_at: it is the last turn's time, which orders
    the conversation list, and a rename is no activity."""
    row = session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
        .values(**changes)
        .returning(*_SUMMARY_COLUMNS)
        .execution_options(**_BULK)
    ).first()
    return ConversationSummary(*row) if row else None


def put_feedback(session: Session, conversation_id: uuid.UUID, message_id: uuid.UUID, rating: str | None, comment: str | None,
                 given_at: datetime | None) -> bool:
    """Set the feedback on the conversation's answer `message_id` (all None: clear it); False when
    the conversation has no such answer (unknown, a user message, another conversation's)."""
    return session.scalar(
        update(messages)
        .where(messages.c.id == message_id, messages.c.conversation_id == conversation_id, messages.c.role == "assistant")
        .values(feedback_rating=rating, feedback_comment=comment, feedback_at=given_at)
        .returning(messages.c.id)
    ) is not None


def delete_conversation(session: Session, user_id: str, conversation_id: uuid.UUID, now: datetime) -> bool:
    """Delete the user's conversation unless a turn holds it; its messages and idempotency keys
    go with it (ON DELETE CASCADE). False when nothing was deleted."""
    result = session.execute(
        delete(Conversation)
        .where(
            Conversation.id == conversation_id,
            Conversation.user_id == user_id,
            or_(Conversation.claimed_until.is_(None), Conversation.claimed_until < now),
        )
        .execution_options(**_BULK)
    )
    return result.rowcount == 1


daily_usage = DailyUsage.__table__
token_budgets = TokenBudget.__table__


def _add_daily_usage_statement(dialect_insert, once_per_row_of=None):
    """INSERT ... ON CONFLICT (user_id, day) DO UPDATE adding to the row: one statement whatever
    the history, atomic under concurrent turns of one user (PostgreSQL and SQLite both have it).
    With `once_per_row_of` (a CTE), it adds only if that CTE returned a row."""
    added_values = {
        "user_id": _param("owner", daily_usage.c.user_id), "day": _param("day", daily_usage.c.day), "turns": literal(1),
        "prompt_tokens": _param("prompt_tokens", daily_usage.c.prompt_tokens),
        "completion_tokens": _param("completion_tokens", daily_usage.c.completion_tokens),
        "estimated_turns": _param("estimated_turns", daily_usage.c.estimated_turns)}
    if once_per_row_of is None:
        statement = dialect_insert(daily_usage).values(added_values)
    else:
        statement = dialect_insert(daily_usage).from_select(
            list(added_values), select(*added_values.values()).select_from(once_per_row_of))
    added = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[daily_usage.c.user_id, daily_usage.c.day],
        set_={name: daily_usage.c[name] + added[name]
              for name in ("turns", "prompt_tokens", "completion_tokens", "estimated_turns")})


_ADD_DAILY_USAGE = {"postgresql": _add_daily_usage_statement(postgresql.insert),
                    "sqlite": _add_daily_usage_statement(sqlite.insert)}


def day_usage(user_id: str, day: date, prompt_tokens: int, completion_tokens: int, estimated: bool) -> dict:
    """One turn's addition to its user's row for `day`, as the statements below take it."""
    return {"owner": user_id, "day": day, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "estimated_turns": int(estimated)}


# On PostgreSQL the day's upsert rides in the conversation's own statement of the turn, as a
# data-modifying CTE (run once, whatever the main statement does): one round trip fewer a turn.
# Counted in a statement of its own, the counter cost S1 12% of its turns a second
# (bench/results/2026-12-06-d9a5795-usage.md).
_COUNTING_THE_TURN = {
    "finish": _FINISH_CONVERSATION_TURN.add_cte(_ADD_DAILY_USAGE["postgresql"].cte("counted")),
    "insert": _INSERT_CONVERSATION.add_cte(_ADD_DAILY_USAGE["postgresql"].cte("counted")),
}
_ALONE = {"finish": _FINISH_CONVERSATION_TURN, "insert": _INSERT_CONVERSATION}


def _counting_the_turn(session: Session, statement: str, parameters: dict, day_usage: dict):
    """Run the conversation's `statement` of a turn and count the turn in its user's day: in the
    same statement on PostgreSQL, in the next one on SQLite (in-process: no round trip to save)."""
    if is_postgresql(session):
        return session.execute(_COUNTING_THE_TURN[statement], {**parameters, **day_usage})
    result = session.execute(_ALONE[statement], parameters)
    session.execute(_ADD_DAILY_USAGE["sqlite"], day_usage)
    return result


# A turn in two statements on PostgreSQL, each its own transaction: a connection in autocommit
# sends no BEGIN and COMMIT. Before the agent, the claim and the history; after it, the conversation,
# both messages, the day's usage and the idempotency key. A continued turn was six round trips
# (BEGIN, claim, history, COMMIT; BEGIN, finish, messages, COMMIT); S2 ran at 0.57 of a turn
# doing only its two statements (bench/README.md, --reference).


def _claim_with_history_statement():
    """Claim the conversation (as _CLAIM_CONVERSATION) and read its history window: a row per
    message kept (role and content, oldest first; one row of NULLs for none), each with the message
    count claimed and whether the history read is the claimed conversation's (`current`).
    All of a statement reads one snapshot, taken when it starts; the claim's UPDATE, which waited
    for a turn storing its messages, sees that turn and the snapshot does not. The claimed row
    and the snapshot's then differ, and the caller reads the history again."""
    claimed = _CLAIM.returning(conversations.c.message_count, conversations.c.updated_at).cte("claimed")
    # A claim need not outlive a crash of the database (the turn holding it fails with it): its
    # commit does not wait for the WAL to reach the disk. set_config(..., true) is this statement's
    # transaction's own (SET LOCAL), so nothing outlives it on a pooled server connection.
    claim_commits_at_once = select(func.set_config("synchronous_commit", "off", true()).label("setting")).subquery("asynchronous")
    seen = (select(conversations.c.message_count, conversations.c.updated_at)
            .where(conversations.c.id == _param("conversation_id", conversations.c.id)).subquery("seen"))
    history = _history_window()
    current = and_(seen.c.message_count == claimed.c.message_count, seen.c.updated_at == claimed.c.updated_at)
    return (
        select(claimed.c.message_count, current.label("current"), history.c.role, history.c.content)
        .select_from(claimed.join(seen, true()).join(claim_commits_at_once, true())
                     .outerjoin(history, history.c.chars_so_far <= bindparam("max_chars")))
        .order_by(history.c.seq)
    )


_CLAIM_WITH_HISTORY = _claim_with_history_statement()
_MESSAGE_ROW = ("id", "seq", "role", "content", "created_at", "model", "finish_reason", "usage")


def _store_turn_statement(new_conversation: bool, with_key: bool):
    """The turn stored in one statement: the conversation inserted (new) or its claim finished, then
    the idempotency key completed, the day's usage added, both messages inserted. Either all of it
    or none: the messages take their conversation id from the rows written (the conversation's and
    the key's), and when one was not written (the claim lapsed and another turn took it), that id
    is NULL, which the NOT NULL constraint refuses, and the whole statement fails. The key is
    written after the conversation (its condition reads it), the order in which the lease renewal
    locks them: the other order deadlocked with it."""
    if new_conversation:
        # No parameter is named after a column of an UPDATE here: SQLAlchemy would add it to its SET.
        values = {"id": "conversation_id", "user_id": "owner", "title": "title", "message_count": "new_message_count",
                  "created_at": "asked_at", "updated_at": "now"}
        written = insert(conversations).from_select(
            list(values), select(*(_param(name, conversations.c[column]) for column, name in values.items())))
    else:
        written = _FINISH_CONVERSATION_TURN
    written = written.returning(conversations.c.id).cte("turned")
    ctes = [written, _add_daily_usage_statement(postgresql.insert, once_per_row_of=written).cte("counted")]
    conversation_id = select(written.c.id)
    if with_key:
        keyed = (
            update(keys)
            .where(keys.c.user_id == _param("owner", keys.c.user_id), keys.c.key == _param("key_name", keys.c.key),
                   keys.c.claim_token == _param("key_token", keys.c.claim_token), exists(select(written.c.id)))
            .values(response_body=_param("response_body", keys.c.response_body),
                    conversation_id=_param("conversation_id", keys.c.conversation_id), claim_token=None, locked_until=None)
            .returning(keys.c.key)
            .cte("keyed")
        )
        ctes.append(keyed)
        conversation_id = conversation_id.where(exists(select(keyed.c.key)))
    # Two SELECTs of parameters rather than a two-row VALUES: SQLAlchemy caches no multi-row VALUES
    # statement, and would compile it on every turn.
    rows = union_all(*(select(conversation_id.scalar_subquery(), *(_param(f"{who}_{name}", messages.c[name]) for name in _MESSAGE_ROW))
                       for who in ("question", "answer")))
    return (insert(messages).from_select(["conversation_id", *_MESSAGE_ROW], rows).returning(messages.c.seq)
            .add_cte(*ctes))


_STORE_TURN = {(new, with_key): _store_turn_statement(new, with_key) for new in (False, True) for with_key in (False, True)}


def is_postgresql(session: Session) -> bool:
    """Whether the session's database runs a turn as the two statements above, and single
    statements in autocommit (SQLite has no data-modifying CTEs, and no round trips to save)."""
    return session.get_bind().dialect.name == "postgresql"


@contextmanager
def statements_alone(session: Session | scoped_session) -> Iterator[Connection]:
    """A pooled connection of the session's engine (psycopg) in autocommit: each statement is a
    transaction of its own. The session should hold no connection meanwhile: a turn takes one at a
    time: the session's transaction, if it has one, is committed first. psycopg's own switch, not
    SQLAlchemy's isolation_level option: that one gives the connection back with an explicit
    isolation level, which every later BEGIN would then name."""
    if isinstance(session, scoped_session):  # a view's db.session
        session = session()
    if session.in_transaction():
        session.commit()
    with session.get_bind().connect() as connection:
        driver_connection = connection.connection.driver_connection
        driver_connection.autocommit = True
        try:
            yield connection
        finally:
            if not connection.invalidated:
                driver_connection.autocommit = False


def claim_conversation_with_history(connection: Connection, user_id: str, conversation_id: uuid.UUID, token: uuid.UUID,
                                    now: datetime, until: datetime, max_messages: int,
                                    max_chars: int) -> tuple[int, list[tuple[str, str]]] | None:
    """claim_conversation() and recent_history() in one statement: the message count claimed and
    the history, or None (held, another user's or absent)."""
    rows = connection.execute(_CLAIM_WITH_HISTORY, {
        "conversation_id": conversation_id, "owner": user_id, "now": now, "new_token": token, "until": until,
        "max_messages": max(max_messages, 0), "max_chars": max_chars}).all()
    if not rows:
        return None
    message_count, current = rows[0][0], rows[0][1]
    if not current:  # the claim waited for a turn that stored meanwhile: read what it stored too
        return message_count, recent_history(connection, conversation_id, max_messages, max_chars)
    return message_count, [(role, content) for _, _, role, content in rows if role is not None]


def store_turn(connection: Connection, values: dict, question: dict, answer: dict, day_usage: dict, *, new_conversation: bool,
               with_key: bool) -> bool:
    """The turn stored in one statement (_store_turn_statement): `values` names the conversation
    (conversation_id, owner, new_message_count, now; a new one's title and asked_at; a continued
    one's claim token) and the key (key_name, key_token, response_body); `question` and `answer`
    are message rows. False when nothing was stored: the claim on the conversation or the key was
    no longer this turn's, or the (conversation_id, seq) index refused the messages."""
    parameters = {**values, **day_usage, **{f"question_{name}": question[name] for name in _MESSAGE_ROW},
                  **{f"answer_{name}": answer[name] for name in _MESSAGE_ROW}}
    try:
        connection.execute(_STORE_TURN[new_conversation, with_key], parameters).all()
    except IntegrityError:
        return False
    return True


def conversation_claimed_by(session: Session, conversation_id: uuid.UUID, token: uuid.UUID) -> bool:
    """Whether the turn of `token` still holds the conversation."""
    return claim_token(session, conversation_id) == token


def key_claimed_by(session: Session, user_id: str, key: str, token: uuid.UUID) -> bool:
    """Whether the turn of `token` still holds the user's idempotency key."""
    return session.scalar(select(keys.c.claim_token).where(keys.c.user_id == user_id, keys.c.key == key)) == token


def _budget_standing_statement():
    """The tokens the user used from one day to another, whether they have a limit of their own,
    and that limit: one round trip, through the two tables' primary keys."""
    owner = _param("owner", daily_usage.c.user_id)
    used = (select(func.coalesce(func.sum(daily_usage.c.prompt_tokens + daily_usage.c.completion_tokens), 0))
            .where(daily_usage.c.user_id == owner, daily_usage.c.day >= _param("first_day", daily_usage.c.day),
                   daily_usage.c.day <= _param("last_day", daily_usage.c.day)))
    own = token_budgets.c.user_id == owner
    return select(used.scalar_subquery(), exists().where(own), select(token_budgets.c.token_limit).where(own).scalar_subquery())


_BUDGET_STANDING = _budget_standing_statement()


def budget_standing(session: Session, user_id: str, first_day: date, last_day: date) -> tuple[int, bool, int | None]:
    """(tokens used from `first_day` to `last_day`, whether the user has a limit of their own, that
    limit: None is unlimited). On PostgreSQL in autocommit: one round trip instead of three."""
    parameters = {"owner": user_id, "first_day": first_day, "last_day": last_day}
    if is_postgresql(session):
        with statements_alone(session) as connection:
            used, has_own_limit, own_limit = connection.execute(_BUDGET_STANDING, parameters).one()
    else:
        used, has_own_limit, own_limit = session.execute(_BUDGET_STANDING, parameters).one()
    return int(used), bool(has_own_limit), own_limit


class UsageDay(NamedTuple):
    """A user's counters for one UTC day."""

    date: date
    turns: int
    prompt_tokens: int
    completion_tokens: int
    estimated_turns: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_days(session: Session, user_id: str, first_day: date, last_day: date) -> list[UsageDay]:
    """The user's counters from `first_day` to `last_day`, oldest first: the days with turns only."""
    rows = session.execute(
        select(daily_usage.c.day, daily_usage.c.turns, daily_usage.c.prompt_tokens, daily_usage.c.completion_tokens,
               daily_usage.c.estimated_turns)
        .where(daily_usage.c.user_id == user_id, daily_usage.c.day >= first_day, daily_usage.c.day <= last_day)
        .order_by(daily_usage.c.day)
    ).all()
    return [UsageDay(*row) for row in rows]


def set_token_budget(session: Session, user_id: str, token_limit: int | None) -> None:
    """Give the user a limit of their own (None: unlimited), replacing any they had."""
    session.execute(delete(token_budgets).where(token_budgets.c.user_id == user_id))
    session.execute(insert(token_budgets).values(user_id=user_id, token_limit=token_limit, updated_at=utcnow()))


def delete_token_budget(session: Session, user_id: str) -> bool:
    """Take the user back to TOKEN_BUDGET's limit; False when they had none of their own."""
    return session.execute(delete(token_budgets).where(token_budgets.c.user_id == user_id)).rowcount == 1


# A user's data as a whole (chatapp/user_data.py): the erasure, and the retention purge.


def _unclaimed(now: datetime):
    """No turn holds the conversation: it was never claimed, or its claim has lapsed."""
    return or_(conversations.c.claimed_until.is_(None), conversations.c.claimed_until < now)


def _settled(now: datetime):
    """No turn holds the idempotency key: it has its answer, or its claim has lapsed."""
    return or_(keys.c.response_body.is_not(None), keys.c.locked_until.is_(None), keys.c.locked_until < now)


def turn_in_flight(session: Session, user_id: str, now: datetime) -> bool:
    """Whether a turn holds one of the user's conversations or idempotency keys: two range scans,
    of the (user_id, updated_at, id) index and of the keys' primary key."""
    claimed = exists().where(conversations.c.user_id == user_id, not_(_unclaimed(now)))
    in_progress = exists().where(keys.c.user_id == user_id, not_(_settled(now)))
    return session.scalar(select(or_(claimed, in_progress)))


def delete_user_conversations(session: Session, user_id: str, now: datetime) -> int:
    """Delete the user's conversations that no turn holds, their messages (feedback and all) and
    idempotency keys with them (ON DELETE CASCADE); how many went. Every one of them: the erasure
    is one transaction, so that it happens whole or not at all."""
    return session.execute(delete(conversations).where(conversations.c.user_id == user_id, _unclaimed(now))).rowcount


def delete_user_keys(session: Session, user_id: str, now: datetime) -> int:
    """Delete the user's idempotency keys that no turn holds; how many went."""
    return session.execute(delete(keys).where(keys.c.user_id == user_id, _settled(now))).rowcount


def user_has_conversations_or_keys(session: Session, user_id: str) -> bool:
    """Whether any conversation or idempotency key of the user is there."""
    return session.scalar(select(or_(exists().where(conversations.c.user_id == user_id),
                                     exists().where(keys.c.user_id == user_id))))


def delete_user_usage(session: Session, user_id: str) -> int:
    """Delete the user's daily usage counters; how many days went."""
    return session.execute(delete(daily_usage).where(daily_usage.c.user_id == user_id)).rowcount


def claim_stale_conversations(session: Session, updated_before: datetime, token: uuid.UUID, now: datetime, until: datetime,
                              limit: int) -> list[uuid.UUID]:
    """Hold up to `limit` conversations not updated since `updated_before` that no turn holds, with
    the claim columns a turn uses (so that no turn starts on them): their ids. The conditions are
    checked again on each row claimed: a turn may have claimed it since it was found."""
    stale = and_(conversations.c.updated_at < updated_before, _unclaimed(now))
    batch = select(conversations.c.id).where(stale).limit(limit)
    return list(session.scalars(
        update(conversations).where(conversations.c.id.in_(batch), stale)
        .values(claim_token=token, claimed_until=until)
        .returning(conversations.c.id)
    ))


def _still_held(conversation_ids: list[uuid.UUID], token: uuid.UUID):
    """Those of the conversations that `token` still holds (a claim that lapsed may be a turn's now)."""
    return select(conversations.c.id).where(conversations.c.id.in_(conversation_ids), conversations.c.claim_token == token)


def delete_held_messages(session: Session, conversation_ids: list[uuid.UUID], token: uuid.UUID, limit: int) -> int:
    """Delete up to `limit` messages of the conversations that `token` holds; how many went."""
    batch = select(messages.c.id).where(messages.c.conversation_id.in_(_still_held(conversation_ids, token))).limit(limit)
    return session.execute(delete(messages).where(messages.c.id.in_(batch))).rowcount


def delete_held_keys(session: Session, conversation_ids: list[uuid.UUID], token: uuid.UUID, limit: int) -> int:
    """Delete up to `limit` idempotency keys of the conversations that `token` holds; how many went."""
    batch = select(keys.c.user_id, keys.c.key).where(keys.c.conversation_id.in_(_still_held(conversation_ids, token))).limit(limit)
    return session.execute(delete(keys).where(tuple_(keys.c.user_id, keys.c.key).in_(batch))).rowcount


def delete_held_conversations(session: Session, conversation_ids: list[uuid.UUID], token: uuid.UUID) -> int:
    """Delete the conversations that `token` holds (their messages and keys gone before); how many went."""
    return session.execute(
        delete(conversations).where(conversations.c.id.in_(conversation_ids), conversations.c.claim_token == token)
    ).rowcount
