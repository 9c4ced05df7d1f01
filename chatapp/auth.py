"""Step 2: verify the bearer JWT with flask-jwt-extended and match its identity to the path. The
key is the shared secret, one PEM public key, or the identity provider's key set (chatapp/jwks.py,
through flask-jwt-extended's decode_key_loader)."""
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from flask import Flask, current_app, g, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.default_callbacks import default_decode_key_callback
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt import ExpiredSignatureError, PyJWTError

from chatapp.errors import ApiError, AuthenticationRequired, Forbidden, InvalidToken, TokenExpired, error_response
from chatapp.jwks import KeySet
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

    Stands in for flask-jwt-extended's decode_token on every request: a client sends the same token
    with every turn, and verifying it (flask-jwt-extended parses it three times, then the
    signature) was a fourteenth of a turn's CPU (bench/turn_cost.py's profile); measured again,
    5-11% fewer turns a second without this (bench/results/2026-12-02-libraries.md). Only a token that
    passed every check is kept; the expiry is checked again on every use, and a token verified by
    a key of the identity provider's set is kept only while the set still holds that key."""

    MAX_TOKENS = 1024  # about 1 KB each

    def __init__(self, leeway: float | timedelta = 0):
        self._leeway = leeway.total_seconds() if isinstance(leeway, timedelta) else leeway
        self._entries: dict[str, tuple[dict, str | None]] = {}
        self._lock = threading.Lock()

    def get(self, token: str, key_set: KeySet | None) -> dict | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        claims, key_identity = entry
        if key_identity is not None and (key_set is None or not key_set.holds(key_identity)):
            self._entries.pop(token, None)  # the key left the set: verify it again (and fail)
            return None
        if claims["exp"] <= time.time() - self._leeway:  # PyJWT's own test
            raise TokenExpired()
        return claims

    def add(self, token: str, claims: dict, key_identity: str | None) -> None:
        with self._lock:  # the only writer: readers never see the dict change under an iteration
            if len(self._entries) >= self.MAX_TOKENS:
                del self._entries[next(iter(self._entries))]  # the oldest
            self._entries[token] = (claims, key_identity)


def verify_token(token: str) -> dict:
    """The token's claims after every check the contract asks for; ApiError otherwise."""
    verified = current_app.extensions["verified_tokens"]
    key_set = current_app.extensions.get("key_set")
    claims = verified.get(token, key_set)
    if claims is None:
        claims, key_identity = _verify(token)
        verified.add(token, claims, key_identity)
    return claims


def _verify(token: str) -> tuple[dict, str | None]:
    """The claims, and the identity of the key set's key that verified them (None: the secret or
    the public key)."""
    g.pop("verifying_key", None)
    try:
        # decode_token applies the app's JWT settings: the algorithms, the key (decode_key below),
        # iss, nbf/iat, the leeway.
        claims = decode_token(token)
    except ExpiredSignatureError:
        raise TokenExpired() from None
    except (PyJWTError, JWTExtendedException, ValueError, TypeError):
        # ValueError/TypeError: key material that does not fit the algorithm must not become a 500.
        raise InvalidToken() from None
    config = current_app.config
    if "exp" not in claims:
        raise InvalidToken("Token has no expiry")
    if claims.get("type", "access") != "access":  # a refresh token is no access token
        raise InvalidToken("Not an access token")
    if config["TOKEN_AUDIENCES"] and not _audience_matches(claims.get(config["JWT_AUDIENCE_CLAIM"]), config["TOKEN_AUDIENCES"]):
        raise InvalidToken("Token is for another audience")
    identity = claims.get(config["JWT_IDENTITY_CLAIM"])
    if not isinstance(identity, str) or not identity:
        raise InvalidToken("Token has no valid identity")
    key = g.pop("verifying_key", None)
    return claims, key.identity if key is not None else None


def _audience_matches(value, allowed: list[str]) -> bool:
    """One of the token's audiences (a string or a list of them) is allowed."""
    audiences = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return any(isinstance(audience, str) and audience in allowed for audience in audiences)


def decode_key(headers: dict, claims: dict):
    """flask-jwt-extended's decode_key_loader: with a key set, the key its kid (and alg) choose,
    noted for the verified-token cache; else the secret or the public key."""
    key_set = current_app.extensions.get("key_set")
    if key_set is None:
        return default_decode_key_callback(headers, claims)
    key = key_set.key_for(headers)
    g.verifying_key = key
    return key.key


def authenticate(user_id: str) -> str:
    """The authenticated user id, which must be the path's `user_id` (401 or 403 otherwise)."""
    claims = verify_token(bearer_token())
    identity = claims[current_app.config["JWT_IDENTITY_CLAIM"]]
    if identity != user_id:
        raise Forbidden()
    return identity


def register_auth(app: Flask, jwt, *, on_key_set_fetch: Callable[[str], None]) -> None:
    """flask-jwt-extended on the app, its loaders replaced; the identity provider's key set when one
    is configured (`on_key_set_fetch` hears of each fetch); this process's verified tokens."""
    jwt.init_app(app)
    register_jwt_loaders(jwt)
    config = app.config
    if config["JWT_JWKS_URL"] or config["JWT_OIDC_ISSUER"]:
        app.extensions["key_set"] = KeySet(
            jwks_url=config["JWT_JWKS_URL"], issuer=config["JWT_OIDC_ISSUER"], algorithms=config["JWT_DECODE_ALGORITHMS"],
            cache_seconds=config["JWT_JWKS_CACHE_SECONDS"], min_refresh_seconds=config["JWT_JWKS_MIN_REFRESH_SECONDS"],
            timeout=config["JWT_JWKS_TIMEOUT"], on_fetch=on_key_set_fetch)
    app.extensions["verified_tokens"] = VerifiedTokens(config["JWT_DECODE_LEEWAY"])


def register_jwt_loaders(jwt) -> None:
    """flask-jwt-extended's own failure answers (422 {"msg"}) replaced by the contract's 401s."""

    def answer(error: ApiError):
        return error_response(error, current_request_id())

    jwt.decode_key_loader(decode_key)
    jwt.unauthorized_loader(lambda _reason: answer(AuthenticationRequired()))
    jwt.invalid_token_loader(lambda _reason: answer(InvalidToken()))
    jwt.expired_token_loader(lambda _header, _payload: answer(TokenExpired()))
    jwt.token_verification_failed_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.user_lookup_error_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.revoked_token_loader(lambda _header, _payload: answer(InvalidToken()))
    jwt.needs_fresh_token_loader(lambda _header, _payload: answer(InvalidToken()))
