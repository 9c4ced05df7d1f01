"""Every row of the contract's error table: status, code, JSON body, headers, and nothing stored."""
import base64
import gc
import hashlib
import hmac
import json
import time

import jwt as pyjwt
import pytest

from tests.support.agent import Raw
from tests.conftest import TEST_SECRET, make_app
from tests.support.assertions import assert_error

UNKNOWN_ID = "5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e"

BAD_BODIES = {
    "not json": ("text/plain", b"hello", None),
    "form encoded": ("application/x-www-form-urlencoded", b"message=hi", None),
    "no content type": (None, b'{"message": "hi"}', None),
    "invalid json": ("application/json", b'{"message": ', None),
    "empty body": ("application/json", b"", None),
    "invalid utf-8": ("application/json", b'{"message": "\xff\xfe"}', None),
    "json null": ("application/json", b"null", None),
    "json array": ("application/json", b'[{"message": "hi"}]', None),
    "json string": ("application/json", b'"hi"', None),
    "NaN": ("application/json", b'{"message": "hi", "model": NaN}', None),
    "Infinity": ("application/json", b'{"message": "hi", "x": -Infinity}', None),
    "a key given twice": ("application/json", b'{"message": "a", "message": "b"}', "message"),
    "a key given twice, inside": ("application/json", b'{"message": "hi", "model": "m", "x": {"k": 1, "k": 2}}', "k"),
    "nested too deep": ("application/json", b'{"message": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "missing message": ("application/json", {}, "message"),
    "empty message": ("application/json", {"message": ""}, "message"),
    "blank message": ("application/json", {"message": " \n\t "}, "message"),
    "message too long": ("application/json", {"message": "x" * 10_001}, "message"),
    "message with NUL": ("application/json", {"message": "a\u0000b"}, "message"),
    "message with lone surrogate": ("application/json", b'{"message": "a\\ud800b"}', "message"),
    "message not a string": ("application/json", {"message": 42}, "message"),
    "message is an object": ("application/json", {"message": {"text": "hi"}}, "message"),
    "message null": ("application/json", {"message": None}, "message"),
    "empty conversation_id": ("application/json", {"message": "hi", "conversation_id": ""}, "conversation_id"),
    "conversation_id too long": ("application/json", {"message": "hi", "conversation_id": "a" * 65}, "conversation_id"),
    "conversation_id not a string": ("application/json", {"message": "hi", "conversation_id": 7}, "conversation_id"),
    "model not a string": ("application/json", {"message": "hi", "model": ["gpt-4"]}, "model"),
    "empty model": ("application/json", {"message": "hi", "model": ""}, "model"),
    "request_id with spaces": ("application/json", {"message": "hi", "request_id": "a b"}, "request_id"),
    "request_id too long": ("application/json", {"message": "hi", "request_id": "k" * 256}, "request_id"),
    "unknown field": ("application/json", {"message": "hi", "temperature": 0.2}, "temperature"),
    "stream as a string": ("application/json", {"message": "hi", "stream": "true"}, "stream"),
    "stream as a number": ("application/json", {"message": "hi", "stream": 1}, "stream"),
    "stream null": ("application/json", {"message": "hi", "stream": None}, "stream"),
}


@pytest.mark.parametrize("content_type, body, field", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_invalid_request(client, auth, agent_server, store, content_type, body, field):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = auth.headers()
    if content_type:
        headers["Content-Type"] = content_type
    # Earlier tests' garbage is collected now, not inside the deep recursion of "nested too deep",
    # where a finalizer's warning could not even be reported.
    gc.collect()
    response = client.post("/api/alice/chat", data=data, headers=headers)

    payload = assert_error(response, 400, "invalid_request")
    if field:
        assert field in payload["errors"]
        assert field in payload["detail"]
    assert agent_server.requests == []
    assert store.counts() == (0, 0)


def test_user_id_too_long(chat, agent_server, store):
    assert_error(chat.post({"message": "hi"}, user_id="u" * 256), 400, "invalid_request")
    assert store.counts() == (0, 0)


def test_validation_comes_before_authentication(client, agent_server, store):
    response = client.post("/api/alice/chat", json={"message": ""})
    assert_error(response, 400, "invalid_request")
    assert "WWW-Authenticate" not in response.headers


def test_payload_too_large(client, auth, agent_server, store):
    response = client.post("/api/alice/chat", json={"message": "x" * 300_000}, headers=auth.headers())
    assert_error(response, 413, "payload_too_large")
    assert store.counts() == (0, 0)


def _now():
    return int(time.time())


def _rsa_keys():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private.decode(), public.decode()


BAD_TOKENS = {
    "malformed": lambda auth: "not-a-jwt",
    "three garbage parts": lambda auth: "abc.def.ghi",
    "bad signature": lambda auth: auth.token(key="another-secret-that-is-also-long-enough-for-every-algorithm-0123"),
    "alg none": lambda auth: pyjwt.encode({"sub": "alice", "exp": _now() + 600}, None, algorithm="none"),
    "other HMAC algorithm": lambda auth: auth.token(algorithm="HS512"),
    "no exp": lambda auth: auth.token(expires_in=None),
    "no identity": lambda auth: auth.token(sub=...),
    "numeric identity": lambda auth: pyjwt.encode({"sub": 42, "exp": _now() + 600}, TEST_SECRET, algorithm="HS256"),
    "empty identity": lambda auth: auth.token(""),
    "nbf in the future": lambda auth: auth.token(nbf=_now() + 3600),
    "iat in the future": lambda auth: auth.token(iat=_now() + 3600),
    "non-numeric exp": lambda auth: auth.token(exp="tomorrow"),
    "two tokens": lambda auth: auth.token() + " " + auth.token(),
}


@pytest.mark.parametrize("make_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_invalid_token(client, auth, agent_server, store, make_token):
    response = client.post("/api/alice/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {make_token(auth)}"})
    assert_error(response, 401, "invalid_token")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert agent_server.requests == []
    assert store.counts() == (0, 0)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": ""}, {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, {"Authorization": "Bearer"}, {"Authorization": "Token abc"}],
    ids=["no header", "empty header", "basic scheme", "scheme only", "other scheme"],
)
def test_authentication_required(client, agent_server, store, headers):
    response = client.post("/api/alice/chat", json={"message": "hi"}, headers=headers)
    body = assert_error(response, 401, "authentication_required")
    assert body["detail"] == "Authentication required"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert store.counts() == (0, 0)


def test_expired_token(client, auth, agent_server, store):
    token = auth.token(exp=_now() - 60, iat=_now() - 120, nbf=_now() - 120)
    response = client.post("/api/alice/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 401, "token_expired")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert store.counts() == (0, 0)


def count_verifications(monkeypatch):
    from chatapp import auth as auth_module

    verified = []
    real_verify = auth_module._verify
    monkeypatch.setattr(auth_module, "_verify", lambda token: verified.append(token) or real_verify(token))
    return verified


def test_a_token_is_verified_once_and_its_expiry_on_every_use(chat, auth, agent_server, store, monkeypatch):
    import chatapp.auth as auth_module

    verified = count_verifications(monkeypatch)
    token = auth.token(expires_in=60)
    headers = {"Authorization": f"Bearer {token}"}
    conversation_id = chat.turn("one", headers=headers)["conversation_id"]
    chat.turn("two", conversation_id=conversation_id, headers=headers)
    assert verified == [token]

    # An hour later the same token, already verified, has expired: it is refused all the same.
    later = time.time() + 3600
    monkeypatch.setattr(auth_module.time, "time", lambda: later)
    response = chat.post({"message": "three", "conversation_id": conversation_id}, headers=headers)
    assert_error(response, 401, "token_expired")
    assert verified == [token]
    assert store.counts() == (1, 4)


def test_a_token_that_failed_is_checked_again_and_fails_again(client, auth, agent_server, store, monkeypatch):
    verified = count_verifications(monkeypatch)
    forged = auth.token(key="another-secret-of-at-least-32-bytes!!")
    for _ in range(2):
        response = client.post("/api/alice/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {forged}"})
        assert_error(response, 401, "invalid_token")
    assert verified == [forged, forged]
    assert store.counts() == (0, 0)


def test_verified_tokens_are_bounded(app, auth, monkeypatch):
    from chatapp.auth import VerifiedTokens, verify_token

    monkeypatch.setattr(VerifiedTokens, "MAX_TOKENS", 3)
    with app.app_context():
        tokens = [auth.token(f"user-{n}") for n in range(5)]
        for token in tokens:
            verify_token(token)
        kept = app.extensions["verified_tokens"]._entries
        assert list(kept) == tokens[2:]


def test_other_users_path_is_forbidden(client, auth, agent_server, store):
    response = client.post("/api/bob/chat", json={"message": "hi"}, headers=auth.headers("alice"))
    body = assert_error(response, 403, "forbidden")
    assert body["detail"] == "Cannot access another user's chat"
    assert agent_server.requests == []
    assert store.counts() == (0, 0)


def test_identity_is_compared_exactly(client, auth, agent_server, store):
    response = client.post("/api/Alice/chat", json={"message": "hi"}, headers=auth.headers("alice"))
    assert_error(response, 403, "forbidden")


class TestAsymmetricKeys:
    """RS256 tokens from an identity provider, verified with JWT_PUBLIC_KEY only."""

    keys = _rsa_keys()

    @pytest.fixture
    def config_overrides(self):
        return {"JWT_ALGORITHM": "RS256", "JWT_DECODE_ALGORITHMS": ["RS256"], "JWT_PUBLIC_KEY": self.keys[1]}

    def test_rs256_token_is_accepted(self, client, auth, agent_server, store):
        token = auth.token(key=self.keys[0], algorithm="RS256")
        response = client.post("/api/alice/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert store.counts() == (1, 2)

    def test_hs256_token_signed_with_the_public_key_is_rejected(self, client, agent_server, store):
        # The classic key-confusion attack: the public key used as an HMAC secret.
        token = pyjwt.encode({"sub": "alice", "exp": _now() + 600}, TEST_SECRET, algorithm="HS256")
        header, payload, _ = token.split(".")
        signature = hmac.new(self.keys[1].encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
        forged = f"{header}.{payload}." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        response = client.post("/api/alice/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {forged}"})
        assert_error(response, 401, "invalid_token")
        assert store.counts() == (0, 0)


class TestAudienceAndIssuer:
    @pytest.fixture
    def config_overrides(self):
        return {"JWT_DECODE_AUDIENCE": "chatapp", "JWT_DECODE_ISSUER": "https://id.example"}

    @pytest.mark.parametrize(
        "claims, status",
        [
            ({"aud": "chatapp", "iss": "https://id.example"}, 200),
            ({"aud": "other", "iss": "https://id.example"}, 401),
            ({"aud": "chatapp", "iss": "https://evil.example"}, 401),
            ({"iss": "https://id.example"}, 401),
            ({"aud": "chatapp"}, 401),
        ],
    )
    def test_audience_and_issuer_are_checked(self, client, auth, agent_server, claims, status):
        response = client.post("/api/alice/chat", json={"message": "hi"}, headers=auth.headers(**claims))
        assert response.status_code == status
        if status == 401:
            assert_error(response, 401, "invalid_token")


@pytest.mark.parametrize(
    "conversation_id",
    [UNKNOWN_ID, "not-a-uuid", "5b0b6c1e2f4e4a539d1a8f0c3c1f2b7e", "{5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e}", "' OR 1=1 --", "\u00e9" * 64],
    ids=["unknown", "malformed", "bare hex", "braced", "sql", "non-ascii"],
)
def test_conversation_not_found(chat, agent_server, store, conversation_id):
    response = chat.post({"message": "hi", "conversation_id": conversation_id})
    body = assert_error(response, 404, "conversation_not_found")
    assert body["detail"] == "Conversation not found"
    assert agent_server.requests == []
    assert store.counts() == (0, 0)


def test_another_users_conversation_is_not_found(chat, agent_server, store):
    conversation_id = chat.turn("mine", user_id="bob")["conversation_id"]
    response = chat.post({"message": "hi", "conversation_id": conversation_id}, user_id="alice")
    assert_error(response, 404, "conversation_not_found")
    assert store.counts() == (1, 2)


AGENT_FAILURES = {
    "500": [Raw(status=500, body=b'{"error": "boom at http://agent.internal key=sk-secret"}')],
    "503 twice": [Raw(status=503, body=b"busy"), Raw(status=503, body=b"busy")],
    "429": [Raw(status=429, body=b"slow down", headers={"Retry-After": "0"})] * 2,
    "malformed": [Raw(status=200, body=b"<html>oops</html>")],
    "no choices": [Raw(status=200, body=b'{"object": "chat.completion"}')],
    "null content": [Raw(status=200, body=b'{"choices": [{"message": {"role": "assistant", "content": null}}]}')],
}


@pytest.mark.parametrize("behaviours", AGENT_FAILURES.values(), ids=AGENT_FAILURES.keys())
def test_agent_failure_stores_nothing(chat, agent_server, store, behaviours):
    agent_server.enqueue(*behaviours)
    response = chat.post({"message": "hi"})
    body = assert_error(response, 503, "agent_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    text = response.get_data(as_text=True)
    assert agent_server.url not in text and "127.0.0.1" not in text and "sk-secret" not in text and "boom" not in text
    assert set(body) == {"detail", "code", "request_id"}
    assert store.counts() == (0, 0)


def test_agent_failure_on_an_existing_conversation_stores_nothing(chat, agent_server, store):
    conversation_id = chat.turn("one")["conversation_id"]
    agent_server.enqueue(Raw(status=500, body=b"{}"))
    assert_error(chat.post({"message": "two", "conversation_id": conversation_id}), 503, "agent_unavailable")
    assert store.counts() == (1, 2)
    assert store.conversation(conversation_id).message_count == 2


@pytest.mark.parametrize("config_overrides", [{"AGENT_URL": None}])
def test_agent_refusing_connections(app, chat, store, config_overrides):
    from chatapp.agent import OpenAIChatAgent
    from tests.support.agent import closed_port_url

    app.extensions["chat_service"].agent = OpenAIChatAgent(
        closed_port_url(), connect_timeout=0.2, timeout=0.5, max_retries=1, max_response_bytes=1048576, stream_timeout=5)
    assert_error(chat.post({"message": "hi"}), 503, "agent_unavailable")
    assert store.counts() == (0, 0)


def test_agent_failure_uses_the_agents_retry_after(chat, agent_server, store):
    agent_server.enqueue(*[Raw(status=503, body=b"", headers={"Retry-After": "120"})] * 3)
    response = chat.post({"message": "hi"})
    assert_error(response, 503, "agent_unavailable")
    assert int(response.headers["Retry-After"]) >= 60


UNREACHABLE_DATABASES = {
    "sqlite": "sqlite:////nonexistent-directory/chatapp.db",
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=1",
}


@pytest.mark.parametrize("url", UNREACHABLE_DATABASES.values(), ids=UNREACHABLE_DATABASES.keys())
@pytest.mark.parametrize("path, body", [("/api/alice/chat", {"message": "hi"}), ("/readyz", None)])
def test_database_unreachable(agent_server, auth, url, path, body):
    app = make_app(SQLALCHEMY_DATABASE_URI=url, AGENT_URL=agent_server.url)
    client = app.test_client()
    response = client.post(path, json=body, headers=auth.headers()) if body else client.get(path)
    assert_error(response, 503, "service_unavailable")
    assert response.headers["Retry-After"]


def test_unknown_route(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/api/alice/chat/extra"), 404, "not_found")


def test_method_not_allowed(client, auth):
    response = client.get("/api/alice/chat", headers=auth.headers())
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unexpected_error_is_a_json_500_and_is_logged(app, chat, store, caplog):
    class BrokenAgent:
        def run(self, messages, model, request_id=None):
            raise RuntimeError("a bug")

    app.extensions["chat_service"].agent = BrokenAgent()
    response = chat.post({"message": "hi"}, headers={"X-Request-ID": "trace-me-123"})

    body = assert_error(response, 500, "internal_error")
    assert body == {"detail": "Internal server error", "code": "internal_error", "request_id": "trace-me-123"}
    assert "a bug" not in response.get_data(as_text=True)
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.request_id == "trace-me-123"
    assert record.exc_info and "a bug" in str(record.exc_info[1])
    assert store.counts() == (0, 0)


@pytest.mark.parametrize(
    "sent, echoed",
    [("abc-123", True), ("x" * 128, True), ("x" * 129, False), ("has space", False), ("ünïcode", False), ("", False)],
)
def test_request_id(client, sent, echoed):
    response = client.get("/nowhere", headers={"X-Request-ID": sent})
    returned = response.headers["X-Request-ID"]
    assert (returned == sent) is echoed
    assert 1 <= len(returned) <= 128
    assert response.get_json()["request_id"] == returned
