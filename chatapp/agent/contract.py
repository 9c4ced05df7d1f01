"""What every agent is: a runner that answers a conversation whole or piece by piece, and its replies."""
from typing import NamedTuple, Protocol

from chatapp.values import CUT_AT_LENGTH, FINISHED


def finish_reason(agent_value) -> str:
    """The finish_reason of an answer from the agent's own: `length` when it says it hit its token
    limit, else `stop` (it finished; content filters and tool calls end an answer too)."""
    return CUT_AT_LENGTH if agent_value == "length" else FINISHED


class AgentReply(NamedTuple):
    """The assistant's answer, the agent's token usage (or None), how many attempts it took, the
    model that answered (None: the one asked for), which agent it was (primary or fallback) and
    why it ended (stop, length, or stopped by the user)."""

    content: str
    usage: dict | None
    attempts: int
    model: str | None = None
    agent: str = "primary"
    finish_reason: str = FINISHED


class ReplyStream(Protocol):
    """An answer arriving piece by piece: iterate for its non-empty str pieces, then read `usage`
    and `finish_reason`. `model` and `agent` as AgentReply's (a plain stream may have neither:
    None, primary)."""

    usage: dict | None
    attempts: int
    finish_reason: str

    def __iter__(self) -> "ReplyStream": ...

    def __next__(self) -> str: ...

    def close(self) -> None: ...

    def __enter__(self) -> "ReplyStream": ...

    def __exit__(self, *exc_info) -> None: ...


class AgentRunner(Protocol):
    """Anything that turns a list of chat messages into an AgentReply, whole or as a stream."""

    def run(self, messages: list[dict], model: str, request_id: str | None = None,
            deadline: float | None = None) -> AgentReply:
        """Answer the conversation `messages` with `model`, or raise AgentUnavailable; by the
        monotonic `deadline` when one is given (what is left of a turn's), else its own timeout."""
        ...

    def stream(self, messages: list[dict], model: str, request_id: str | None = None,
               deadline: float | None = None) -> ReplyStream:
        """Start answering `messages` with `model` piece by piece, or raise AgentUnavailable; the
        first piece by `deadline` when one is given."""
        ...
