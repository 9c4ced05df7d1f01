"""Deploying it: a bad setting stops the server and every command in one line; the platform's
files (Procfile, app.json, .python-version) say only what the service really reads."""
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import config
from chatapp.extensions import db
from tests.conftest import through_a_pooler
from tests.support.live_server import BIN, ROOT, procfile
from tests.support.processes import free_port

STRONG_SECRET = "s" * 32
# What production needs, and nothing of the caller's environment.
GOOD = {"CHATAPP_ENV": "production", "JWT_SECRET_KEY": STRONG_SECRET, "AGENT_URL": "http://127.0.0.1:9/v1"}

# Each refusal: the settings that cause it, and the setting its one line must name.
REFUSALS = {
    "no secret": ({"JWT_SECRET_KEY": None}, "JWT_SECRET_KEY"),
    "31-byte secret": ({"JWT_SECRET_KEY": "s" * 31}, "JWT_SECRET_KEY"),
    "no agent": ({"AGENT_URL": None}, "AGENT_URL"),
    "agent URL without a scheme": ({"AGENT_URL": "api.openai.com/v1"}, "AGENT_URL"),
    "a timeout that is not a number": ({"AGENT_TIMEOUT": "soon"}, "AGENT_TIMEOUT"),
    "a zero timeout": ({"AGENT_TIMEOUT": "0"}, "AGENT_TIMEOUT"),
    "no workers": ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
    "no threads": ({"GUNICORN_THREADS": "0"}, "GUNICORN_THREADS"),
    "a port out of range": ({"PORT": "70000"}, "PORT"),
    "a database URL that is not one": ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
    "a pool of none": ({"DATABASE_POOL_SIZE": "0"}, "DATABASE_POOL_SIZE"),
    "an unknown algorithm": ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
    "a public key that is not one": ({"JWT_PUBLIC_KEY": "not a key", "JWT_ALGORITHM": "RS256"}, "JWT_PUBLIC_KEY"),
    "an unreadable rate limit": ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
    "an unreadable token budget": ({"TOKEN_BUDGET": "200000 per week"}, "TOKEN_BUDGET"),
    "a retention of no days": ({"RETENTION_DAYS": "0"}, "RETENTION_DAYS"),
    "a Redis URL that is not one": ({"REDIS_URL": "127.0.0.1:6379"}, "REDIS_URL"),
    "an unknown log format": ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    "two key sources": ({"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "JWT_JWKS_URL": "https://idp.example/keys"},
                        "JWT_PUBLIC_KEY and JWT_JWKS_URL"),
    "a key set and an issuer": ({"JWT_JWKS_URL": "https://idp.example/keys", "JWT_OIDC_ISSUER": "https://idp.example"},
                                "JWT_JWKS_URL and JWT_OIDC_ISSUER"),
    "a key set over plain http": ({"JWT_JWKS_URL": "http://idp.example/keys"}, "JWT_JWKS_URL"),
    "an issuer over plain http": ({"JWT_OIDC_ISSUER": "http://idp.example"}, "JWT_OIDC_ISSUER"),
    "an HMAC algorithm with a key set": ({"JWT_JWKS_URL": "https://idp.example/keys", "JWT_ALGORITHM": "RS256,HS256"},
                                         "JWT_ALGORITHM"),
    "an unknown environment": ({"CHATAPP_ENV": "staging"}, "CHATAPP_ENV"),
}


def environment(changes: dict) -> dict:
    """The caller's environment without any chatapp setting, then production's, then `changes`."""
    ours = config.SETTINGS_READ | {"CHATAPP_ENV", "PROMETHEUS_MULTIPROC_DIR", "GUNICORN_CMD_ARGS"}
    env = {name: value for name, value in os.environ.items() if name not in ours}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the Procfile's commands, as the platform finds them
    for name, value in {**GOOD, **changes}.items():
        if value is not None:
            env[name] = value
    return env


def run_until_exit(command: list[str], env: dict, timeout: float = 20) -> tuple[int | None, float, list[str]]:
    """Run `command`; its exit status (None if it was still running after `timeout`), the seconds
    it ran, and the lines it printed."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        status = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        status = None
    return status, time.monotonic() - started, [line for line in output.splitlines() if line.strip()]


def logs_json(changes: dict) -> bool:
    """Whether the one line is JSON: production's logs are, unless LOG_FORMAT=text."""
    return changes.get("CHATAPP_ENV", "production") == "production" and changes.get("LOG_FORMAT") != "text"


def assert_one_line_naming(lines: list[str], setting: str, as_json: bool) -> None:
    assert len(lines) == 1, lines
    line = lines[0]
    if as_json:
        entry = json.loads(line)
        assert (entry["level"], entry["logger"]) == ("CRITICAL", "chatapp.config")
        line = entry["message"]
    assert line.startswith("chatapp: configuration error: ")
    assert setting in line


@pytest.mark.parametrize("changes, setting", list(REFUSALS.values()), ids=list(REFUSALS))
def test_a_configuration_error_stops_the_procfiles_web_process(changes, setting):
    """Exactly the Procfile's web line; gunicorn's master must exit at once, not boot workers that
    die and are booted again. (GUNICORN_CMD_ARGS keeps the test on loopback, were it to start.)"""
    port = free_port()
    env = environment({"PORT": str(port), **changes, "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{port}"})
    status, seconds, lines = run_until_exit(shlex.split(procfile()["web"]), env)
    assert status not in (None, 0), lines
    assert seconds < 10
    assert_one_line_naming(lines, setting, as_json=logs_json(changes))


def flask_commands() -> list[list[str]]:
    """Every command of `flask --app wsgi`: ours, Flask-Migrate's upgrade, and Flask's own that load the app."""
    from chatapp import cli

    ours = [[command.name, *(["someone"] if command.name == "create-token" else [])] for command in cli.COMMANDS]
    return [*ours, ["db", "upgrade"], ["routes"], ["shell"]]


@pytest.mark.parametrize("refusal", ["no secret", "a timeout that is not a number", "an unknown log format", "no workers"])
def test_a_configuration_error_stops_every_flask_command(refusal, tmp_path):
    changes, setting = REFUSALS[refusal]
    env = environment({**changes, "DATABASE_URL": f"sqlite:///{tmp_path}/never.db"})
    commands = flask_commands()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda args: run_until_exit([str(BIN / "flask"), "--app", "wsgi", *args], env), commands))
    for args, (status, _seconds, lines) in zip(commands, results):
        assert status not in (None, 0), (args, lines)
        assert_one_line_naming(lines, setting, as_json=logs_json(changes))
    assert not (tmp_path / "never.db").exists()


