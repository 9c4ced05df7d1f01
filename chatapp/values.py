"""The values the service accepts and stores, each rule in one place: the sizes the contract fixes,
the text a database can store, JSON without NaN, the spelling of a conversation's or a message's
id. The schemas, the models, the agent client and the command line all take them from here."""
import uuid

from chatapp.errors import ApiError, ConversationNotFound, MessageNotFound

USER_ID_MAX_CHARS = 255
MESSAGE_MAX_CHARS = 10_000
CONVERSATION_ID_MAX_CHARS = 64
MODEL_MAX_CHARS = 255
IDEMPOTENCY_KEY_MAX_CHARS = 255
TITLE_MAX_CHARS = 200  # a title a user gives (PATCH)
AUTO_TITLE_CHARS = 80  # a new conversation's title: the start of its first message
# A conversation's metadata: string keys and values, few and short.
METADATA_MAX_KEYS, METADATA_KEY_MAX_CHARS, METADATA_VALUE_MAX_CHARS = 16, 64, 512
# Feedback on an answer: a rating of these (or none) and a comment.
FEEDBACK_RATINGS = ("like", "dislike")
FEEDBACK_COMMENT_MAX_CHARS = 2000
# Why an answer ended: the agent finished; it hit its token limit; the user stopped the turn.
FINISHED, CUT_AT_LENGTH, STOPPED = "stop", "length", "stopped"
FINISH_REASONS = (FINISHED, CUT_AT_LENGTH, STOPPED)


def unstorable(text: str) -> str | None:
    """Why PostgreSQL could not store `text` (a NUL; a lone surrogate, which is not UTF-8), or None."""
    if "\x00" in text:
        return "Must not contain NUL characters."
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "Must be valid Unicode (no lone surrogates)."
    return None


def storable_json(value) -> bool:
    """Whether every string in a decoded JSON value, keys included, can be stored."""
    try:
        if isinstance(value, str):
            return unstorable(value) is None
        if isinstance(value, dict):
            return all(unstorable(key) is None and storable_json(item) for key, item in value.items())
        if isinstance(value, list):
            return all(storable_json(item) for item in value)
        return True
    except RecursionError:
        return False


def reject_json_constant(name: str):
    """json.loads' parse_constant: NaN and Infinity are not JSON, and would not survive being
    stored and served again."""
    raise ValueError(f"{name} is not valid JSON")


def _parse_id(value: str, not_found: type[ApiError]) -> uuid.UUID:
    """The UUID a client sent as an id, in its canonical spelling (upper case taken). Anything else
    (braced, URN and bare-hex spellings included) is `not_found`: the same 404 as an unknown id."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise not_found() from None
    if str(parsed) != value.lower():
        raise not_found()
    return parsed


def parse_conversation_id(value: str) -> uuid.UUID:
    """A conversation id as the client sent it; anything else is conversation_not_found, like an unknown id."""
    return _parse_id(value, ConversationNotFound)


def parse_message_id(value: str) -> uuid.UUID:
    """A message id as the client sent it; anything else is message_not_found, like an unknown id."""
    return _parse_id(value, MessageNotFound)


def conversation_title(first_message: str) -> str:
    """A new conversation's title: the start of its first message, on one line."""
    return " ".join(first_message.split())[:AUTO_TITLE_CHARS]
