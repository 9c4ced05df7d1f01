"""Tokens from an identity provider of our own on loopback: key sets by URL and by OpenID Connect
discovery, rotation, outages, slow and hostile providers, attacks on the key choice."""
import base64
import hashlib
import hmac
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import jwt as pyjwt
import pytest
import requests

from chatapp.extensions import db
from tests.conftest import make_app
from tests.support.assertions import assert_error, metric
from tests.support.identity_provider import IdentityProvider, Recorder
from tests.support.live_server import LiveServer


@pytest.fixture
def provider():
    with IdentityProvider() as server:
        server.add_key("RSA")
        yield server


def key_set_settings(provider, *, oidc=False, algorithms=("RS256", "ES256", "EdDSA"), **settings):
    """The settings of an app whose tokens come from `provider`, as config.py would derive them."""
    source = {"JWT_OIDC_ISSUER": provider.issuer, "JWT_DECODE_ISSUER": provider.issuer} if oidc else {"JWT_JWKS_URL": provider.jwks_url}
    return {
        **source,
        "JWT_DECODE_ALGORITHMS": list(algorithms),
        "JWT_ALGORITHM": algorithms[0],
        "JWT_JWKS_CACHE_SECONDS": 300.0,
        "JWT_JWKS_MIN_REFRESH_SECONDS": 30.0,
        "JWT_JWKS_TIMEOUT": 1.0,
        **settings,
    }


@pytest.fixture
def make_jwks_app(database_uri, agent_server):
    apps = []

    def make(provider, **settings):
        app = make_app(SQLALCHEMY_DATABASE_URI=database_uri, AGENT_URL=agent_server.url, RATE_LIMIT="100000 per minute",
                       **key_set_settings(provider, **settings))
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