def test_the_worker_that_meets_a_configuration_error_stops_gunicorn_too():
    """Should the app refuse a setting that gunicorn's master let through, the worker exits with
    gunicorn's 'worker failed to boot' status (3), which stops the master instead of a restart."""
    status, _seconds, lines = run_until_exit([sys.executable, "-c", "import wsgi"], environment({"JWT_SECRET_KEY": None}))
    assert status == 3
    assert_one_line_naming(lines, "JWT_SECRET_KEY", as_json=True)
    status, _seconds, lines = run_until_exit([sys.executable, "-c", "import wsgi"],
                                             environment({"JWT_SECRET_KEY": None, "LOG_FORMAT": "text"}))
    assert (status, lines) == (3, ["chatapp: configuration error: JWT_SECRET_KEY must be set to at least 32 bytes "
                                   "in production (or set JWT_PUBLIC_KEY, JWT_JWKS_URL or JWT_OIDC_ISSUER)"])


def test_good_settings_pass_the_check(tmp_path):
    """The settings the refusals start from do serve: each refusal is caused by its own change."""
    env = environment({"DATABASE_URL": f"sqlite:///{tmp_path}/app.db"})
    status, _seconds, lines = run_until_exit([str(BIN / "flask"), "--app", "wsgi", "create-token", "someone"], env)
    assert status == 0, lines
    assert lines[0].startswith("ey")


# Heroku-style platforms ----------------------------------------------------------------------


def app_json() -> dict:
    return json.loads((ROOT / "app.json").read_text())


def test_app_json_names_only_settings_the_service_reads():
    config.ProductionConfig()  # reads every setting
    described = app_json()["env"]
    assert set(described) <= config.SETTINGS_READ | {"CHATAPP_ENV"}, set(described) - config.SETTINGS_READ


def test_app_json_describes_what_a_platform_needs():
    description = app_json()
    assert description["name"] and description["description"]
    addons = [addon if isinstance(addon, str) else addon["plan"] for addon in description["addons"]]
    assert any(addon.startswith("heroku-postgresql") for addon in addons)
    env = description["env"]
    assert env["JWT_SECRET_KEY"]["generator"] == "secret"
    assert env["METRICS_TOKEN"]["generator"] == "secret"
    assert env["AGENT_URL"]["required"] is True
    assert {"AGENT_API_KEY", "DEFAULT_MODEL"} <= set(env)
    assert env["CHATAPP_ENV"]["value"] == "production"
    assert description["formation"]["web"]["quantity"] >= 1


