"""Step 2: verify the bearer JWT with flask-jwt-extended and match its identity to the path."""
import threading
import time
from datetime import timedelta

from flask import Flask, current_app, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt import ExpiredSignatureError, PyJWTError

from chatapp.errors import ApiError, AuthenticationRequired, Forbidden, InvalidToken, TokenExpired, error_response
from chatapp.request_ids import current_request_id


def bearer_token() -> str:
    """The token of `Authorization: Bearer <token>`; the scheme word is case-insensitive (RFC 7235)."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationRequired()
    if " " in token:
        raise InvalidToken("Malformed Authorization header")
    return token


class VerifiedTokens:
    """The claims of tokens this process has verified, by token, for the next turns that send them.

    A client sends the same token with every turn, and verifying it (flask-jwt-extended parses it
    three times, then the HMAC) was a fourteenth of a turn's CPU. Only a token that passed every
    check is kept, and the one check that time can undo, the expiry, is made again on every use."""

    MAX_TOKENS = 1024  # about 1 KB each

    def __init__(self, leeway: float | timedelta = 0):
        self._leeway = leeway.total_seconds() if isinstance(leeway, timedelta) else leeway
        self._claims: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> dict | None:
        claims = self._claims.get(token)
        if claims is None:
            return None
        if claims["exp"] <= time.time() - self._leeway:  # PyJWT's own test
            raise TokenExpired()
        return claims

    def add(self, token: str, claims: dict) -> None:
        with self._lock:  # the only writer: readers never see the dict change under an iteration
            if len(self._claims) >= self.MAX_TOKENS:
                del self._claims[next(iter(self._claims))]  # the oldest
            self._claims[token] = claims


def verify_token(token: str) -> dict:
    """The token's claims after every check the contract asks for; ApiError otherwise."""
    verified = current_app.extensions["verified_tokens"]
    claims = verified.get(token)
    if claims is None:
        claims = _verify(token)
        verified.add(token, claims)
    return claims


def _verify(token: str) -> dict:
    try:
        # decode_token applies the app's JWT settings: the one algorithm, key, aud/iss, nbf/iat, leeway.
        claims = decode_token(token)
    except ExpiredSignatureError:
        raise TokenExpired() from None
    except (PyJWTError, JWTExtendedException, ValueError, TypeError):
        # ValueError/TypeError: key material that does not fit the algorithm must not become a 500.
        raise InvalidToken() from None
    if "exp" not in claims:
        raise InvalidToken("Token has no expiry")
    identity = claims.get(current_app.config["JWT_IDENTITY_CLAIM"])
    if not isinstance(identity, str) or not identity:
        raise InvalidToken("Token has no valid identity")
    return claims


def authenticate(user_id: str) -> str:
    """The authenticated user id, which must be the path's `user_id` (401 or 403 otherwise)."""
    claims = verify_token(bearer_token())
    identity = claims[current_app.config["JWT_IDENTITY_CLAIM"]]
    if identity != user_id:
        raise Forbidden()
    return identity


def register_auth(app: Flask, jwt) -> None:
    """flask-jwt-extended on the app, its loaders replaced, and this process's verified tokens."""
    jwt.init_app(app)
    register_jwt_loaders(jwt)
    app.extensions["verified_tokens"] = VerifiedTokens(app.config["JWT_DECODE_LEEWAY"])


def register_jwt_loaders(jwt) -> None:
    """flask-jwt-extended's own failure answers (422 {"msg"}) replaced by the contract's 401s."""

    def answer(error: ApiError):
        return error_response(error, current_request_id())

    jwt.unauthorized_loader(lambda _reason: answer(AuthenticationRequired()))
    jwt.invalid_token_loader(lambda _reason: answer(InvalidToken()))
    jwt.expired_token_loader(lambda _header, _payload: answer(TokenExpired()))
    jwt.token_verification_failed_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.user_lookup_error_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.revoked_token_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.needs_fresh_token_loader(lambda _header, _payload: answer(InvalidToken()))