def turn(client, token, user_id="alice"):
    return client.post(f"/api/{user_id}/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("oidc", [False, True], ids=["jwks url", "oidc issuer"])
@pytest.mark.parametrize("kind", ["RSA", "EC", "OKP"])
def test_tokens_verify_by_the_key_set(make_jwks_app, provider, kind, oidc):
    key = provider.add_key(kind)
    client = make_jwks_app(provider, oidc=oidc).test_client()
    assert turn(client, provider.token(key=key)).status_code == 200
    assert turn(client, provider.token(key=key)).status_code == 200
    assert provider.fetches == 1  # on first use, then from the cache
    assert provider.discoveries == (1 if oidc else 0)


def test_the_oidc_issuer_must_be_the_tokens_iss(make_jwks_app, provider):
    client = make_jwks_app(provider, oidc=True).test_client()
    assert_error(turn(client, provider.token(iss="https://elsewhere.example")), 401, "invalid_token")
    assert_error(turn(client, provider.token(iss=...)), 401, "invalid_token")


def test_ps256_only_when_listed(make_jwks_app, provider):
    rsa_without_alg = provider.keys[0]
    token = provider.token(key=rsa_without_alg, algorithm="PS256")
    assert_error(turn(make_jwks_app(provider).test_client(), token), 401, "invalid_token")
    assert turn(make_jwks_app(provider, algorithms=("RS256", "PS256")).test_client(), token).status_code == 200


def test_a_rotated_key_verifies_without_a_restart_and_a_removed_one_stops(make_jwks_app, provider):
    app = make_jwks_app(provider, JWT_JWKS_CACHE_SECONDS=0.5, JWT_JWKS_MIN_REFRESH_SECONDS=0.2)
    client = app.test_client()
    old = provider.keys[0]
    old_token = provider.token(key=old)
    assert turn(client, old_token).status_code == 200
    time.sleep(0.25)
    new = provider.add_key("RSA")
    assert turn(client, provider.token(key=new)).status_code == 200  # an unknown kid refreshes the set
    assert provider.fetches == 2

    provider.remove_key(old)
    assert turn(client, old_token).status_code == 200  # cached: until the cache period is over
    time.sleep(0.6)
    assert_error(turn(client, old_token), 401, "invalid_token")  # the verified token went with its key
    assert turn(client, provider.token(key=new)).status_code == 200


def test_unknown_kids_refresh_at_most_once_per_interval(make_jwks_app, provider):
    client = make_jwks_app(provider, JWT_JWKS_MIN_REFRESH_SECONDS=30.0).test_client()
    assert turn(client, provider.token()).status_code == 200
    started = time.monotonic()
    statuses = set()
    for _ in range(1000):
        forged = provider.token(headers={"kid": secrets.token_hex(8)})
        response = turn(client, forged)
        statuses.add((response.status_code, response.get_json()["code"]))
    assert time.monotonic() - started < 30
    assert statuses == {(401, "invalid_token")}
    assert provider.fetches == 1  # the first fetch started the interval: no unknown kid fetched again


def test_a_provider_down_at_start_is_503_then_200_once_it_is_up(make_jwks_app, provider):
    provider.mode = "down"
    app = make_jwks_app(provider, JWT_JWKS_MIN_REFRESH_SECONDS=0.3)  # starts although the provider is down
    client = app.test_client()
    down = turn(client, provider.token())
    assert_error(down, 503, "service_unavailable")
    assert down.headers["Retry-After"] == "1"
    assert_error(turn(client, provider.token()), 503, "service_unavailable")  # within the interval: no fetch
    assert provider.fetches == 1
    provider.mode = "ok"
    time.sleep(0.35)
    assert turn(client, provider.token()).status_code == 200
    assert provider.fetches == 2
    scraped = app.test_client().get("/metrics").get_data(as_text=True)
    assert metric(scraped, "chatapp_jwks_fetch_total", outcome="error") >= 1
    assert metric(scraped, "chatapp_jwks_fetch_total", outcome="ok") >= 1


def test_cached_keys_go_on_while_the_provider_is_down(make_jwks_app, provider):
    client = make_jwks_app(provider, JWT_JWKS_CACHE_SECONDS=0.2, JWT_JWKS_MIN_REFRESH_SECONDS=0.5).test_client()
    assert turn(client, provider.token()).status_code == 200
    provider.mode = "down"
    started, statuses = time.monotonic(), []
    while time.monotonic() - started < 2.0:  # ten times the cache period
        statuses.append(turn(client, provider.token()).status_code)  # a new token each time: no cache of tokens
        time.sleep(0.05)
    assert set(statuses) == {200}
    assert provider.fetches - 1 <= 2.0 / 0.5 + 1  # refreshes retried no more often than the interval


@pytest.mark.parametrize("mode", ["garbage", "huge"])
def test_a_key_set_that_is_not_one_keeps_the_cached_keys(make_jwks_app, provider, mode):
    client = make_jwks_app(provider, JWT_JWKS_CACHE_SECONDS=0.1, JWT_JWKS_MIN_REFRESH_SECONDS=0.1).test_client()
    assert turn(client, provider.token()).status_code == 200
    provider.mode = mode
    time.sleep(0.15)
    assert turn(client, provider.token()).status_code == 200
    assert provider.fetches == 2  # it was fetched, and refused


@pytest.mark.parametrize("mode", ["garbage", "huge"])
def test_a_first_key_set_that_is_not_one_is_503(make_jwks_app, provider, mode):
    provider.mode = mode
    assert_error(turn(make_jwks_app(provider).test_client(), provider.token()), 503, "service_unavailable")


def test_a_slow_provider_waits_no_request_past_the_timeout_and_is_fetched_once(make_jwks_app, provider):
    provider.delay = 2.0
    app = make_jwks_app(provider, JWT_JWKS_TIMEOUT=0.5)

    def timed(_):
        started = time.monotonic()
        status = turn(app.test_client(), provider.token()).status_code
        return status, time.monotonic() - started

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(timed, range(8)))
    assert {status for status, _ in results} == {503}
    assert max(seconds for _, seconds in results) < 0.5 + 0.5
    assert provider.fetches == 1 and provider.most_in_flight == 1


