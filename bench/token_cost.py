"""What verifying a bearer token costs a turn, in process: chatapp.auth.verify_token for an HS256
token (the service's own secret) and for RS256, ES256 and EdDSA tokens of a key set (the tests'
identity provider on loopback, fetched once before timing), each as a new token (every check: the
header, the key's choice, the signature, the claims) and as a token seen before (the verified-token
cache). Medians of --runs runs of --tokens tokens, in microseconds a token; no database is touched.

    .venv/bin/python bench/token_cost.py [--tokens 2000] [--runs 5]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jwt as pyjwt  # noqa: E402

from chatapp import create_app  # noqa: E402
from chatapp.auth import verify_token  # noqa: E402
from config import TestingConfig  # noqa: E402
from tests.support.identity_provider import IdentityProvider  # noqa: E402

SECRET = "bench-" + "s" * 40


def hs256_tokens(count: int) -> list[str]:
    now = int(time.time())
    return [pyjwt.encode({"sub": f"user-{n}", "iat": now, "exp": now + 3600, "type": "access"}, SECRET, algorithm="HS256")
            for n in range(count)]


def timed(app, tokens: list[str]) -> float:
    """Microseconds a token for verifying each of `tokens` once."""
    with app.app_context():
        started = time.perf_counter()
        for token in tokens:
            verify_token(token)
        return (time.perf_counter() - started) / len(tokens) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args(argv)
    rows = []
    with IdentityProvider() as provider:
        keys = {"RS256": provider.add_key("RSA"), "ES256": provider.add_key("EC"), "EdDSA": provider.add_key("OKP")}
        common = {"SQLALCHEMY_DATABASE_URI": "sqlite://", "RATE_LIMIT": "100000000 per minute"}
        hs_app = create_app(TestingConfig(JWT_SECRET_KEY=SECRET, **common))
        key_set_app = create_app(TestingConfig(
            JWT_SECRET_KEY=SECRET, JWT_JWKS_URL=provider.jwks_url, JWT_ALGORITHM="RS256",
            JWT_DECODE_ALGORITHMS=list(keys), JWT_JWKS_CACHE_SECONDS=3600.0, JWT_JWKS_MIN_REFRESH_SECONDS=3600.0,
            **common))
        makers = {"HS256 (JWT_SECRET_KEY)": (hs_app, hs256_tokens)}
        for algorithm, key in keys.items():
            makers[f"{algorithm} (key set)"] = (key_set_app, lambda count, key=key, algorithm=algorithm: [
                provider.token(f"user-{n}", key, algorithm=algorithm) for n in range(count)])
        timed(key_set_app, makers["RS256 (key set)"][1](1))  # the key set's first fetch, not timed
        for name, (app, make) in makers.items():
            fresh, cached = [], []
            for _ in range(opts.runs):
                app.extensions["verified_tokens"]._entries.clear()
                tokens = make(min(opts.tokens, 1000))  # the cache keeps 1,024: every one of these is new
                fresh.append(timed(app, tokens))
                cached.append(timed(app, tokens))  # now all seen before
            rows.append((name, statistics.median(fresh), statistics.median(cached)))
        fetches = provider.fetches
    print(f"verify_token, medians of {opts.runs} runs of {min(opts.tokens, 1000)} tokens; the key set fetched {fetches} time(s)\n")
    print("| token | a new token, µs | a token seen before, µs |\n|---|---:|---:|")
    for name, fresh, cached in rows:
        print(f"| {name} | {fresh:,.1f} | {cached:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
