"""Marshmallow schemas: requests as validated (a chat request as a frozen ChatRequest), responses as sent."""
import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime

from marshmallow import RAISE, Schema, ValidationError, fields, post_dump, validate, validates, validates_schema

from chatapp.values import (
    CONVERSATION_ID_MAX_CHARS,
    FEEDBACK_COMMENT_MAX_CHARS,
    FEEDBACK_RATINGS,
    FINISH_REASONS,
    IDEMPOTENCY_KEY_MAX_CHARS,
    MESSAGE_MAX_CHARS,
    METADATA_KEY_MAX_CHARS,
    METADATA_MAX_KEYS,
    METADATA_VALUE_MAX_CHARS,
    MODEL_MAX_CHARS,
    TITLE_MAX_CHARS,
    USER_ID_MAX_CHARS,
    unstorable,
)

CURSOR_MAX_CHARS = 256
# Message.seq is a 32-bit INTEGER column; a larger `before` is out of range (SQLite overflows on it).
SEQ_MAX = 2**31 - 1
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{IDEMPOTENCY_KEY_MAX_CHARS}}}")
# The same rule as a JSON Schema (ECMA-262) pattern, for the OpenAPI document.
IDEMPOTENCY_KEY_JSON_PATTERN = f"^{IDEMPOTENCY_KEY_PATTERN.pattern}$"


def validate_text(value: str) -> None:
    """Text we can store anywhere (chatapp/values.py)."""
    problem = unstorable(value)
    if problem:
        raise ValidationError(problem)


def validate_not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be only white space.")


def validate_idempotency_key(value: str) -> None:
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise ValidationError(f"Must be 1 to {IDEMPOTENCY_KEY_MAX_CHARS} visible ASCII characters.")


def idempotency_key(header_value: str | None, body_value: str | None) -> str | None:
    """The request's idempotency key, from the Idempotency-Key header or the `request_id` field."""
    if header_value is not None:
        try:
            validate_idempotency_key(header_value)
        except ValidationError as error:
            raise ValidationError({"Idempotency-Key": error.messages}) from None
        if body_value is not None and body_value != header_value:
            raise ValidationError({"request_id": ["Must equal the Idempotency-Key header when both are sent."]})
        return header_value
    return body_value


class StrictBoolean(fields.Boolean):
    """A JSON true or false, nothing else (marshmallow's Boolean also takes "true", 1, "yes")."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def model_field() -> fields.String:
    """A turn's `model`: null or absent is DEFAULT_MODEL (TurnSchema)."""
    return fields.String(load_default=None, allow_none=True, validate=[validate.Length(min=1, max=MODEL_MAX_CHARS), validate_text])


def request_id_field() -> fields.String:
    """A turn's `request_id`: its idempotency key, as the Idempotency-Key header."""
    return fields.String(load_default=None, allow_none=True, validate=validate_idempotency_key,
                         metadata={"pattern": IDEMPOTENCY_KEY_JSON_PATTERN})


def stream_field() -> StrictBoolean:
    return StrictBoolean(load_default=False, metadata={"description": "true: answer with server-sent events"})


class BodySchema(Schema):
    """A JSON body: an object (anything else is a field-less 400) whose unknown fields are rejected by name."""

    class Meta:
        unknown = RAISE

    def load(self, data, **kwargs):
        if not isinstance(data, dict):
            raise ValidationError("Request body must be a JSON object.", field_name="_schema")
        return super().load(data, **kwargs)


class TurnSchema(BodySchema):
    """What the body of every turn has (a message sent, an answer regenerated): `model`, defaulted
    and checked against ALLOWED_MODELS, `request_id` and `stream`."""

    def __init__(self, *, default_model: str | None = None, allowed_models=None, **kwargs):
        super().__init__(**kwargs)
        self.default_model = default_model
        self.allowed_models = allowed_models

    @validates("model")
    def validate_model(self, value, **_kwargs):
        if value is not None and self.allowed_models and value not in self.allowed_models:
            raise ValidationError(f"Must be one of: {', '.join(self.allowed_models)}.")

    def load(self, data, **kwargs):
        """Validated request with `model` defaulted."""
        result = super().load(data, **kwargs)
        if result["model"] is None:
            result["model"] = self.default_model
        return result


class ChatRequestSchema(TurnSchema):
    """The body of POST /api/<user_id>/chat."""

    message = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=MESSAGE_MAX_CHARS), validate_not_blank, validate_text],
    )
    conversation_id = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=CONVERSATION_ID_MAX_CHARS)
    )
    model = model_field()
    request_id = request_id_field()
    stream = stream_field()

    def load_chat_request(self, body, idempotency_header: str | None, last_event_header: str | None = None) -> "ChatRequest":
        """The body (and the Idempotency-Key and Last-Event-ID headers) as a ChatRequest, or ValidationError."""
        loaded = self.load(body)
        key = idempotency_key(idempotency_header, loaded.pop("request_id"))
        return ChatRequest(**loaded, idempotency_key=key, last_event_id=last_event_id(last_event_header))


