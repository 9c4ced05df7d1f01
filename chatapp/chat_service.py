"""Steps 3 and 4 of a chat turn, behind the idempotency key: resolve and claim the conversation,
call the agent, store the turn atomically."""
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy.exc import IntegrityError

from chatapp import idempotency, metrics, queries
from chatapp.agent_client import AgentReply, AgentRunner
from chatapp.claims import ClaimedConversation, TurnClaims, release
from chatapp.errors import AgentUnavailable, ConversationBusy, ConversationNotFound
from chatapp.extensions import db
from chatapp.models import TITLE_LENGTH, utcnow

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TurnResult:
    """The response body of a turn, whether it replays an earlier run, and what the log needs."""

    body: str
    replayed: bool
    conversation_id: str | None = None
    agent_ms: float | None = None
    agent_attempts: int | None = None


def parse_conversation_id(value: str) -> uuid.UUID:
    """The UUID a client sent; anything malformed is just a conversation that does not exist."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ConversationNotFound() from None
    if str(parsed) != value.lower():  # refuse the braced, URN and bare-hex spellings
        raise ConversationNotFound()
    return parsed


def claim_conversation(user_id: str, conversation_id: str | None, hold_seconds: float) -> ClaimedConversation | None:
    """Step 3: hold the user's conversation for this turn, a lease of `hold_seconds` (None: a new
    one); 404, or 409 while another turn holds it."""
    if conversation_id is None:
        return None
    parsed_id = parse_conversation_id(conversation_id)
    now, token = utcnow(), uuid.uuid4()
    message_count = queries.claim_conversation(user_id, parsed_id, token, now, now + timedelta(seconds=hold_seconds))
    if message_count is None:
        raise ConversationBusy() if queries.conversation_exists(user_id, parsed_id) else ConversationNotFound()
    return ClaimedConversation(parsed_id, message_count, token)


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


@dataclass(frozen=True)
class PendingTurn:
    """A turn between its claims and its commit: what storing (or abandoning) it needs."""

    user_id: str
    chat_request: dict
    claims: TurnClaims
    asked_at: datetime
    render: Callable[[ChatTurn], str]

    @property
    def conversation(self) -> ClaimedConversation | None:
        return self.claims.conversation

    @property
    def key_claim(self) -> idempotency.KeyClaim | None:
        return self.claims.key


def send_message(
    user_id: str,
    chat_request: dict,
    agent: AgentRunner,
    render: Callable[[ChatTurn], str],
    request_id: str | None = None,
) -> "TurnResult | TurnStream":
    """The idempotency key, then steps 3 and 4. `render` turns the turn into the response body,
    which is stored with the key so that a retry gets the same bytes. A streamed turn comes back
    as a TurnStream once the agent's first piece has arrived; it stores the turn when it ends."""
    stream = chat_request["stream"]
    leases = current_app.extensions["turn_leases"]
    if leases.owes():  # a failed turn's claims, not released yet: their conversation may be this one
        leases.pay_owed()
    claims = TurnClaims()
    if chat_request["idempotency_key"]:
        fingerprint = idempotency.request_fingerprint(
            chat_request["message"], chat_request["conversation_id"], chat_request["model"]
        )
        outcome = idempotency.claim_key(
            user_id,
            chat_request["idempotency_key"],
            fingerprint,
            hold_seconds=leases.lease_seconds,
            ttl_seconds=current_app.config["IDEMPOTENCY_TTL"],
        )
        if isinstance(outcome, idempotency.Replay):
            return TurnResult(outcome.body, replayed=True)
        claims.key = outcome
        leases.hold(claims)

    try:
        claims.conversation = claim_conversation(user_id, chat_request["conversation_id"], leases.lease_seconds)
        if claims.conversation is not None:
            leases.hold(claims)
        turn = PendingTurn(user_id, chat_request, claims, utcnow(), render)
        context = read_context(turn)
        if stream:
            return TurnStream.start(turn, agent, context, request_id)
        reply, agent_ms = call_agent(agent, context, chat_request["model"], request_id)
        return store_turn(turn, reply, agent_ms)
    except BaseException:
        release_claims(claims)
        raise


def read_context(turn: PendingTurn) -> list[dict]:
    """Step 4's input: the kept history and the new message. Commits the claim and ends the
    transaction, so that a slow agent holds no pooled connection."""
    config = current_app.config
    history = []
    if turn.conversation is not None:
        history = queries.recent_history(turn.conversation.id, config["CONTEXT_MAX_MESSAGES"], config["CONTEXT_MAX_CHARS"])
    db.session.commit()
    return build_context(history, turn.chat_request["message"])


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def call_agent(agent: AgentRunner, context: list[dict], model: str, request_id: str | None) -> tuple[AgentReply, float]:
    """The agent's reply and the milliseconds it took; its duration and outcome go to metrics."""
    started = time.perf_counter()
    try:
        reply = agent.run(context, model, request_id=request_id)
    except AgentUnavailable as error:
        error.agent_ms = elapsed_ms(started)
        metrics.observe_agent_call(time.perf_counter() - started, error.kind)
        raise
    metrics.observe_agent_call(time.perf_counter() - started, None)
    return reply, elapsed_ms(started)


