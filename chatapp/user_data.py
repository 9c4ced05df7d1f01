"""A user's data as a whole: its export (GET /api/<user_id>/export), written out piece by piece;
its erasure (DELETE /api/<user_id>/conversations); and what outlives its time, purged by
`flask purge` (RETENTION_DAYS, IDEMPOTENCY_TTL). Imports no Flask: the routes and the command line
share it."""
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from chatapp import queries
from chatapp.claims import RENEWALS_PER_LEASE
from chatapp.errors import ConversationBusy
from chatapp.models import utcnow
from chatapp.schemas import ConversationSchema, MessageSchema, UserExportSchema

# The export reads this many conversations, and this many messages of one conversation, a query:
# all it holds at once, whatever the size of the history.
EXPORT_CONVERSATIONS_A_PAGE = 100
EXPORT_MESSAGES_A_PAGE = 200
# The purge deletes at most this many rows a transaction, so that its locks are short and its
# transactions small, however much there is to delete.
ROWS_A_TRANSACTION = 1000
ERASE_BUSY = "A turn of one of your conversations is in progress: nothing was erased, try again when it has ended"

# Schema instances are stateless between calls: built once, shared by every thread.
_HEAD = UserExportSchema(only=("user_id", "exported_at"))
_CONVERSATION, _MESSAGE = ConversationSchema(), MessageSchema()


def _json(value) -> str:
    """Compact JSON, as Flask's jsonify writes every other body (ASCII, no spaces)."""
    return json.dumps(value, separators=(",", ":"))


def _open(value: dict, member: str) -> str:
    """The JSON object `value` left open, with `member` started as an array: `{..., "member":[`."""
    return f'{_json(value)[:-1]},{_json(member)}:['


def export_document(session: Session, user_id: str) -> Iterator[str]:
    """Everything of the user as one JSON document, `{"user_id", "exported_at", "conversations"}`, in
    pieces of text: the conversations most recently active first, as the history shows them, each
    with its `messages`, oldest first. One page is held at a time, and each page's transaction ends
    before its pieces are sent, so that no pooled connection waits on a slow client. The first page
    is read now: a database that is down is a 503, not a document cut short."""
    exported_at = utcnow()
    first_page = _conversations_after(session, user_id, None)
    return _document(session, user_id, exported_at, first_page)


def _conversations_after(session: Session, user_id: str, position: tuple[datetime, uuid.UUID] | None):
    page = queries.list_conversations(session, user_id, EXPORT_CONVERSATIONS_A_PAGE, position)
    session.rollback()  # only read: end the transaction, and the connection goes back to the pool
    return page


def _document(session: Session, user_id: str, exported_at: datetime, page: list) -> Iterator[str]:
    yield _open(_HEAD.dump({"user_id": user_id, "exported_at": exported_at}), "conversations")
    separator = ""
    while page:
        for conversation in page:
            yield from _conversation(session, conversation, separator)
            separator = ","
        if len(page) < EXPORT_CONVERSATIONS_A_PAGE:
            break
        page = _conversations_after(session, user_id, (page[-1].updated_at, page[-1].id))
    yield "]}"


def _conversation(session: Session, conversation: queries.ConversationSummary, separator: str) -> Iterator[str]:
    """One conversation and its messages up to its message_count as read: a turn stored since is
    left out, so that the two agree."""
    yield separator + _open(_CONVERSATION.dump(conversation), "messages")
    last_seq, separator = 0, ""
    while last_seq < conversation.message_count:
        page = queries.messages_after(session, conversation.id, last_seq, conversation.message_count, EXPORT_MESSAGES_A_PAGE)
        session.rollback()
        if not page:
            break  # deleted meanwhile
        yield separator + ",".join(_json(_MESSAGE.dump(message)) for message in page)
        last_seq, separator = page[-1].seq, ","
    yield "]}"


