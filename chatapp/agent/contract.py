"""What every agent is: a runner that answers a conversation whole or piece by piece, and its replies."""
from typing import NamedTuple, Protocol


class AgentReply(NamedTuple):
    """The assistant's answer, the agent's token usage (or None), how many attempts it took, the
    model that answered (None: the one asked for) and which agent it was (primary or fallback)."""

    content: str
    usage: dict | None
    attempts: int
    model: str | None = None
    agent: str = "primary"


class ReplyStream(Protocol):
    """An answer arriving piece by piece: iterate for its non-empty str pieces, then read `usage`.
    `model` and `agent` as AgentReply's (a plain stream may have neither: None, primary)."""

    usage: dict | None
    attempts: int

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