class RegenerateRequestSchema(TurnSchema):
    """The body of POST /api/<user_id>/conversations/<conversation_id>/regenerate (optional)."""

    model = model_field()
    request_id = request_id_field()
    stream = stream_field()

    def load_regenerate_request(self, body, conversation_id: str, idempotency_header: str | None,
                                last_event_header: str | None = None) -> "ChatRequest":
        """The body and headers as the ChatRequest that regenerates the conversation's latest answer."""
        loaded = self.load(body)
        key = idempotency_key(idempotency_header, loaded.pop("request_id"))
        return ChatRequest(message="", conversation_id=conversation_id, **loaded, idempotency_key=key,
                           last_event_id=last_event_id(last_event_header), regenerate=True)


@dataclass(frozen=True)
class ChatRequest:
    """A turn's request as validated: the message, its conversation (None: a new one), the model
    (DEFAULT_MODEL applied), the idempotency key (from the header or `request_id`), whether the
    answer streams, and whether it regenerates the conversation's latest answer (the message is
    then the one that answer answers, read from the conversation)."""

    message: str
    conversation_id: str | None
    model: str
    stream: bool
    idempotency_key: str | None = None
    last_event_id: int | None = None  # a resumed stream's: the last event the client saw
    regenerate: bool = False


LAST_EVENT_ID_PATTERN = re.compile(r"[0-9]{1,9}")


def last_event_id(header: str | None) -> int | None:
    """The Last-Event-ID header of a resumed stream: an event number, 0 to 999,999,999."""
    if header is None:
        return None
    if not LAST_EVENT_ID_PATTERN.fullmatch(header.strip()):
        raise ValidationError({"Last-Event-ID": ["Must be the number of an event of the stream."]})
    return int(header)


class PathUserSchema(Schema):
    """The user id in the path: 1 to 255 characters."""

    user_id = fields.String(required=True, validate=[validate.Length(min=1, max=USER_ID_MAX_CHARS), validate_text])


class ChatResponseSchema(Schema):
    """The answer to a chat turn (a chatapp.chat_service.Answer)."""

    conversation_id = fields.String(required=True)
    message = fields.String(required=True)
    role = fields.String(required=True)
    created_at = fields.DateTime(format="iso", required=True)
    usage = fields.Dict(allow_none=True, required=True)
    message_id = fields.String(required=True)
    model = fields.String(required=True)
    finish_reason = fields.String(required=True, validate=validate.OneOf(FINISH_REASONS), metadata={
        "description": "stop: the agent finished; length: the agent hit its token limit; stopped: the user stopped the turn"})


_CHAT_RESPONSE = ChatResponseSchema()


def render_chat_response(answer) -> str:
    """The ChatResponse as sent, stored for idempotent replays and sent as a stream's `done`: compact
    JSON, as Flask's jsonify writes every other body (ASCII, no spaces)."""
    return json.dumps(_CHAT_RESPONSE.dump(answer), separators=(",", ":"))


class Cursor(fields.Field):
    """An opaque position in the conversation list: (updated_at, id), URL-safe base64 JSON."""

    default_error_messages = {"invalid": "Not a valid cursor."}

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        updated_at, conversation_id = value
        raw = json.dumps([updated_at.isoformat(), str(conversation_id)]).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or len(value) > CURSOR_MAX_CHARS:
            raise self.make_error("invalid")
        try:
            padded = value + "=" * (-len(value) % 4)
            updated_at, conversation_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
            position = datetime.fromisoformat(updated_at), uuid.UUID(conversation_id)
        except (ValueError, TypeError, UnicodeError, binascii.Error):
            raise self.make_error("invalid") from None
        if position[0].tzinfo is None:
            raise self.make_error("invalid")
        return position


class QuerySchema(Schema):
    """Query parameters: unknown ones are rejected by name, like unknown body fields."""

    class Meta:
        unknown = RAISE