def erase_user_data(session: Session, user_id: str) -> None:
    """Delete everything of the user, in one transaction: their conversations with their messages
    (feedback and all), their idempotency keys, their daily usage counters and their own token
    budget. 409 while a turn of theirs is in flight (it holds a conversation, or a new
    conversation's turn its key), and nothing is deleted."""
    now = utcnow()
    if queries.turn_in_flight(session, user_id, now):
        session.rollback()
        raise ConversationBusy(ERASE_BUSY)  # at once, rather than after deleting a history only to roll it back
    queries.delete_user_conversations(session, user_id, now)
    queries.delete_user_keys(session, user_id, now)
    # Anything of the user still here was held by a turn when the deletes ran (on PostgreSQL a claim
    # and the delete of its row wait for each other), or was stored since by one: a turn was in
    # flight after all. Looking for any row, not a held one, also catches a turn that let its
    # conversation go between the deletes and this look.
    if queries.user_has_conversations_or_keys(session, user_id):
        session.rollback()
        raise ConversationBusy(ERASE_BUSY)
    queries.delete_user_usage(session, user_id)
    queries.delete_token_budget(session, user_id)
    session.commit()


def _in_batches(session: Session, delete_batch: Callable[[int], int], before_each: Callable[[], None] = lambda: None) -> int:
    """Run `delete_batch(ROWS_A_TRANSACTION)`, a transaction each, until a batch comes short; how
    many rows went."""
    deleted = 0
    while True:
        before_each()
        batch = delete_batch(ROWS_A_TRANSACTION)
        session.commit()
        deleted += batch
        if batch < ROWS_A_TRANSACTION:
            return deleted


def purge_expired_keys(session: Session, ttl_seconds: int) -> int:
    """Delete the idempotency keys older than the TTL (expired keys are ignored anyway: this keeps
    the table small), a short transaction at a time; how many went."""
    created_before = utcnow() - timedelta(seconds=ttl_seconds)
    return _in_batches(session, lambda limit: queries.delete_expired_keys(session, created_before, limit))


@dataclass
class Purged:
    """What purge_stale_conversations deleted."""

    conversations: int = 0
    messages: int = 0
    keys: int = 0


class _PurgeClaims:
    """The purge's claim on a batch of conversations: a lease, as a turn's claim is, renewed when a
    quarter of it has passed, so that it lasts while their messages go."""

    def __init__(self, session: Session, conversation_ids: list[uuid.UUID], token: uuid.UUID, lease_seconds: float):
        self.session, self.conversation_ids, self.token, self.lease_seconds = session, conversation_ids, token, lease_seconds
        self.renewed_at = time.monotonic()

    def renew_when_due(self) -> None:
        if time.monotonic() - self.renewed_at < self.lease_seconds / RENEWALS_PER_LEASE:
            return
        held = [(conversation_id, self.token) for conversation_id in self.conversation_ids]
        queries.renew_claims(self.session, held, [], utcnow() + timedelta(seconds=self.lease_seconds))
        self.session.commit()
        self.renewed_at = time.monotonic()


def purge_stale_conversations(session: Session, retention_days: int, lease_seconds: float) -> Purged:
    """Delete the conversations not updated for `retention_days` days, with their messages and
    idempotency keys, ROWS_A_TRANSACTION rows a transaction at most. Each batch of conversations
    is claimed first, with the columns and the lease a turn's claim has: a turn in flight keeps its
    conversation, and no turn starts on one whose messages are going. The keys and messages go
    before their conversation's row, so that no cascade deletes more than a batch."""
    updated_before = utcnow() - timedelta(days=retention_days)
    token = uuid.uuid4()
    purged = Purged()
    while True:
        now = utcnow()
        conversation_ids = queries.claim_stale_conversations(session, updated_before, token, now,
                                                             now + timedelta(seconds=lease_seconds), ROWS_A_TRANSACTION)
        session.commit()
        if not conversation_ids:
            return purged
        claims = _PurgeClaims(session, conversation_ids, token, lease_seconds)
        purged.keys += _in_batches(
            session, lambda limit: queries.delete_held_keys(session, conversation_ids, token, limit), claims.renew_when_due)
        purged.messages += _in_batches(
            session, lambda limit: queries.delete_held_messages(session, conversation_ids, token, limit), claims.renew_when_due)
        purged.conversations += queries.delete_held_conversations(session, conversation_ids, token)
        session.commit()
        if len(conversation_ids) < ROWS_A_TRANSACTION:
            return purged
