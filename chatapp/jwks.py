"""The identity provider's key set (JWT_JWKS_URL, or the jwks_uri of JWT_OIDC_ISSUER's discovery
document), fetched and cached by each process, and the choice of the key that may verify a token.

The policy: fetched on first use, not at start; kept JWT_JWKS_CACHE_SECONDS, then refreshed at
the next use; a token whose `kid` is unknown refreshes it at most once per
JWT_JWKS_MIN_REFRESH_SECONDS; a fetch that fails (unreachable, slower than JWT_JWKS_TIMEOUT in all,
not 200, not a JSON key set, over 1 MiB) keeps the keys already cached, and is tried again no
sooner than that interval; one thread fetches at a time, the others go on with the cached keys,
or wait for that fetch when there are none yet. The token's jku, x5u, jwk and x5c headers are
never looked at.

PyJWT's PyJWKClient (2.15.1, read before choosing) does not keep to it: its cool-down for unknown
kids counts from the last successful fetch, so while the provider is down every unknown kid
fetches again; its cache forgets the keys once their lifespan is over, so an outage longer than
that fails every token; it holds one lock across the fetch, so threads with good cached keys wait
behind a slow provider; and its timeout bounds each read, with no cap on the size. Its key parsing
(PyJWK, PyJWKSet) is what this module uses.
"""
import json
import logging
import threading
import time
from collections.abc import Callable

import requests
from jwt import PyJWK
from jwt.exceptions import PyJWTError

from chatapp.errors import InvalidToken, ServiceUnavailable
from config import https_or_loopback

log = logging.getLogger(__name__)

