"""A chat turn behind its idempotency key: claim the conversation (step 3), call the agent and store
the turn in one transaction (step 4). ChatService is built once per app with its settings; it
imports no Flask, so that tests drive it directly with a session factory and an agent of theirs."""
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, scoped_session

from chatapp import idempotency, metrics, queries
from chatapp.agent import AgentReply, AgentRunner, FailureKind, ReplyStream
from chatapp.claims import TurnClaims, TurnLeases, claim_conversation, release
from chatapp.context import ContextPolicy
from chatapp.errors import AgentUnavailable, ConversationBusy
from chatapp.models import utcnow
from chatapp.schemas import ChatRequest
from chatapp.values import conversation_title

log = logging.getLogger(__name__)


def _no_note(**_fields) -> None:
    """Where log fields go when nobody wants them."""


@dataclass(frozen=True)
class Answer:
    """The assistant's stored answer to a turn, as ChatResponseSchema dumps it."""

    conversation_id: str
    message_id: str
    message: str
    role: str
    created_at: datetime
    usage: dict | None
    model: str


@dataclass(frozen=True)
class TurnResponse:
    """The ChatResponse body a turn answers with (stored with its key, so a retry gets the same
    bytes), and whether it is the replay of an earlier run of the key."""

    body: str
    replayed: bool
    conversation_id: str | None = None

    @property
    def message(self) -> str:
        """The assistant's message (a replayed stream sends it as one delta)."""
        return json.loads(self.body)["message"]


@dataclass(frozen=True)
class Turn:
    """A turn between its claims and its commit."""

    user_id: str
    request: ChatRequest
    claims: TurnClaims
    asked_at: datetime = field(default_factory=utcnow)


class AgentTiming:
    """One turn's agent call, timed from its start: its outcome goes to the metrics and, with its
    milliseconds and attempts, to the request's log line, once."""

    def __init__(self, note: Callable[..., None]):
        self._note = note
        self._started = time.perf_counter()
        self._ended = False

    def ended(self, kind: str | None, attempts: int | None, agent: str | None) -> None:
        """The call answered (kind None), or failed as `kind` (a FailureKind, http_<status> for a
        status); `agent` is the one that answered, or was tried last."""
        if self._ended:
            return
        self._ended = True
        seconds = time.perf_counter() - self._started
        metrics.observe_agent_call(seconds, kind, agent or "primary")
        self._note(agent_ms=round(seconds * 1000, 1), agent_attempts=attempts, agent=agent or "primary")

    def failed(self, error: BaseException) -> None:
        if isinstance(error, AgentUnavailable):
            self.ended(error.kind, error.attempts, error.agent)