def test_python_version_is_pinned_to_a_supported_one():
    pinned = (ROOT / ".python-version").read_text().strip()
    major, minor = (int(part) for part in pinned.split("."))  # major.minor, as platforms read it
    assert (major, minor) >= (3, 11)


def test_procfile_lines():
    assert procfile() == {"release": "flask --app wsgi db upgrade", "web": "gunicorn wsgi:app --config gunicorn.conf.py"}


# Through a transaction-pooling PgBouncer ------------------------------------------------------

# What a session keeps on PostgreSQL besides its transaction: anything here after a turn would be
# missing on the next server connection PgBouncer hands out (or found there by another client).
SESSION_STATE = {
    "prepared statements": "SELECT name || ': ' || statement FROM pg_prepared_statements",
    "settings changed by the session": "SELECT name || '=' || setting FROM pg_settings WHERE source = 'session'",
    "advisory locks": "SELECT objid::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    "LISTEN channels": "SELECT pg_listening_channels()",
    "open cursors": "SELECT name FROM pg_cursors",
    "temporary tables": "SELECT relname FROM pg_class WHERE relpersistence = 't'",
}


def session_state(app) -> dict:
    """What the app's one pooled connection holds of each kind of session state."""
    with app.app_context():
        engine = db.engine
        assert engine.pool.checkedin() == 1  # the one connection that served every request
        with engine.connect() as connection:
            return {kind: connection.exec_driver_sql(query).scalars().all() for kind, query in SESSION_STATE.items()}


@pytest.mark.parametrize("config_overrides", [{"DATABASE_POOL_SIZE": 1, "DATABASE_MAX_OVERFLOW": 0}])
def test_no_session_state_outlives_a_transaction(app, chat, client, auth, database_uri):
    """Every kind of request, each more than five times (psycopg prepares a statement on its
    sixth run), on one pooled connection; then that connection holds no session state."""
    if not database_uri.startswith("postgresql"):
        pytest.skip("SQLite has no server sessions")
    headers = auth.headers()
    conversation_id = chat.turn("first")["conversation_id"]
    for n in range(7):
        chat.turn(f"next {n}", conversation_id=conversation_id)
        chat.turn(f"keyed {n}", headers={"Idempotency-Key": f"key-{n}"})
        assert chat.post({"message": f"keyed {n}"}, headers={"Idempotency-Key": f"key-{n}"}).status_code == 200
        streamed = chat.post({"message": f"streamed {n}", "conversation_id": conversation_id, "stream": True})
        assert streamed.status_code == 200 and b"event: done" in streamed.data
        assert client.get("/api/alice/conversations", headers=headers).status_code == 200
        assert client.get(f"/api/alice/conversations/{conversation_id}/messages", headers=headers).status_code == 200
        assert client.get("/readyz").status_code == 200
        assert b'"messages":[' in client.get("/api/alice/export", headers=headers).data
        chat.turn(f"erased {n}", user_id="bob")
        assert client.delete("/api/bob/conversations", headers=auth.headers("bob")).status_code == 204
    doomed = chat.turn("to delete")["conversation_id"]
    assert client.delete(f"/api/alice/conversations/{doomed}", headers=headers).status_code == 204

    assert session_state(app) == {kind: [] for kind in SESSION_STATE}


@pytest.mark.parametrize("config_overrides", [{"DATABASE_POOL_SIZE": 1, "DATABASE_MAX_OVERFLOW": 0,
                                               "DATABASE_PREPARED_STATEMENTS": True}])
def test_prepared_statements_when_asked_for(app, chat, database_uri):
    """DATABASE_PREPARED_STATEMENTS=on, for a direct connection: psycopg prepares the turn's statements."""
    if not database_uri.startswith("postgresql"):
        pytest.skip("SQLite has no server sessions")
    if through_a_pooler():
        pytest.skip("a transaction-pooling PgBouncer 1.18 keeps no prepared statements: off is the setting there")
    conversation_id = chat.turn("first")["conversation_id"]
    for n in range(7):
        chat.turn(f"next {n}", conversation_id=conversation_id)
    assert session_state(app)["prepared statements"]
