"""A chat turn behind its idempotency key: claim the conversation (step 3), call the agent and store
the turn in one transaction (step 4). ChatService is built once per app with its settings; it
imports no Flask, so that tests drive it directly with a session factory and an agent of theirs."""
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, scoped_session

from chatapp import idempotency, metrics, queries, usage
from chatapp.agent import AgentReply, AgentRunner, FailureKind
from chatapp.agent.cancel import cancellable
from chatapp.claims import STOP_POLL_SECONDS, TurnClaims, TurnLeases, claim_conversation, release
from chatapp.context import ContextPolicy
from chatapp.errors import (
    AgentUnavailable,
    ApiError,
    ConversationBusy,
    ConversationNotFound,
    IdempotencyInProgress,
    MessageNotFound,
    NoTurnInProgress,
    TurnStopped,
    as_api_error,
    error_body,
)
from chatapp.models import utcnow
from chatapp.schemas import ChatRequest
from chatapp.turn_log import DELTA, DONE, ERROR, Event, LiveLog, TurnEvents
from chatapp.values import FINISHED, STOPPED, conversation_title, parse_conversation_id

# How long a stop waits for the process running the turn to end it, before freeing the
# conversation itself (that process is gone, or cannot reach the database).
STOP_WAIT_SECONDS = 1.0

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
    finish_reason: str


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
    context: list[dict] = field(default_factory=list)  # what the agent is sent

    @property
    def answer_seq(self) -> int:
        """The sequence number its answer is stored at: after the conversation's last message, or,
        when it regenerates, in place of the last one (its latest answer)."""
        if self.claims.conversation is None:
            return 2
        count = self.claims.conversation.message_count
        return count if self.request.regenerate else count + 2


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


@dataclass(frozen=True)
class StreamSettings:
    """How streamed turns behave (config.py's STREAM_ settings)."""

    on_disconnect: str = "continue"  # or "cancel"
    keepalive_seconds: float = 15.0
    first_byte_seconds: float = 0.0  # 0: a stream answers once the agent's first piece has come
    resume_poll_seconds: float = 0.1  # without Redis, how often a resumed stream looks for the end
    longest_seconds: float = 300.0  # AGENT_STREAM_TIMEOUT: no turn runs longer


def _in_a_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="chatapp-stream", daemon=True).start()