# Attacks --------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def hs256_token(secret: bytes, header: dict, claims: dict) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def with_header(token: str, header: dict) -> str:
    """`token` with another header (its signature no longer fits: the header is what is tested)."""
    _old, payload, signature = token.split(".")
    return f"{b64(json.dumps(header).encode())}.{payload}.{signature}"


def claims():
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 600}


def attacks(provider, attacker):
    """Tokens that must not verify, by name."""
    rsa_key = provider.keys[0]
    pem = rsa_key.public_pem()
    unsigned = f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT', 'kid': rsa_key.kid}).encode())}.{b64(json.dumps(claims()).encode())}."
    attacker_key = provider.add_key("RSA", kid="attackers-own")
    provider.remove_key(attacker_key)
    forged = {}
    for name in ("jku", "x5u"):
        forged[f"{name} pointing at the attacker"] = provider.token(key=attacker_key, headers={name: f"{attacker.url}/keys.json"})
    forged["jwk: the attacker's key in the header"] = provider.token(key=attacker_key, headers={"jwk": attacker_key.jwk})
    forged["x5c: the attacker's certificate"] = provider.token(key=attacker_key, headers={"x5c": ["MIIB..."], "x5u": attacker.url})
    provider.add_key("RSA")  # a second key that could verify an RS256 token
    enc_key = provider.add_key("RSA", use="enc")
    alg_key = provider.add_key("RSA", alg="RS512")
    ec_key = provider.add_key("EC")
    return {
        "alg none": unsigned,
        "HS256 with the public key's PEM as the secret": hs256_token(pem, {"alg": "HS256", "kid": rsa_key.kid}, claims()),
        "HS256 with the public JWK as the secret": hs256_token(json.dumps(rsa_key.jwk).encode(), {"alg": "HS256", "kid": rsa_key.kid}, claims()),
        **forged,
        "a kid with path characters": provider.token(headers={"kid": "../../etc/passwd"}),
        "a kid that is a URL": provider.token(headers={"kid": f"{attacker.url}/keys"}),
        "a kid with SQL": provider.token(headers={"kid": "x' OR '1'='1"}),
        "a kid that is not a string": with_header(provider.token(), {"alg": "RS256", "kid": 7}),
        "a key for encryption": provider.token(key=enc_key),
        "a key of another algorithm": provider.token(key=alg_key, algorithm="RS256"),
        "an EC key's kid on an RS256 token": provider.token(key=rsa_key, headers={"kid": ec_key.kid}),
        "no kid, several keys that could verify it": pyjwt.encode(claims(), rsa_key.private, algorithm="RS256"),
        "the wrong issuer": provider.token(iss="https://elsewhere.example"),
    }


def test_attacks_are_401_and_fetch_nothing_of_the_attackers(make_jwks_app, provider):
    attacker = Recorder()
    try:
        tokens = attacks(provider, attacker)
        client = make_jwks_app(provider, JWT_DECODE_ISSUER=provider.issuer).test_client()
        assert turn(client, provider.token()).status_code == 200  # the key set is cached
        for name, token in tokens.items():
            response = turn(client, token)
            assert (response.status_code, response.get_json()["code"]) == (401, "invalid_token"), name
        assert attacker.requests == []
        assert provider.fetches <= 2  # the first, and at most one refresh for unknown kids
    finally:
        attacker.close()


def test_a_key_set_of_one_key_takes_a_token_without_a_kid(make_jwks_app, provider):
    token = pyjwt.encode(claims(), provider.keys[0].private, algorithm="RS256")
    assert turn(make_jwks_app(provider).test_client(), token).status_code == 200


