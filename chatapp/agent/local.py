"""Agents in this process: the development echo, and an answer at hand served as a stream."""
import re
from collections.abc import Iterable

from chatapp.agent.contract import AgentReply
from chatapp.values import FINISHED

# Between a space and the next word: splitting there keeps every character on some piece.
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")


class ReadyStream:
    """An answer already at hand, served piece by piece like an AgentStream."""

    def __init__(self, pieces: Iterable[str], usage: dict | None = None, attempts: int = 1,
                 finish_reason: str = FINISHED):
        self.usage = usage
        self.attempts = attempts
        self.finish_reason = finish_reason
        self._pieces = iter([piece for piece in pieces if piece])

    def __iter__(self) -> "ReadyStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> "ReadyStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to end: no call is in progress."""


class EchoAgent:
    """Development agent (AGENT_URL unset): answers with the last message, echoed."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None,
            deadline: float | None = None) -> AgentReply:
        """Echo the content of the last message."""
        last = messages[-1]["content"] if messages else ""
        return AgentReply(f"Echo: {last}", None, 1)

    def stream(self, messages: list[dict], model: str, request_id: str | None = None,
               deadline: float | None = None) -> ReadyStream:
        """Echo the content of the last message word by word (the pieces keep their spaces)."""
        reply = self.run(messages, model, request_id)
        return ReadyStream(_WORD_BOUNDARY.split(reply.content), reply.usage, reply.attempts)