MAX_BYTES = 1024 * 1024
READ_BYTES = 64 * 1024
# What kind of key (and curve) each algorithm is verified with.
KEY_TYPES = {
    **{algorithm: ("RSA", None) for algorithm in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", {"P-256"}),
    "ES384": ("EC", {"P-384"}),
    "ES512": ("EC", {"P-521"}),
    "EdDSA": ("OKP", {"Ed25519", "Ed448"}),
}


class FetchFailed(Exception):
    """A key set (or discovery document) could not be had; the message says why, never a body."""


def fetch_json(url: str, deadline: float) -> object:
    """GET `url` and decode its JSON, by the monotonic `deadline` (a server that drips bytes
    included) and within MAX_BYTES; FetchFailed otherwise. Redirects are not followed."""
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        raise FetchFailed("timeout")
    try:
        with requests.get(url, stream=True, timeout=(timeout, timeout), allow_redirects=False,
                          headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise FetchFailed(f"status {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_BYTES:
                raise FetchFailed("over 1 MiB")
            body = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FetchFailed("timeout")
                sock = getattr(response.raw.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.raw.read1(READ_BYTES)
                if not chunk:
                    break
                body += chunk
                if len(body) > MAX_BYTES:
                    raise FetchFailed("over 1 MiB")
    except FetchFailed:
        raise
    except (requests.Timeout, TimeoutError):
        raise FetchFailed("timeout") from None
    except (requests.RequestException, OSError) as exc:
        raise FetchFailed(type(exc).__name__) from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise FetchFailed("not JSON") from None


class Key:
    """One key of the set: the JWK as published and the key PyJWT built from it."""

    def __init__(self, jwk: dict, parsed: PyJWK):
        self.jwk = jwk
        self.key = parsed.key
        self.kid = jwk.get("kid")
        # What identifies the key across refreshes (a token verified with it stays verified while
        # the set still holds it).
        self.identity = json.dumps(jwk, sort_keys=True)

    def fits(self, algorithm: str) -> bool:
        """Whether this key may verify a token of `algorithm`: its kty (and crv) fit, its own alg,
        when present, is that one, and its use, when present, is sig."""
        kty, curves = KEY_TYPES[algorithm]
        return (self.jwk.get("kty") == kty and (curves is None or self.jwk.get("crv") in curves)
                and self.jwk.get("alg", algorithm) == algorithm and self.jwk.get("use", "sig") == "sig")


def parse_key_set(data: object) -> list[Key]:
    """The usable keys of a JSON Web Key Set; FetchFailed when it is not one or none is usable."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise FetchFailed("not a JSON Web Key Set")
    keys = []
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # secret (oct) keys never verify here; unknown kinds are skipped
        try:
            keys.append(Key(jwk, PyJWK(jwk, algorithm=_parse_algorithm(jwk))))
        except (PyJWTError, ValueError, TypeError, KeyError):
            continue
    if not keys:
        raise FetchFailed("no usable key")
    return keys


def _parse_algorithm(jwk: dict) -> str | None:
    """The algorithm PyJWK builds the key for: the key's own, or one its kind serves (the key is
    checked against the token's algorithm when it is chosen)."""
    if jwk.get("alg") in KEY_TYPES:
        return jwk["alg"]
    return {"RSA": "RS256", "EC": {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(jwk.get("crv")),
            "OKP": "EdDSA"}[jwk["kty"]]


class KeySet:
    """The keys of one identity provider, for one process (see the module's docstring)."""

    def __init__(self, *, jwks_url: str | None = None, issuer: str | None = None, algorithms: list[str],
                 cache_seconds: float, min_refresh_seconds: float, timeout: float,
                 on_fetch: Callable[[str], None] = lambda outcome: None, clock=time.monotonic):
        self._jwks_url = jwks_url
        self._issuer = issuer
        self.algorithms = list(algorithms)
        self.cache_seconds = cache_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.timeout = timeout
        self._on_fetch = on_fetch
        self._clock = clock
        self._keys: list[Key] | None = None
        self._identities: frozenset[str] = frozenset()
        self._fetched_at = float("-inf")  # the last fetch that succeeded
        self._attempted_at = float("-inf")  # the last fetch, whatever came of it
        self._fetching = False
        self._fetch_ends = 0.0
        self._changed = threading.Condition()

    # Choosing the key ---------------------------------------------------------------------

    def key_for(self, header: dict) -> Key:
        """The key that may verify a token with this (unverified) header; 401 invalid_token when
        none may, 503 service_unavailable when no key set could ever be fetched."""
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise InvalidToken("Token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("Malformed key id")
        keys = self._keys_now()
        key = self._choose(keys, kid, algorithm)
        if key is None and kid is not None and all(candidate.kid != kid for candidate in keys):
            # A kid the set does not know: the provider may have rotated its keys.
            if self._refresh_for_unknown_kid():
                key = self._choose(self._keys or [], kid, algorithm)
        if key is None:
            raise InvalidToken("No key of the identity provider verifies this token")
        return key

    def holds(self, identity: str) -> bool:
        """Whether the key of this identity is still in the set (the verified-token cache asks):
        this use refreshes the set too, once its cache period is over."""
        self._keys_now()
        return identity in self._identities

    @staticmethod
    def _choose(keys: list[Key], kid: str | None, algorithm: str) -> Key | None:
        if kid is None:
            usable = [key for key in keys if key.fits(algorithm)]
            return usable[0] if len(usable) == 1 else None  # without a kid, only a set of one
        for key in keys:
            if key.kid == kid:
                return key if key.fits(algorithm) else None
        return None

    # Fetching -----------------------------------------------------------------------------

    def _keys_now(self) -> list[Key]:
        """The cached keys, refreshed first when their time is up (by this thread, if no other is
        fetching and the interval allows); when there are none, fetched, or waited for."""
        with self._changed:
            while True:
                now = self._clock()
                fresh = now < self._fetched_at + self.cache_seconds
                if self._keys is not None and (fresh or self._fetching or not self._may_attempt(now)):
                    return self._keys
                if self._fetching:  # no keys yet: wait for the fetch in flight, within its deadline
                    if now >= self._fetch_ends:
                        raise self._unavailable(now)
                    self._changed.wait(self._fetch_ends - now)
                    continue
                if not self._may_attempt(now):
                    raise self._unavailable(now)
                self._begin_fetch(now)
                break
        self._fetch()
        if self._keys is None:
            raise self._unavailable(self._clock())
        return self._keys

    def _refresh_for_unknown_kid(self) -> bool:
        """Fetch again for an unknown kid, unless a fetch is in flight or one was tried too lately."""
        with self._changed:
            now = self._clock()
            if self._fetching or not self._may_attempt(now):
                return False
            self._begin_fetch(now)
        return self._fetch()

    def _may_attempt(self, now: float) -> bool:
        return now >= self._attempted_at + self.min_refresh_seconds

    def _begin_fetch(self, now: float) -> None:
        self._fetching, self._fetch_ends, self._attempted_at = True, now + self.timeout, now

    def _unavailable(self, now: float) -> ServiceUnavailable:
        wait = max(1.0, self._attempted_at + self.min_refresh_seconds - now)
        return ServiceUnavailable("The identity provider's keys could not be fetched", retry_after=wait)

    def _fetch(self) -> bool:
        """The fetch this thread began; True when it brought a key set."""
        keys, deadline = None, time.monotonic() + self.timeout
        try:
            keys = parse_key_set(fetch_json(self._key_set_url(deadline), deadline))
            log.info("identity provider key set fetched: %d usable keys", len(keys))
        except Exception as exc:  # FetchFailed says why; anything else must not leave the others waiting
            reason = str(exc) if isinstance(exc, FetchFailed) else type(exc).__name__
            log.warning("identity provider key set fetch failed (%s): %s", reason,
                        "the cached keys go on" if self._keys is not None else "no keys yet")
        self._on_fetch("ok" if keys is not None else "error")
        with self._changed:
            self._fetching = False
            if keys is not None:
                self._keys, self._identities = keys, frozenset(key.identity for key in keys)
                self._fetched_at = self._clock()
            self._changed.notify_all()
        return keys is not None

    def _key_set_url(self, deadline: float) -> str:
        """JWT_JWKS_URL, or the jwks_uri of the issuer's discovery document (kept once read)."""
        if self._jwks_url is None:
            discovery = fetch_json(self._issuer.rstrip("/") + "/.well-known/openid-configuration", deadline)
            if not isinstance(discovery, dict) or discovery.get("issuer") != self._issuer:
                raise FetchFailed("a discovery document of another issuer")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not https_or_loopback(jwks_uri):
                raise FetchFailed("no https jwks_uri in the discovery document")
            self._jwks_url = jwks_uri
        return self._jwks_url