class ConversationListQuerySchema(QuerySchema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    before = Cursor(
        load_default=None,
        metadata={"description": "next_cursor of the previous page", "maxLength": CURSOR_MAX_CHARS},
    )


class MessageListQuerySchema(QuerySchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    before = fields.Integer(
        load_default=None,
        validate=validate.Range(min=1, max=SEQ_MAX),
        metadata={"description": "first seq of the previous page"},
    )


def validate_metadata_size(value: dict) -> None:
    """At most METADATA_MAX_KEYS keys."""
    if len(value) > METADATA_MAX_KEYS:
        raise ValidationError(f"Must have at most {METADATA_MAX_KEYS} keys.")


class Metadata(fields.Dict):
    """A conversation's metadata: at most 16 keys of 1 to 64 characters, each to a string of at most
    512 (all storable text); {} when it has none (stored as null)."""

    def __init__(self, *, description: str, **kwargs):
        super().__init__(
            keys=fields.String(validate=[validate.Length(min=1, max=METADATA_KEY_MAX_CHARS), validate_text]),
            values=fields.String(validate=[validate.Length(max=METADATA_VALUE_MAX_CHARS), validate_text]),
            validate=validate_metadata_size,
            # Not a Length validator: apispec would document it as an object's maxLength.
            metadata={"maxProperties": METADATA_MAX_KEYS, "description": description},
            **kwargs,
        )

    def _serialize(self, value, attr, obj, **kwargs):
        return super()._serialize({} if value is None else value, attr, obj, **kwargs)


class ConversationSchema(Schema):
    """A conversation as the history endpoints show it."""

    conversation_id = fields.UUID(attribute="id", required=True)
    title = fields.String(required=True)
    created_at = fields.DateTime(format="iso", required=True)
    updated_at = fields.DateTime(format="iso", required=True)
    message_count = fields.Integer(required=True)
    metadata = Metadata(attribute="meta", required=True, description="Your own string keys and values; {} when none")


class ConversationUpdateSchema(BodySchema):
    """The body of PATCH /api/<user_id>/conversations/<conversation_id>: a new title, new metadata, or both."""

    title = fields.String(validate=[validate.Length(min=1, max=TITLE_MAX_CHARS), validate_not_blank, validate_text])
    metadata = Metadata(attribute="meta", allow_none=True, description=(
        f"At most {METADATA_MAX_KEYS} keys of 1 to {METADATA_KEY_MAX_CHARS} characters, each to a string of at most "
        f"{METADATA_VALUE_MAX_CHARS}: replaces the whole metadata; null clears it"))

    @validates_schema
    def validate_something_changes(self, data, **_kwargs):
        if not data:
            raise ValidationError("Request body must have a title, metadata or both.")


class FeedbackRequestSchema(BodySchema):
    """The body of PUT .../messages/<message_id>/feedback: a missing field is null; both null clear the feedback."""

    rating = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(FEEDBACK_RATINGS))
    comment = fields.String(load_default=None, allow_none=True,
                            validate=[validate.Length(max=FEEDBACK_COMMENT_MAX_CHARS), validate_text])


class FeedbackSchema(Schema):
    """A user's feedback on an answer, as the answer's message shows it."""

    rating = fields.String(required=True, allow_none=True, validate=validate.OneOf(FEEDBACK_RATINGS))
    comment = fields.String(required=True, allow_none=True)
    updated_at = fields.DateTime(format="iso", required=True)


class FeedbackResponseSchema(Schema):
    """The feedback now on an answer (rating and comment both null: none)."""

    message_id = fields.UUID(required=True)
    rating = fields.String(required=True, allow_none=True, validate=validate.OneOf(FEEDBACK_RATINGS))
    comment = fields.String(required=True, allow_none=True)
    updated_at = fields.DateTime(format="iso", required=True, metadata={"description": "When it was put (this request)"})


class ConversationListSchema(Schema):
    conversations = fields.List(fields.Nested(ConversationSchema), required=True)
    next_cursor = Cursor(attribute="next_position", allow_none=True, required=True)


class MessageSchema(Schema):
    message_id = fields.UUID(attribute="id", required=True)
    seq = fields.Integer(required=True)
    role = fields.String(required=True)
    content = fields.String(required=True)
    created_at = fields.DateTime(format="iso", required=True)
    model = fields.String(allow_none=True, metadata={"description": "An assistant message's: the model that answered "
                                                     "(null for answers stored before it was kept); absent on user messages"})
    usage = fields.Dict(allow_none=True, metadata={
        "description": "An assistant message's: the token usage as the agent reported it, or null; absent on user messages"})
    finish_reason = fields.String(allow_none=True, validate=validate.OneOf(FINISH_REASONS), metadata={
        "description": "An assistant message's: stop, length or stopped (null for answers stored before it was kept); "
                       "absent on user messages"})
    feedback = fields.Nested(FeedbackSchema, allow_none=True, metadata={
        "description": "An assistant message's: its user's feedback, or null (none, or cleared); absent on user messages"})

    @post_dump
    def only_answers_say_how_they_came(self, data, **_kwargs):
        if data["role"] != "assistant":
            del data["model"], data["finish_reason"], data["usage"], data["feedback"]
        return data


class StopResponseSchema(Schema):
    conversation_id = fields.UUID(required=True)
    stopped = fields.Boolean(required=True)


class MessageListSchema(Schema):
    conversation_id = fields.UUID(required=True)
    messages = fields.List(fields.Nested(MessageSchema), required=True)
    has_more = fields.Boolean(required=True)


class ExportQuerySchema(QuerySchema):
    """GET /export takes no query parameters: any is a 400."""


class ExportedConversationSchema(ConversationSchema):
    """A conversation in the export: as the history shows it, with every one of its messages."""

    messages = fields.List(fields.Nested(MessageSchema), required=True, metadata={"description": "Oldest first"})


class UserExportSchema(Schema):
    """GET /api/<user_id>/export: everything of the user, one document (chatapp/user_data.py writes it
    piece by piece, with ConversationSchema and MessageSchema)."""

    user_id = fields.String(required=True)
    exported_at = fields.DateTime(format="iso", required=True)
    conversations = fields.List(fields.Nested(ExportedConversationSchema), required=True,
                                metadata={"description": "Most recently active first"})


USAGE_RANGE_MAX_DAYS = 366
DAY_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class Day(fields.Field):
    """A calendar day written YYYY-MM-DD, nothing else (marshmallow's Date also takes 2026-1-5)."""

    default_error_messages = {"invalid": "Not a valid date: YYYY-MM-DD."}

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value.isoformat()

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str) or not DAY_PATTERN.fullmatch(value):
            raise self.make_error("invalid")
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise self.make_error("invalid") from None