class ChatService:
    """Steps 3 and 4 of every chat turn, with the app's settings."""

    def __init__(self, *, sessions: scoped_session, agent: AgentRunner, policy: ContextPolicy, leases: TurnLeases,
                 render: Callable[[Answer], str], idempotency_ttl: int):
        self.sessions = sessions  # the request's session (db.session) in the app
        self.agent = agent
        self.policy = policy
        self.leases = leases
        self.render = render
        self.idempotency_ttl = idempotency_ttl

    def send(self, user_id: str, request: ChatRequest, *, request_id: str | None = None,
             note: Callable[..., None] = _no_note) -> "TurnResponse | TurnStream":
        """The turn of `request`: its idempotency key (a replay answers at once), its conversation,
        the agent, the turn stored. A streamed turn comes back as a TurnStream once the agent's
        first piece has arrived; it stores the turn when it ends. `note` takes the log line's fields."""
        if self.leases.owes():  # a failed turn's claims, not released yet: their conversation may be this one
            self.leases.pay_owed()
        session = self.sessions()
        claims = TurnClaims()
        if request.idempotency_key:
            fingerprint = idempotency.request_fingerprint(request.message, request.conversation_id, request.model)
            outcome = idempotency.claim_key(session, user_id, request.idempotency_key, fingerprint,
                                            hold_seconds=self.leases.lease_seconds, ttl_seconds=self.idempotency_ttl)
            if isinstance(outcome, idempotency.Replay):
                return TurnResponse(outcome.body, replayed=True)
            claims.key = outcome
            self.leases.hold(claims)
        try:
            if request.conversation_id is not None:
                claims.conversation = claim_conversation(session, user_id, request.conversation_id, self.leases.lease_seconds)
                self.leases.hold(claims)
            turn = Turn(user_id, request, claims)
            context = self._context(session, turn)
            if request.stream:
                return TurnStream.start(self, turn, context, request_id, note)
            timing = AgentTiming(note)
            try:
                reply = self.agent.run(context, request.model, request_id=request_id)
            except BaseException as error:
                timing.failed(error)
                raise
            timing.ended(None, reply.attempts, reply.agent)
            return self.store(turn, reply)
        except BaseException:
            self.release(claims)
            raise

    def _context(self, session: Session, turn: Turn) -> list[dict]:
        """Step 4's input: the kept history and the new message. Commits the claim and ends the
        transaction, so that a slow agent holds no pooled connection."""
        history = []
        if turn.claims.conversation is not None:
            history = queries.recent_history(session, turn.claims.conversation.id, self.policy.max_messages,
                                             self.policy.max_chars)
        session.commit()
        return self.policy.messages(history, turn.request.message)

    def store(self, turn: Turn, reply: AgentReply) -> TurnResponse:
        """Store the conversation (if new), both messages and the idempotency record in one short
        transaction, and give the conversation back."""
        session = self.sessions()
        conversation, answered_at = turn.claims.conversation, utcnow()
        if conversation is None:
            conversation_id, first_seq = uuid.uuid4(), 1
            queries.insert_conversation(session, {
                "id": conversation_id, "user_id": turn.user_id, "title": conversation_title(turn.request.message),
                "message_count": 2, "created_at": turn.asked_at, "updated_at": answered_at,
            })
        else:
            conversation_id, first_seq = conversation.id, conversation.message_count + 1
            if not queries.finish_conversation_turn(session, conversation_id, conversation.token, first_seq + 1, answered_at):
                raise ConversationBusy()  # our lease lapsed and another turn took the conversation
        message_id, model = uuid.uuid4(), reply.model or turn.request.model
        body = self.render(Answer(conversation_id=str(conversation_id), message_id=str(message_id),
                                  message=reply.content, role="assistant", created_at=answered_at,
                                  usage=reply.usage, model=model))
        try:
            queries.insert_messages(session, [
                {"id": uuid.uuid4(), "conversation_id": conversation_id, "seq": first_seq, "role": "user",
                 "content": turn.request.message, "created_at": turn.asked_at, "model": None},
                {"id": message_id, "conversation_id": conversation_id, "seq": first_seq + 1, "role": "assistant",
                 "content": reply.content, "created_at": answered_at, "model": model},
            ])
        except IntegrityError:
            # The unique (conversation_id, seq) index: the last guard against interleaved turns.
            raise ConversationBusy() from None
        if turn.claims.key is not None:
            idempotency.complete_key(session, turn.claims.key, body, conversation_id)
        session.commit()
        self.leases.let_go(turn.claims)
        return TurnResponse(body, replayed=False, conversation_id=str(conversation_id))

    def release(self, claims: TurnClaims) -> None:
        """After a failed turn: nothing of it stays stored, the conversation and the key are free
        again (or, when the database is the failure, as soon as it answers again)."""
        session = self.sessions()
        session.rollback()
        if claims.conversation is None and claims.key is None:
            return
        try:
            release(session, claims)
            session.commit()
            self.leases.let_go(claims)
        except Exception:
            session.rollback()
            log.warning("could not release the claims of a failed turn: released when the database answers", exc_info=True)
            self.leases.owe(claims)


class TurnStream:
    """A turn whose answer is still arriving from the agent. Iterate for its pieces; then finish()
    stores it, or abort() (a failure, a client gone) stores nothing and frees its claims."""

    def __init__(self, service: ChatService, turn: Turn, agent_stream: ReplyStream, first_piece: str, timing: AgentTiming):
        self._service = service
        self.turn = turn
        self._agent_stream = agent_stream
        self._first_piece = first_piece
        self._timing = timing
        self._pieces: list[str] = []
        self._ended = False

    @classmethod
    def start(cls, service: ChatService, turn: Turn, context: list[dict], request_id: str | None,
              note: Callable[..., None]) -> "TurnStream":
        """Open the agent's stream and wait for its first piece: a failure until then is an
        ordinary error response (AgentUnavailable), not a broken stream."""
        timing = AgentTiming(note)
        agent_stream = None
        try:
            agent_stream = service.agent.stream(context, turn.request.model, request_id=request_id)
            first_piece = next(iter(agent_stream), "")
        except BaseException as error:
            if agent_stream is not None:
                agent_stream.close()
            timing.failed(error)
            raise
        return cls(service, turn, agent_stream, first_piece, timing)

    def __iter__(self):
        """The assistant message, piece by piece as the agent writes it."""
        if self._first_piece:
            self._pieces.append(self._first_piece)
            yield self._first_piece
        for piece in self._agent_stream:
            self._pieces.append(piece)
            yield piece

    def finish(self) -> TurnResponse:
        """Store the complete turn, once the agent's stream has ended."""
        self._ended = True
        stream = self._agent_stream
        agent = getattr(stream, "agent", "primary")
        self._timing.ended(None, stream.attempts, agent)
        reply = AgentReply("".join(self._pieces), stream.usage, stream.attempts, getattr(stream, "model", None), agent)
        try:
            return self._service.store(self.turn, reply)
        except BaseException:
            self._service.release(self.turn.claims)
            raise

    def abort(self, error: Exception | None = None) -> None:
        """End the agent call and store nothing; the conversation and the key are free again."""
        if self._ended:
            return
        self._ended = True
        self._agent_stream.close()
        if isinstance(error, AgentUnavailable):
            self._timing.failed(error)
        else:
            self._timing.ended(FailureKind.ABORTED, self._agent_stream.attempts, getattr(self._agent_stream, "agent", None))
        self._service.release(self.turn.claims)