def store_turn(turn: PendingTurn, reply: AgentReply, agent_ms: float) -> TurnResult:
    """Store the conversation (if new), both messages and the idempotency record in one short
    transaction, and release the conversation."""
    user_message, conversation = turn.chat_request["message"], turn.conversation
    answered_at = utcnow()
    if conversation is None:
        conversation_id, first_seq = uuid.uuid4(), 1
        queries.insert_conversation(
            {
                "id": conversation_id,
                "user_id": turn.user_id,
                "title": conversation_title(user_message),
                "message_count": 2,
                "created_at": turn.asked_at,
                "updated_at": answered_at,
            }
        )
    else:
        conversation_id, first_seq = conversation.id, conversation.message_count + 1
        if not queries.finish_conversation_turn(conversation_id, conversation.token, first_seq + 1, answered_at):
            raise ConversationBusy()  # our claim expired and another turn took the conversation
    message_id = uuid.uuid4()
    user_row = {"id": uuid.uuid4(), "conversation_id": conversation_id, "seq": first_seq, "role": "user",
                "content": user_message, "created_at": turn.asked_at}
    assistant_row = {"id": message_id, "conversation_id": conversation_id, "seq": first_seq + 1, "role": "assistant",
                     "content": reply.content, "created_at": answered_at}
    body = turn.render(
        ChatTurn(
            conversation_id=str(conversation_id),
            message_id=str(message_id),
            message=reply.content,
            role="assistant",
            created_at=answered_at,
            usage=reply.usage,
            model=turn.chat_request["model"],
        )
    )
    try:
        queries.insert_messages([user_row, assistant_row])
    except IntegrityError:
        # The unique (conversation_id, seq) index: the last guard against interleaved turns.
        raise ConversationBusy() from None
    if turn.key_claim is not None:
        idempotency.complete_key(turn.key_claim, body, conversation_id)
    db.session.commit()
    current_app.extensions["turn_leases"].let_go(turn.claims)
    return TurnResult(body, False, str(conversation_id), agent_ms, reply.attempts)


class TurnStream:
    """A turn whose answer is still arriving from the agent. Iterate for its pieces; then
    finish() stores it, or abort() (a failure, a client gone) stores nothing and frees its claims."""

    def __init__(self, turn: PendingTurn, agent_stream, first_piece: str, started: float):
        self.turn = turn
        self._agent_stream = agent_stream
        self._first_piece = first_piece
        self._started = started
        self._pieces: list[str] = []
        self._ended = False

    @classmethod
    def start(cls, turn: PendingTurn, agent: AgentRunner, context: list[dict], request_id: str | None) -> "TurnStream":
        """Open the agent's stream and wait for its first piece: a failure until then is an
        ordinary error response (AgentUnavailable), not a broken stream."""
        started = time.perf_counter()
        agent_stream = None
        try:
            agent_stream = agent.stream(context, turn.chat_request["model"], request_id=request_id)
            first_piece = next(iter(agent_stream), "")
        except BaseException as error:
            if agent_stream is not None:
                agent_stream.close()
            if isinstance(error, AgentUnavailable):
                error.agent_ms = elapsed_ms(started)
                metrics.observe_agent_call(time.perf_counter() - started, error.kind)
            raise
        return cls(turn, agent_stream, first_piece, started)

    def __iter__(self):
        """The assistant message, piece by piece as the agent writes it."""
        if self._first_piece:
            self._pieces.append(self._first_piece)
            yield self._first_piece
        for piece in self._agent_stream:
            self._pieces.append(piece)
            yield piece

    def finish(self) -> TurnResult:
        """Store the complete turn, once the agent's stream has ended."""
        self._ended = True
        metrics.observe_agent_call(time.perf_counter() - self._started, None)
        reply = AgentReply("".join(self._pieces), self._agent_stream.usage, self._agent_stream.attempts)
        try:
            return store_turn(self.turn, reply, elapsed_ms(self._started))
        except BaseException:
            release_claims(self.turn.claims)
            raise

    def abort(self, error: Exception | None = None) -> None:
        """End the agent call and store nothing; the conversation and the key are free again."""
        if self._ended:
            return
        self._ended = True
        self._agent_stream.close()
        kind = error.kind if isinstance(error, AgentUnavailable) else "aborted"
        metrics.observe_agent_call(time.perf_counter() - self._started, kind)
        release_claims(self.turn.claims)


def release_claims(claims: TurnClaims) -> None:
    """After a failed turn: nothing of it stays stored, the conversation and the key are free again
    (or, when the database is the failure, as soon as it answers again)."""
    db.session.rollback()
    if claims.conversation is None and claims.key is None:
        return
    leases = current_app.extensions["turn_leases"]
    try:
        release(claims)
        db.session.commit()
        leases.let_go(claims)
    except Exception:
        db.session.rollback()
        log.warning("could not release the claims of a failed turn: released when the database answers", exc_info=True)
        leases.owe(claims)