@pytest.mark.parametrize(
    "settings, token_claims, status",
    [
        ({"TOKEN_AUDIENCES": ["chat-api"]}, {"aud": "chat-api"}, 200),
        ({"TOKEN_AUDIENCES": ["chat-api", "other"]}, {"aud": ["x", "other"]}, 200),
        ({"TOKEN_AUDIENCES": ["chat-api"]}, {"aud": "somebody-else"}, 401),
        ({"TOKEN_AUDIENCES": ["chat-api"]}, {}, 401),
        ({"TOKEN_AUDIENCES": ["app-client"], "JWT_AUDIENCE_CLAIM": "client_id"}, {"client_id": "app-client"}, 200),
        ({"TOKEN_AUDIENCES": ["app-client"], "JWT_AUDIENCE_CLAIM": "client_id"}, {"aud": "app-client"}, 401),
    ],
    ids=["aud", "one of several", "another aud", "no aud", "client_id (Cognito)", "aud is not client_id"],
)
def test_audiences(make_jwks_app, provider, settings, token_claims, status):
    response = turn(make_jwks_app(provider, **settings).test_client(), provider.token(**token_claims))
    assert response.status_code == status
    if status == 401:
        assert_error(response, 401, "invalid_token")


# Without a key set too ------------------------------------------------------------------------


@pytest.mark.parametrize("path, method", [
    ("/api/alice/chat", "post"), ("/api/alice/conversations", "get"),
    ("/api/alice/conversations/5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e", "get"),
    ("/api/alice/conversations/5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e/messages", "get"),
    ("/api/alice/conversations/5b0b6c1e-2f4e-4a53-9d1a-8f0c3c1f2b7e", "delete"),
])
def test_a_refresh_token_is_not_an_access_token(client, auth, path, method):
    refresh = auth.token(type="refresh")
    kwargs = {"json": {"message": "hi"}} if method == "post" else {}
    response = getattr(client, method)(path, headers={"Authorization": f"Bearer {refresh}"}, **kwargs)
    body = assert_error(response, 401, "invalid_token")
    assert "access" in body["detail"]
    assert getattr(client, method)(path, headers=auth.headers(type="access"), **kwargs).status_code != 401


def test_create_token_says_it_cannot_sign_for_a_key_set(make_jwks_app, provider):
    result = make_jwks_app(provider).test_cli_runner().invoke(args=["create-token", "alice"])
    assert result.exit_code != 0
    assert "identity provider" in result.output and "JWT_JWKS_URL" in result.output


def test_create_token_says_a_public_key_cannot_sign(database_uri, provider):
    app = make_app(SQLALCHEMY_DATABASE_URI=database_uri, JWT_PUBLIC_KEY=provider.keys[0].public_pem().decode(),
                   JWT_ALGORITHM="RS256", JWT_DECODE_ALGORITHMS=["RS256"])
    result = app.test_cli_runner().invoke(args=["create-token", "alice"])
    assert result.exit_code != 0 and "JWT_PUBLIC_KEY only verifies" in result.output
    with app.app_context():
        db.engine.dispose()


# Through gunicorn -------------------------------------------------------------------------------


def test_through_gunicorn_each_worker_fetches_once_per_interval(database_uri, agent_server, provider):
    """Two workers, a key set by URL: turns verify, and a flood of unknown kids makes each worker
    fetch at most once more in the interval."""
    settings = {"DATABASE_URL": database_uri.replace("postgresql+psycopg://", "postgresql://"), "JWT_SECRET_KEY": "",
                "AGENT_URL": agent_server.url, "JWT_JWKS_URL": provider.jwks_url, "JWT_ALGORITHM": "RS256,ES256",
                "RATE_LIMIT": "100000 per minute"}
    with LiveServer(settings, workers=2, threads=8) as server:  # the database is migrated already
        session = requests.Session()
        answers = [session.post(f"{server.url}/api/alice/chat", json={"message": f"m{n}"},
                                headers={"Authorization": f"Bearer {provider.token()}"}, timeout=10) for n in range(6)]
        assert [answer.status_code for answer in answers] == [200] * 6
        assert 1 <= provider.fetches <= 2  # a worker fetches on its first use

        def forged(_):
            token = provider.token(headers={"kid": secrets.token_hex(8)})
            return requests.post(f"{server.url}/api/alice/chat", json={"message": "hi"},
                                 headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(forged, range(200))) == {401}
    # 200 unknown kids: no worker fetched again within the interval (30 s) its first fetch began.
    assert provider.fetches <= 2
