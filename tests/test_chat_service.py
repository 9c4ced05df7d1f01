"""ChatService driven directly: no HTTP, no app context; a session factory on the test database and
an agent of the test's own (the service takes both as arguments)."""
import json
import threading

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import scoped_session, sessionmaker

from chatapp.agent import AgentReply, ReadyStream
from chatapp.chat_service import ChatService, StreamSettings, TurnResponse, TurnStream
from chatapp.claims import TurnLeases
from chatapp.context import ContextPolicy
from chatapp.errors import AgentUnavailable, ConversationBusy, ConversationNotFound, IdempotencyKeyReused
from chatapp.models import Conversation, IdempotencyKey, Message
from chatapp.schemas import ChatRequest, render_chat_response


class ScriptedAgent:
    """An AgentRunner whose answers the test gives; it records what it was sent."""

    def __init__(self):
        self.calls = []
        self.failures = []

    def _answer(self, messages):
        self.calls.append(messages)
        if self.failures:
            raise self.failures.pop(0)
        return f"re: {messages[-1]['content']}"

    def run(self, messages, model, request_id=None):
        return AgentReply(self._answer(messages), {"total_tokens": 3}, 1)

    def stream(self, messages, model, request_id=None):
        answer = self._answer(messages).split(" ")
        if self.gate is None:
            return ReadyStream(answer, None, 2)
        return GatedStream(answer, self.gate)

    gate: threading.Event | None = None  # when set: a stream's pieces after the first wait for it


class GatedStream(ReadyStream):
    """The first piece at once, the others once `gate` is set; closing it ends it."""

    def __init__(self, pieces, gate):
        super().__init__(pieces, None, 1)
        self._gate, self._given, self.closed = gate, 0, False

    def __next__(self):
        if self._given and not self._gate.wait(5) or self.closed:
            raise StopIteration
        self._given += 1
        return super().__next__()

    def close(self):
        self.closed = True


@pytest.fixture
def engine(database_uri):
    engine = create_engine(database_uri)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    factory = scoped_session(sessionmaker(bind=engine))
    yield factory
    factory.remove()


@pytest.fixture
def agent():
    return ScriptedAgent()


@pytest.fixture
def service(sessions, engine, agent):
    return ChatService(sessions=sessions, agent=agent, policy=ContextPolicy("Be brief.", max_messages=3, max_chars=1000),
                       leases=TurnLeases(engine, lease_seconds=5), render=render_chat_response, idempotency_ttl=3600)


def ask(message, conversation_id=None, key=None, stream=False, model="m1"):
    return ChatRequest(message=message, conversation_id=conversation_id, model=model, stream=stream, idempotency_key=key)


def stored(sessions):
    session = sessions()
    session.rollback()
    return (session.scalar(select(func.count()).select_from(Conversation)),
            session.scalar(select(func.count()).select_from(Message)),
            session.scalar(select(func.count()).select_from(IdempotencyKey)))


def test_a_new_conversation_and_its_next_turn(service, agent, sessions):
    noted = {}
    first = service.send("alice", ask("hello"), note=noted.update)
    assert isinstance(first, TurnResponse) and not first.replayed
    body = json.loads(first.body)
    assert (body["message"], body["model"], body["usage"]) == ("re: hello", "m1", {"total_tokens": 3})
    assert first.conversation_id == body["conversation_id"]
    assert noted["agent_attempts"] == 1 and noted["agent_ms"] >= 0

    second = json.loads(service.send("alice", ask("again", body["conversation_id"])).body)
    assert second["conversation_id"] == body["conversation_id"]
    assert agent.calls[1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                              {"role": "assistant", "content": "re: hello"}, {"role": "user", "content": "again"}]
    assert stored(sessions) == (1, 4, 0)
    title = sessions().scalar(select(Conversation.title))
    assert title == "hello"


def test_the_context_keeps_the_latest_messages(service, agent):
    conversation_id = json.loads(service.send("alice", ask("one")).body)["conversation_id"]
    service.send("alice", ask("two", conversation_id))
    service.send("alice", ask("three", conversation_id))
    assert [m["content"] for m in agent.calls[-1][1:]] == ["re: one", "two", "re: two", "three"]  # 3 kept, then the new one


