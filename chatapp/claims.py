"""A turn's claims on its conversation and its idempotency key. They are leases of
TURN_LEASE_SECONDS, renewed while their turns run; the claims that a failed turn could not give
back (the database was the failure) are given back as soon as the database answers.

So a worker that dies frees its claims once their lease lapses (seconds, not the agent's deadline
plus a margin), and after a database outage the conversations and keys of the turns that failed
during it are free within a moment of the database's return, instead of waiting out their hold.

The same thread watches for stops (POST .../stop marks the conversation, in whichever process or
host it is served): while turns of this process hold conversations, one query every
STOP_POLL_SECONDS finds those asked to stop, and their agent calls are cancelled.
"""
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from chatapp import queries
from chatapp.agent.cancel import Cancellation
from chatapp.errors import ConversationBusy, ConversationNotFound
from chatapp.idempotency import KeyClaim, release_key
from chatapp.models import utcnow
from chatapp.values import parse_conversation_id

log = logging.getLogger(__name__)

# While releases are owed, the database is tried this often.
RETRY_SECONDS = 0.25
# A lease is renewed every quarter of it: three renewals may fail in a row (a blip) before another
# process may take the claim over.
RENEWALS_PER_LEASE = 4
# A stop is seen within this (and the stop's own commit): the contract gives a second.
STOP_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class ClaimedConversation:
    """An existing conversation a turn holds until it stores or fails."""

    id: uuid.UUID
    message_count: int
    token: uuid.UUID


@dataclass(eq=False)  # each turn's own: compared, and hashed, by identity
class TurnClaims:
    """What one turn holds: its idempotency key and its conversation, once claimed; and how its
    agent call is ended when a user stops the turn."""

    key: KeyClaim | None = None
    conversation: ClaimedConversation | None = None
    stop: Cancellation = field(default_factory=Cancellation)
    since: float = field(default_factory=time.monotonic)


def claim_conversation(session: Session, user_id: str, conversation_id: str, lease_seconds: float,
                       history_window: tuple[int, int] | None = None) -> tuple[ClaimedConversation, list[tuple[str, str]] | None]:
    """Hold the user's conversation for a turn, a lease of `lease_seconds`; 404 for an id that is
    not one of the user's conversations, 409 while another turn holds it. With `history_window`
    (max messages, max characters), and where the database does it in the same statement, also
    its history (queries.recent_history()'s), committed; else None, and the caller commits."""
    parsed_id = parse_conversation_id(conversation_id)
    now, token = utcnow(), uuid.uuid4()
    until = now + timedelta(seconds=lease_seconds)
    history = None
    if history_window is not None and queries.is_postgresql(session):
        with queries.statements_alone(session) as connection:
            claimed = queries.claim_conversation_with_history(connection, user_id, parsed_id, token, now, until, *history_window)
        message_count, history = claimed or (None, None)
    else:
        message_count = queries.claim_conversation(session, user_id, parsed_id, token, now, until)
    if message_count is None:
        raise ConversationBusy() if queries.conversation_exists(session, user_id, parsed_id) else ConversationNotFound()
    return ClaimedConversation(parsed_id, message_count, token), history


def release(session: Session, claims: TurnClaims) -> None:
    """Give the conversation and the key back, where they are still this turn's (the caller commits)."""
    if claims.conversation is not None:
        queries.release_conversation(session, claims.conversation.id, claims.conversation.token)
    if claims.key is not None:
        release_key(session, claims.key)


class TurnLeases:
    """This process's turn claims, renewed by one thread while there are any, and released by it
    when a turn's own release failed. The thread has sessions of its own on `engine`."""

    def __init__(self, engine: Engine, lease_seconds: float, clock=time.monotonic):
        self.engine = engine
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._live: set[TurnClaims] = set()  # renewed
        self._owed: list[TurnClaims] = []  # their release failed
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at = float("-inf")

    def hold(self, claims: TurnClaims) -> None:
        """Renew these claims (as the turn adds to them) until let_go() or owe()."""
        with self._lock:
            self._live.add(claims)
            self._start()
        if claims.conversation is not None:
            self._wake.set()  # a sleeping thread looks for stops from now on

    def let_go(self, claims: TurnClaims) -> None:
        """The turn stored or released its claims: renew them no more."""
        with self._lock:
            self._live.discard(claims)

    def owe(self, claims: TurnClaims) -> None:
        """The turn failed and could not release its claims: release them as soon as the database answers."""
        with self._lock:
            self._live.discard(claims)
            self._owed.append(claims)
            self._start()
        self._wake.set()

    def owes(self) -> bool:
        return bool(self._owed)

    def pay_owed(self) -> None:
        """Release what is owed, now (a new turn does it first: the conversation may be its own)."""
        with self._lock:
            owed, self._owed = self._owed, []
        failed = [claims for claims in owed if not self._release(claims)]
        if failed:
            with self._lock:
                self._owed[:0] = failed

    # The thread ---------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chatapp-turn-leases", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """Renew every quarter lease and retry owed releases often, until there is nothing left."""
        renew_every = self.lease_seconds / RENEWALS_PER_LEASE
        next_renewal = self._clock() + renew_every
        while True:
            with self._lock:
                if not self._live and not self._owed:
                    self._thread = None
                    return
                owing = bool(self._owed)
                holding = any(claims.conversation for claims in self._live)
            if owing:
                self.pay_owed()
            if holding:
                self._poll_stops()
            if self._clock() >= next_renewal:
                self._renew()
                next_renewal = self._clock() + renew_every
            self._wake.clear()
            wait = max(0.0, next_renewal - self._clock())
            if self.owes():
                wait = min(wait, RETRY_SECONDS)
            if holding:
                wait = min(wait, STOP_POLL_SECONDS)
            self._wake.wait(wait)

    def _poll_stops(self) -> None:
        # A turn younger than a poll is not looked for yet: most end before a stop could reach them.
        young = self._clock() - STOP_POLL_SECONDS
        with self._lock:
            held = {(claims.conversation.id, claims.conversation.token): claims
                    for claims in self._live if claims.conversation and not claims.stop.cancelled and claims.since <= young}
        if not held:
            return
        try:
            with Session(self.engine) as session:
                stopped = queries.stops_requested(session, list(held))
        except Exception as exc:  # the database is down: the next poll may see the stop
            self._warn(f"could not look for stopped turns: {type(exc).__name__}")
            return
        for pair in stopped:
            log.info("stopping the turn on conversation %s, as asked", pair[0])
            held[pair].stop.cancel()

    def _renew(self) -> None:
        with self._lock:
            live = list(self._live)
        if not live:
            return
        until = utcnow() + timedelta(seconds=self.lease_seconds)
        try:
            with Session(self.engine) as session, session.begin():
                queries.renew_claims(
                    session,
                    [(claims.conversation.id, claims.conversation.token) for claims in live if claims.conversation],
                    [(claims.key.user_id, claims.key.key, claims.key.token) for claims in live if claims.key],
                    until)
        except Exception as exc:  # the database is down: the next renewal may succeed in time
            self._warn(f"could not renew the leases of {len(live)} turns: {type(exc).__name__}")

    def _release(self, claims: TurnClaims) -> bool:
        try:
            with Session(self.engine) as session, session.begin():
                release(session, claims)
            return True
        except Exception as exc:
            self._warn(f"could not release the claims of a failed turn yet: {type(exc).__name__}")
            return False

    def _warn(self, message: str) -> None:
        now = self._clock()
        if now - self._warned_at >= self.lease_seconds:  # not every quarter of a second
            self._warned_at = now
            log.warning(message)