class ChatService:
    """Steps 3 and 4 of every chat turn, with the app's settings."""

    def __init__(self, *, sessions: scoped_session, agent: AgentRunner, policy: ContextPolicy, leases: TurnLeases,
                 render: Callable[[Answer], str], idempotency_ttl: int, streams: StreamSettings = StreamSettings(),
                 live_log: LiveLog | None = None, spawn: Callable[[Callable[[], None]], None] = _in_a_thread,
                 budget: usage.Budget = usage.Budget(), clock: Callable[[], datetime] = utcnow):
        self.sessions = sessions  # the request's session (db.session) in the app
        self.agent = agent
        self.policy = policy
        self.leases = leases
        self.render = render
        self.idempotency_ttl = idempotency_ttl
        self.streams = streams
        self.live_log = live_log  # with REDIS_URL: streams resumable from any process
        self.spawn = spawn  # runs a streamed turn's thread (in the app, within an app context)
        self.budget = budget  # TOKEN_BUDGET
        self.clock = clock  # now, in UTC: the day a turn is counted in, the budget's period

    def send(self, user_id: str, request: ChatRequest, *, request_id: str | None = None,
             note: Callable[..., None] = _no_note) -> "TurnResponse | TurnStream | ResumedStream":
        """The turn of `request`: its idempotency key (a replay answers at once; a streamed request
        for a key still running resumes its stream), the user's token budget, its conversation, the
        agent, the turn stored.
        A streamed turn comes back as a TurnStream once the agent's first piece has arrived (or
        STREAM_FIRST_BYTE_SECONDS have passed); its own thread stores the turn when it ends. `note`
        takes the log line's fields."""
        if self.leases.owes():  # a failed turn's claims, not released yet: their conversation may be this one
            self.leases.pay_owed()
        session = self.sessions()
        claims = TurnClaims()
        if request.idempotency_key:
            outcome = self._claim_key(session, user_id, request)
            if isinstance(outcome, (TurnResponse, ResumedStream)):
                return outcome
            claims.key = outcome
            self.leases.hold(claims)
        try:
            asked_at = self.clock()
            self.budget.check(session, user_id, asked_at)  # a replay, answered above, costs no budget
            history = None
            if request.conversation_id is not None:
                window = None if request.regenerate else (self.policy.max_messages, self.policy.max_chars)
                claims.conversation, history = claim_conversation(session, user_id, request.conversation_id,
                                                                  self.leases.lease_seconds, window)
                self.leases.hold(claims)
            turn = Turn(user_id, request, claims, asked_at, self._context(session, claims, request, history))
            if request.stream:
                return TurnStream.start(self, turn, request_id)
            timing = AgentTiming(note)
            try:
                with cancellable(claims.stop):
                    reply = self.agent.run(turn.context, request.model, request_id=request_id)
            except BaseException as error:
                timing.failed(error)
                raise TurnStopped() if claims.stop.cancelled else error
            if claims.stop.cancelled:  # the answer came as the stop did: the stop wins
                raise TurnStopped()
            timing.ended(None, reply.attempts, reply.agent)
            return self.store(turn, reply)
        except BaseException:
            self.release(claims)
            raise

    def _claim_key(self, session: Session, user_id: str, request: ChatRequest):
        """The request's idempotency key held for this run (a KeyClaim), or the answer without a run:
        the replay, or, for a streamed request, the events of the run in progress or just ended."""
        fingerprint = idempotency.request_fingerprint(request.message, request.conversation_id, request.model,
                                                      regenerate=request.regenerate)
        last_id = request.last_event_id or 0
        waited_until = time.monotonic() + self.streams.longest_seconds
        while True:
            try:
                outcome = idempotency.claim_key(session, user_id, request.idempotency_key, fingerprint,
                                                hold_seconds=self.leases.lease_seconds, ttl_seconds=self.idempotency_ttl)
            except IdempotencyInProgress:
                if not request.stream:
                    raise
                session.rollback()
                live = self._follow(user_id, request, last_id)
                if live is not None:
                    return live
                if time.monotonic() >= waited_until:
                    raise
                # Without Redis (or a copy of its events), the resumed stream waits for the run's end.
                time.sleep(self.streams.resume_poll_seconds)
                continue
            if isinstance(outcome, idempotency.Replay):
                if request.stream:
                    live = self._follow(user_id, request, last_id)  # its events, while Redis keeps them
                    if live is not None:
                        return live
                return TurnResponse(outcome.body, replayed=True)
            return outcome

    def _follow(self, user_id: str, request: ChatRequest, last_id: int) -> "ResumedStream | None":
        if self.live_log is None:
            return None
        events = self.live_log.follow(user_id, request.idempotency_key, last_id, self.streams.keepalive_seconds,
                                      self.streams.longest_seconds)
        return ResumedStream(events) if events is not None else None

    def _context(self, session: Session, claims: TurnClaims, request: ChatRequest,
                 history: list[tuple[str, str]] | None) -> list[dict]:
        """Step 4's input: the kept history (read with the claim, or here) and the new message; to
        regenerate, the history before the latest answer's question, and that question again.
        Commits the claim and ends the transaction, so that a slow agent holds no pooled connection."""
        message, conversation = request.message, claims.conversation
        if conversation is None:
            history = []
        elif history is None:
            before_seq = None
            if request.regenerate:
                before_seq = conversation.message_count - 1
                message = self._latest_question(session, conversation.id, before_seq)
            history = queries.recent_history(session, conversation.id, self.policy.max_messages, self.policy.max_chars,
                                             before_seq)
        if session.in_transaction():  # the claim read here, or the budget's read (nothing else, on PostgreSQL)
            session.commit()
        return self.policy.messages(history, message)

    @staticmethod
    def _latest_question(session: Session, conversation_id: uuid.UUID, question_seq: int) -> str:
        """The user message that the conversation's latest answer answers; 404 when there is none."""
        latest = queries.messages_after(session, conversation_id, question_seq - 1, question_seq + 1, 2)
        if [(message.seq, message.role) for message in latest] != [(question_seq, "user"), (question_seq + 1, "assistant")]:
            raise MessageNotFound("The conversation has no answer to regenerate")
        return latest[0].content

    def stop(self, user_id: str, conversation_id: str, wait_seconds: float = STOP_WAIT_SECONDS) -> None:
        """Stop the turn in flight on the user's conversation, wherever it runs: mark it, wait for the
        process running it to end it (its lease thread looks every STOP_POLL_SECONDS), and free the
        conversation if it has not by then (that process is gone, or cannot reach the database).
        404 for a conversation that is not the user's, 409 when no turn is in flight."""
        session = self.sessions()
        parsed_id = parse_conversation_id(conversation_id)
        token = queries.request_stop(session, user_id, parsed_id, utcnow())
        session.commit()
        if token is None:
            if not queries.conversation_exists(session, user_id, parsed_id):
                raise ConversationNotFound()
            raise NoTurnInProgress()
        ends_at = time.monotonic() + wait_seconds
        while time.monotonic() < ends_at:
            if queries.claim_token(session, parsed_id) != token:
                session.rollback()
                return
            session.rollback()
            time.sleep(STOP_POLL_SECONDS / 5)
        queries.release_conversation(session, parsed_id, token)
        session.commit()

    def store(self, turn: Turn, reply: AgentReply) -> TurnResponse:
        """Store the conversation (if new), both messages (to regenerate: the new answer in place of
        the latest one), the user's usage counters and the idempotency record in one short
        transaction (on PostgreSQL, one statement), and give the conversation back."""
        session = self.sessions()
        conversation, answered_at, answer_seq = turn.claims.conversation, self.clock(), turn.answer_seq
        conversation_id = conversation.id if conversation is not None else uuid.uuid4()
        counted = usage.counted_usage(reply.usage, turn.context, reply.content)
        day_usage = usage.day_usage(turn.user_id, answered_at, counted)  # counted with the conversation's row
        message_id, model = uuid.uuid4(), reply.model or turn.request.model
        body = self.render(Answer(conversation_id=str(conversation_id), message_id=str(message_id),
                                  message=reply.content, role="assistant", created_at=answered_at,
                                  usage=reply.usage, model=model, finish_reason=reply.finish_reason))
        answer = {"id": message_id, "conversation_id": conversation_id, "seq": answer_seq, "role": "assistant",
                  "content": reply.content, "created_at": answered_at, "model": model,
                  "finish_reason": reply.finish_reason, "usage": reply.usage}
        question = {"id": uuid.uuid4(), "conversation_id": conversation_id, "seq": answer_seq - 1, "role": "user",
                    "content": turn.request.message, "created_at": turn.asked_at, "model": None,
                    "finish_reason": None, "usage": None}
        if not turn.request.regenerate and queries.is_postgresql(session):
            self._store_in_one_statement(session, turn, body, question, answer, day_usage)
        else:
            self._store_in_a_transaction(session, turn, body, question, answer, day_usage)
        self.leases.let_go(turn.claims)
        metrics.count_tokens(model, counted.prompt_tokens, counted.completion_tokens)
        return TurnResponse(body, replayed=False, conversation_id=str(conversation_id))

    def _store_in_one_statement(self, session: Session, turn: Turn, body: str, question: dict, answer: dict,
                                day_usage: dict) -> None:
        conversation, key = turn.claims.conversation, turn.claims.key
        values = {"conversation_id": answer["conversation_id"], "owner": turn.user_id, "new_message_count": answer["seq"],
                  "now": answer["created_at"]}
        if conversation is None:
            values.update(title=conversation_title(turn.request.message), asked_at=turn.asked_at)
        else:
            values["token"] = conversation.token
        if key is not None:
            values.update(key_name=key.key, key_token=key.token, response_body=body)
        with queries.statements_alone(session) as connection:
            stored = queries.store_turn(connection, values, question, answer, day_usage,
                                        new_conversation=conversation is None, with_key=key is not None)
        if stored:
            return
        # Our lease lapsed and another turn took the conversation or the key; or the (conversation_id,
        # seq) index refused the messages, the last guard against interleaved turns.
        conversation_lost = conversation is not None and not queries.conversation_claimed_by(session, conversation.id,
                                                                                               conversation.token)
        if not conversation_lost and key is not None and not queries.key_claimed_by(session, key.user_id, key.key, key.token):
            raise IdempotencyInProgress()
        raise ConversationBusy()

    def _store_in_a_transaction(self, session: Session, turn: Turn, body: str, question: dict, answer: dict,
                                day_usage: dict) -> None:
        conversation, conversation_id = turn.claims.conversation, answer["conversation_id"]
        if conversation is None:
            queries.insert_conversation(session, {
                "id": conversation_id, "user_id": turn.user_id, "title": conversation_title(turn.request.message),
                "message_count": answer["seq"], "created_at": turn.asked_at, "updated_at": answer["created_at"],
            }, day_usage)
        elif not queries.finish_conversation_turn(session, conversation_id, conversation.token, answer["seq"],
                                                  answer["created_at"], day_usage):
            raise ConversationBusy()  # our lease lapsed and another turn took the conversation
        rows = [answer]
        if turn.request.regenerate:
            queries.delete_message(session, conversation_id, answer["seq"])  # the answer it replaces, feedback and all
        else:
            rows.insert(0, question)
        try:
            queries.insert_messages(session, rows)
        except IntegrityError:
            # The unique (conversation_id, seq) index: the last guard against interleaved turns.
            raise ConversationBusy() from None
        if turn.claims.key is not None:
            idempotency.complete_key(session, turn.claims.key, body, conversation_id)
        session.commit()

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
    """A streamed turn, run by a thread of its own from the agent's first piece to the stored turn.
    Its events (chatapp/turn_log.py) are what its client reads, and, through Redis, what a client
    that resumes it reads. The client may go away: the turn runs on and is stored
    (STREAM_ON_DISCONNECT=continue), or is cancelled and stores nothing. A user's stop ends it
    with what it has received (finish_reason `stopped`), or nothing before its first piece."""

    def __init__(self, service: ChatService, turn: Turn, request_id: str | None):
        self._service = service
        self.turn = turn
        self._request_id = request_id
        live = None
        if service.live_log is not None and turn.request.idempotency_key:
            live = service.live_log.publisher(turn.user_id, turn.request.idempotency_key)
        self.events = TurnEvents(live)
        self.failure: ApiError | None = None  # a failure before the first piece: an ordinary error response
        self._client_gone = False

    @classmethod
    def start(cls, service: ChatService, turn: Turn, request_id: str | None) -> "TurnStream":
        """Start the turn's thread and wait for the agent's first piece (or STREAM_FIRST_BYTE_SECONDS):
        a failure until then is an ordinary error response (AgentUnavailable), not a broken stream."""
        stream = cls(service, turn, request_id)
        service.spawn(stream._run)
        stream.events.first_piece.wait(service.streams.first_byte_seconds or None)
        if stream.failure is not None:
            raise stream.failure
        return stream

    def follow(self, last_id: int = 0) -> Iterator[Event | None]:
        """The turn's events after `last_id` as they come (None after STREAM_KEEPALIVE_SECONDS of
        silence); closing it before the end is the client going away."""
        try:
            while True:
                events = self.events.after(last_id, self._service.streams.keepalive_seconds)
                if not events:
                    yield None
                for event in events:
                    yield event
                    last_id = event.id
                if events and events[-1].final:
                    return
        except GeneratorExit:
            if not self.events.ended and self._service.streams.on_disconnect == "cancel":
                self._client_gone = True
                self.turn.claims.stop.cancel()
            raise

    def _run(self) -> None:
        """The turn's thread: the agent's pieces to the events, then the turn stored (or released)."""
        try:
            self._answer()
        finally:
            self._service.sessions.remove()  # this thread's session

    def _answer(self) -> None:
        pieces: list[str] = []
        timing = AgentTiming(_no_note)
        agent_stream, cut = None, False
        with metrics.TURNS_IN_FLIGHT.track_inprogress(), cancellable(self.turn.claims.stop):
            try:
                agent_stream = self._service.agent.stream(self.turn.context, self.turn.request.model,
                                                          request_id=self._request_id)
                with agent_stream:
                    for piece in agent_stream:
                        pieces.append(piece)
                        self.events.append(DELTA, delta_data(piece))
            except BaseException as error:
                stopped = self.turn.claims.stop.cancelled
                timing.ended(FailureKind.STOPPED, None, None) if stopped else timing.failed(error)
                if not stopped or self._client_gone or not pieces:
                    self._fail(TurnStopped() if stopped and not self._client_gone else error)
                    return
                cut = True  # stopped by the user: what came is the answer
            else:
                timing.ended(None, agent_stream.attempts, getattr(agent_stream, "agent", "primary"))
                if self._client_gone:  # cancelled when its client left, and the answer came anyway
                    self._fail(TurnStopped())
                    return
            # Here the agent's stream was opened: it ended whole, or the user stopped it after a piece.
            reply = AgentReply("".join(pieces), agent_stream.usage, agent_stream.attempts, getattr(agent_stream, "model", None),
                               getattr(agent_stream, "agent", "primary"),
                               STOPPED if cut else getattr(agent_stream, "finish_reason", FINISHED))
            try:
                stored = self._service.store(self.turn, reply)
            except BaseException as error:
                self._fail(error)
                return
            self.events.append(DONE, stored.body)

    def _fail(self, error: BaseException) -> None:
        """Store nothing, free the claims; the client hears of it as an error response (nothing sent
        yet) or as the stream's `error` event."""
        self._service.release(self.turn.claims)
        api_error = as_api_error(error)
        if not self.events.first_piece.is_set():
            self.failure = api_error
        self.events.append(ERROR, json.dumps(error_body(api_error, self._request_id), separators=(",", ":")))


class ResumedStream:
    """A resumed stream's events, from Redis: `follow()` as TurnStream's."""

    def __init__(self, events: Iterator[Event | None]):
        self._events = events

    def follow(self, last_id: int = 0) -> Iterator[Event | None]:
        return self._events


def delta_data(piece: str) -> str:
    return json.dumps({"content": piece}, separators=(",", ":"))


def replay_events(replay: TurnResponse) -> list[Event]:
    """A finished turn, streamed again: its whole message as one delta, then done."""
    return [Event(1, DELTA, delta_data(replay.message)), Event(2, DONE, replay.body)]