def test_a_key_replays_its_answer_without_the_agent(service, agent, sessions):
    first = service.send("alice", ask("hello", key="k-1"))
    again = service.send("alice", ask("hello", key="k-1"))
    assert again.replayed and again.body == first.body and again.message == "re: hello"
    assert len(agent.calls) == 1
    with pytest.raises(IdempotencyKeyReused):
        service.send("alice", ask("something else", key="k-1"))
    assert stored(sessions) == (1, 2, 1)
    other_user = service.send("bob", ask("hello", key="k-1"))  # keys are the user's
    assert not other_user.replayed


def test_an_agent_failure_stores_nothing_and_frees_the_conversation_and_the_key(service, agent, sessions):
    conversation_id = json.loads(service.send("alice", ask("start")).body)["conversation_id"]
    agent.failures.append(AgentUnavailable("down", kind="timeout", attempts=2))
    noted = {}
    with pytest.raises(AgentUnavailable):
        service.send("alice", ask("lost", conversation_id, key="k-2"), note=noted.update)
    assert noted["agent_attempts"] == 2
    assert stored(sessions) == (1, 2, 0)
    retried = service.send("alice", ask("lost", conversation_id, key="k-2"))  # runs anew, not 409
    assert not retried.replayed and json.loads(retried.body)["message"] == "re: lost"


def test_unknown_or_another_users_conversation_is_not_found(service, agent):
    conversation_id = json.loads(service.send("alice", ask("mine")).body)["conversation_id"]
    another = conversation_id[:-1] + ("1" if conversation_id[-1] == "0" else "0")
    for user, conversation in (("bob", conversation_id), ("alice", "not-a-uuid"), ("alice", another.upper())):
        with pytest.raises(ConversationNotFound):
            service.send(user, ask("hi", conversation))
    assert len(agent.calls) == 1


def events_of(stream):
    return [event for event in stream.follow() if event is not None]


def test_a_stream_is_stored_by_its_own_thread_with_numbered_events(service, agent, sessions):
    turn = service.send("alice", ask("streamed answer", stream=True))
    assert isinstance(turn, TurnStream)
    events = events_of(turn)
    assert [(event.id, event.name) for event in events] == [(1, "delta"), (2, "delta"), (3, "delta"), (4, "done")]
    pieces = [json.loads(event.data)["content"] for event in events[:-1]]
    assert pieces == ["re:", "streamed", "answer"]
    done = json.loads(events[-1].data)
    assert (done["message"], done["finish_reason"]) == ("re:streamedanswer", "stop")
    assert stored(sessions) == (1, 2, 0)  # the done event comes after the commit


@pytest.mark.parametrize("on_disconnect, kept", [("continue", (1, 2, 1)), ("cancel", (0, 0, 0))])
def test_a_client_that_goes_away(service, agent, sessions, on_disconnect, kept):
    service.streams = StreamSettings(on_disconnect=on_disconnect, keepalive_seconds=0.05)
    agent.gate = threading.Event()
    turn = service.send("alice", ask("cut short", key="k-3", stream=True))
    following = turn.follow()
    assert next(following).name == "delta"
    following.close()  # the client went away
    agent.gate.set()
    for _ in range(500):  # the turn's thread ends it, within moments
        if turn.events.ended:
            break
        threading.Event().wait(0.01)
    assert turn.events.ended
    assert stored(sessions) == kept
    again = service.send("alice", ask("cut short", key="k-3"))
    assert again.replayed is (on_disconnect == "continue")  # cancelled: the key is free


def test_a_second_turn_while_the_first_holds_the_conversation_is_busy(service, agent, sessions):
    conversation_id = json.loads(service.send("alice", ask("start")).body)["conversation_id"]
    agent.gate = threading.Event()
    held = service.send("alice", ask("first", conversation_id, stream=True))  # holds it until it ends
    with pytest.raises(ConversationBusy):
        service.send("alice", ask("second", conversation_id))
    agent.gate.set()
    events_of(held)
    assert json.loads(service.send("alice", ask("third", conversation_id)).body)["message"] == "re: third"