class UsageQuerySchema(QuerySchema):
    """GET /usage's range: both days included; each one left out is the current period's."""

    first_day = Day(data_key="from", load_default=None, metadata={
        "description": "First day (UTC), YYYY-MM-DD; default: the first of the current budget period (or UTC month)",
        "format": "date"})
    last_day = Day(data_key="to", load_default=None, metadata={
        "description": "Last day (UTC), YYYY-MM-DD, at most 366 days from `from`; default: the last of the current "
                       "budget period (or UTC month)", "format": "date"})

    def load_range(self, args: dict, default_first: date, default_last: date) -> tuple[date, date]:
        """The days asked for, defaults applied: `from` not after `to`, at most 366 days."""
        loaded = self.load(args)
        first, last = loaded["first_day"] or default_first, loaded["last_day"] or default_last
        if first > last:
            raise ValidationError({"from": [f"Must not be after to ({first.isoformat()} > {last.isoformat()})."]})
        if (last - first).days + 1 > USAGE_RANGE_MAX_DAYS:
            raise ValidationError({"to": [f"Must be at most {USAGE_RANGE_MAX_DAYS} days from from, both included."]})
        return first, last


class UsageDaySchema(Schema):
    date = Day(required=True, metadata={"format": "date"})
    turns = fields.Integer(required=True)
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class BudgetSchema(Schema):
    """The user's token budget in the current period."""

    limit = fields.Integer(required=True, metadata={"description": "Tokens a period"})
    period = fields.String(attribute="period.name", required=True, validate=validate.OneOf(["day", "month"]))
    used = fields.Integer(required=True, metadata={"description": "Tokens used so far in this period"})
    remaining = fields.Integer(required=True)
    resets_at = fields.DateTime(attribute="period.resets_at", format="iso", required=True,
                                metadata={"description": "When the next period starts (UTC midnight)"})


class UsageSchema(Schema):
    """GET /api/<user_id>/usage: the totals of the range, its days with turns, the budget now."""

    first_day = Day(data_key="from", required=True, metadata={"format": "date"})
    last_day = Day(data_key="to", required=True, metadata={"format": "date"})
    turns = fields.Integer(required=True)
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)
    estimated_turns = fields.Integer(required=True, metadata={
        "description": "Turns whose agent reported no usage: counted ceil(characters / 4) of what it was sent and answered"})
    days = fields.List(fields.Nested(UsageDaySchema), required=True, metadata={"description": "Only the days with turns"})
    budget = fields.Nested(BudgetSchema, allow_none=True, required=True, metadata={
        "description": "null when no limit applies to the user"})


class HealthSchema(Schema):
    """GET /healthz: the process is alive."""

    status = fields.String(required=True, validate=validate.OneOf(["ok"]))


class ReadinessSchema(Schema):
    """GET /readyz: the database answers; how the agent's circuit breaker stands."""

    status = fields.String(required=True, validate=validate.OneOf(["ready"]))
    agent = fields.String(required=True, validate=validate.OneOf(["closed", "open", "half_open"]))


class ErrorSchema(Schema):
    """Every error body."""

    detail = fields.String(required=True)
    code = fields.String(required=True)
    request_id = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(), values=fields.Raw(), metadata={"description": "per field, on 400 from validation"}
    )
