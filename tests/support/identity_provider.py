"""A real identity provider on loopback, for the tests: an OpenID Connect discovery document, a
JSON Web Key Set of keys made with cryptography (RSA 2048, EC P-256, Ed25519), tokens signed with
them, switches to rotate keys, go down, answer slowly, answer garbage or a huge body, and counts of
the fetches it served."""
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ALGORITHMS_OF = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


@dataclass
class SigningKey:
    """A private key of the provider, and the public JWK it publishes (`jwk` may be edited)."""

    kind: str
    kid: str
    private: object
    jwk: dict = field(default_factory=dict)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_key(kind: str, kid: str | None = None) -> SigningKey:
    kid = kid or f"{kind.lower()}-{uuid.uuid4().hex[:8]}"
    if kind == "RSA":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif kind == "EC":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif kind == "OKP":
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        raise ValueError(kind)
    return SigningKey(kind, kid, private, {**jwk, "kid": kid, "use": "sig"})


class IdentityProvider:
    """The provider's HTTP server and its switches. `mode`: "ok", "down" (503), "garbage" (not
    JSON), "huge" (a key set of 2 MiB), "slow" (each answer after `delay` seconds)."""

    def __init__(self):
        self.keys: list[SigningKey] = []
        self.mode = "ok"
        self.delay = 0.0
        self.fetches = 0  # of the key set
        self.discoveries = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                provider._serve(self)

            def log_message(self, *_args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_port}"
        self.jwks_url = f"{self.issuer}/keys"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "IdentityProvider":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    # The keys -------------------------------------------------------------------------------

    def add_key(self, kind: str = "RSA", kid: str | None = None, **jwk_fields) -> SigningKey:
        key = make_key(kind, kid)
        key.jwk.update(jwk_fields)
        self.keys.append(key)
        return key

    def remove_key(self, key: SigningKey) -> None:
        self.keys.remove(key)

    def token(self, user_id: str = "alice", key: SigningKey | None = None, *, algorithm: str | None = None,
              headers: dict | None = None, expires_in: int = 600, **claims) -> str:
        """A token signed with `key` (the first key by default), its kid in the header."""
        key = key or self.keys[0]
        now = int(time.time())
        payload = {"sub": user_id, "iat": now, "exp": now + expires_in, "iss": self.issuer, **claims}
        payload = {name: value for name, value in payload.items() if value is not ...}
        return jwt.encode(payload, key.private, algorithm=algorithm or ALGORITHMS_OF[key.kind],
                          headers={"kid": key.kid, **(headers or {})})

    # The server -----------------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if handler.path == "/keys":
                self.fetches += 1
            elif handler.path == "/.well-known/openid-configuration":
                self.discoveries += 1
        try:
            if self.delay:
                time.sleep(self.delay)
            if handler.path == "/.well-known/openid-configuration" and self.mode != "down":
                self._send(handler, 200, json.dumps({"issuer": self.issuer, "jwks_uri": self.jwks_url}).encode())
            elif handler.path != "/keys":
                self._send(handler, 404, b"{}")
            elif self.mode == "down":
                self._send(handler, 503, b"down for maintenance")
            elif self.mode == "garbage":
                self._send(handler, 200, b"<html>not a key set</html>")
            elif self.mode == "huge":
                self._send(handler, 200, json.dumps({"keys": [key.jwk for key in self.keys], "pad": "x" * 2 * 1024 * 1024}).encode())
            else:
                self._send(handler, 200, json.dumps({"keys": [key.jwk for key in self.keys]}).encode())
        except OSError:
            pass  # the client gave up
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


class Recorder:
    """An attacker's server on loopback: it records any request it gets (it must get none)."""

    def __init__(self):
        self.requests = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
