"""Marshmallow schemas: the chat request as validated, the chat response as sent."""
import re

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

MESSAGE_MAX_CHARS = 10_000
CONVERSATION_ID_MAX_CHARS = 64
USER_ID_MAX_CHARS = 255
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")


def validate_text(value: str) -> None:
    """Text we can store anywhere: no NUL (PostgreSQL refuses it), no lone surrogate (not UTF-8)."""
    if "\x00" in value:
        raise ValidationError("Must not contain NUL characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("Must be valid Unicode (no lone surrogates).") from None


def validate_not_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("Must not be only white space.")


def validate_idempotency_key(value: str) -> None:
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise ValidationError("Must be 1 to 255 visible ASCII characters.")


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


class ChatRequestSchema(Schema):
    """The body of POST /api/<user_id>/chat; unknown fields are rejected by name."""

    class Meta:
        unknown = RAISE

    message = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=MESSAGE_MAX_CHARS), validate_not_blank, validate_text],
    )
    conversation_id = fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=CONVERSATION_ID_MAX_CHARS)
    )
    model = fields.String(load_default=None, allow_none=True, validate=[validate.Length(min=1, max=255), validate_text])
    request_id = fields.String(load_default=None, allow_none=True, validate=validate_idempotency_key)

    def __init__(self, *, default_model: str, allowed_models=None, **kwargs):
        super().__init__(**kwargs)
        self.default_model = default_model
        self.allowed_models = allowed_models

    @validates("model")
    def validate_model(self, value, **_kwargs):
        if value is not None and self.allowed_models and value not in self.allowed_models:
            raise ValidationError(f"Must be one of: {', '.join(self.allowed_models)}.")

    def load(self, data, **kwargs):
        """Validated request with `model` defaulted; a non-object body is a field-less 400."""
        if not isinstance(data, dict):
            raise ValidationError("Request body must be a JSON object.", field_name="_schema")
        result = super().load(data, **kwargs)
        if result["model"] is None:
            result["model"] = self.default_model
        return result


class PathUserSchema(Schema):
    """The user id in the path: 1 to 255 characters."""

    user_id = fields.String(required=True, validate=[validate.Length(min=1, max=USER_ID_MAX_CHARS), validate_text])


class ChatResponseSchema(Schema):
    """The answer to a chat turn."""

    conversation_id = fields.String()
    message = fields.String()
    role = fields.String()
    created_at = fields.DateTime(format="iso")
    usage = fields.Dict(allow_none=True)
    message_id = fields.String()
    model = fields.String()
