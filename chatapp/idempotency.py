"""Idempotency keys (contract section 4): one run per key and user, its response replayed after."""
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from chatapp import queries
from chatapp.errors import IdempotencyInProgress, IdempotencyKeyReused
from chatapp.models import utcnow


@dataclass(frozen=True)
class KeyClaim:
    """This request holds the key until it completes or releases it."""

    user_id: str
    key: str
    token: uuid.UUID


@dataclass(frozen=True)
class Replay:
    """The key already ran: its stored response body."""

    body: str

    @property
    def message(self) -> str:
        """The assistant's message of the stored ChatResponse (a replayed stream's one delta)."""
        return json.loads(self.body)["message"]


def request_fingerprint(message: str, conversation_id: str | None, model: str, *, regenerate: bool = False) -> str:
    """What makes two requests under one key the same request (`stream` does not): a turn's
    message, conversation and model; a regeneration's conversation and model."""
    identity = ["regenerate", conversation_id, model] if regenerate else [message, conversation_id, model]
    canonical = json.dumps(identity, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim_key(session: Session, user_id: str, key: str, fingerprint: str, *, hold_seconds: float,
              ttl_seconds: int) -> KeyClaim | Replay:
    """Hold the key for this request, or say why not: a Replay of the finished run, 409 while
    another run holds it, 422 when it was used for a different request. A key older than the
    TTL, or held past `hold_seconds` by a worker that died, is removed and claimed anew."""
    for _ in range(3):  # a concurrent takeover can make one attempt lose; three always settle it
        now = utcnow()
        token = uuid.uuid4()
        if queries.insert_idempotency_key(session, user_id, key, fingerprint, token, now, now + timedelta(seconds=hold_seconds)):
            return KeyClaim(user_id, key, token)
        stored = queries.find_idempotency_key(session, user_id, key)
        if stored is None:
            continue  # removed since our insert failed: try again
        expired = stored.created_at <= now - timedelta(seconds=ttl_seconds)
        abandoned = stored.response_body is None and stored.locked_until is not None and stored.locked_until <= now
        if expired or abandoned:
            queries.delete_idempotency_key(session, user_id, key, stored.created_at)
            continue
        if stored.fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        if stored.response_body is None:
            raise IdempotencyInProgress()
        return Replay(stored.response_body)
    raise IdempotencyInProgress()


def complete_key(session: Session, claim: KeyClaim, response_body: str, conversation_id: uuid.UUID) -> None:
    """Store the response in the turn's transaction; 409 when a takeover took the key meanwhile."""
    if not queries.complete_idempotency_key(session, claim.user_id, claim.key, claim.token, response_body, conversation_id):
        raise IdempotencyInProgress()


def release_key(session: Session, claim: KeyClaim) -> None:
    """Forget the key of a request that failed, so that a retry runs anew (the caller commits)."""
    queries.release_idempotency_key(session, claim.user_id, claim.key, claim.token)
