"""What the agent is sent: the context policy of the contract's step 4."""
from dataclasses import dataclass


@dataclass(frozen=True)
class ContextPolicy:
    """The optional system prompt, then at most `max_messages` of the latest stored messages whose
    contents total at most `max_chars` (the oldest dropped first; the queries apply both bounds),
    then the new message. Neither the system prompt nor the new message counts."""

    system_prompt: str | None
    max_messages: int
    max_chars: int

    def messages(self, history: list[tuple[str, str]], new_message: str) -> list[dict]:
        """The chat messages for the agent, from the kept history's (role, content) pairs."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [{"role": role, "content": content} for role, content in history]
        messages.append({"role": "user", "content": new_message})
        return messages
