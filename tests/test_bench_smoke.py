"""The benchmark harness still starts: bench/run.py --quick, one scenario for 2 s, on SQLite, and
bench/turn_cost.py for a few turns; bench/run.py --quick --reference against a fake reference app
written by the test (on PostgreSQL, TEST_DATABASE_URL's server).

Not a measurement: it asserts only that requests went through. It needs wrk, nginx and nginx's echo
module (`make bench-deps`); without them it is skipped (so that `make test` passes on a machine with
only Python and make), or fails under --require-services, as in CI. BENCH_SMOKE=skip skips it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60
MISSING_TOOLS_EXIT = 3  # bench/run.py's exit code when wrk, nginx or the echo module is missing

# A reference app as bench/reference.py describes one: the chat endpoint on two tables, in a few lines.
FAKE_REFERENCE_APP = """
import os, threading, uuid

import jwt, psycopg, requests
from flask import Flask, request

app = Flask(__name__)
local = threading.local()
COMPLETIONS_URL = os.environ["AGENT_URL"].rstrip("/") + "/chat/completions"


def connection():
    if getattr(local, "connection", None) is None:
        local.connection = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
    return local.connection


@app.get("/health")
def health():
    return {"status": "ok"}


@app.post("/api/<user_id>/chat")
def chat(user_id):
    token = request.headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, os.environ["JWT_SECRET_KEY"], algorithms=["HS256"],
                        options={"require": ["exp", "sub"]})
    if claims["sub"] != user_id:
        return {"detail": "Forbidden"}, 403
    body = request.get_json()
    conversation_id = body.get("conversation_id") or str(uuid.uuid4())
    messages = [{"role": "user", "content": body["message"]}]
    agent = requests.post(COMPLETIONS_URL, json={"model": "gpt-4", "messages": messages}, timeout=10)
    answer = agent.json()["choices"][0]["message"]["content"]
    connection().execute("INSERT INTO conversations (id, user_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (conversation_id, user_id))
    connection().execute("INSERT INTO messages (conversation_id, role, content) "
                         "VALUES (%s, 'user', %s), (%s, 'assistant', %s)",
                         (conversation_id, body["message"], conversation_id, answer))
    return {"conversation_id": conversation_id, "message": answer, "role": "assistant"}
"""
FAKE_REFERENCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (id uuid PRIMARY KEY, user_id text NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id bigserial PRIMARY KEY, conversation_id uuid NOT NULL REFERENCES conversations,
                                     role text NOT NULL, content text NOT NULL);
"""


def run_quick_bench(tmp_path: Path, *args: str, timeout: float = TIMEOUT_S) -> tuple[int, str, dict | None]:
    """bench/run.py --quick with `args`: its exit code, its output, its JSON results."""
    results = tmp_path / "bench.json"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--json", str(results), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the harness stops gunicorn and nginx on its way out
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"bench/run.py --quick took more than {timeout} s:\n{output}")
    return process.returncode, output, json.loads(results.read_text()) if results.exists() else None


def test_bench_quick_run_serves_turns(request, tmp_path):
    if os.environ.get("BENCH_SMOKE") == "skip":
        pytest.skip("BENCH_SMOKE=skip")

    code, output, results = run_quick_bench(tmp_path, "--sqlite", "--scenarios", "S1")

    if code == MISSING_TOOLS_EXIT:
        skip_or_fail(request, f"bench smoke skipped: {output.strip()}")
    assert code == 0, output
    (run,) = results["scenarios"]["S1"]["runs"]
    assert run["ok"] > 0, output
    assert run["non2xx"] == 0, run["statuses"]
    assert run["statuses"].keys() == {"200"}


def test_turn_cost_measures_both_kinds_of_turn(request, tmp_path):
    if os.environ.get("BENCH_SMOKE") == "skip":
        pytest.skip("BENCH_SMOKE=skip")
    profile = tmp_path / "turn.prof"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "turn_cost.py"), "--sqlite", "--turns", "20", "--runs", "1",
         "--profile", str(profile)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    if done.returncode == MISSING_TOOLS_EXIT:
        skip_or_fail(request, f"turn_cost smoke skipped: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["new", "continue"], done.stdout
    for line in lines[:2]:
        cpu_us = float(line.split("CPU")[1].split("us")[0])
        assert cpu_us > 0, line
    assert profile.stat().st_size > 0


def test_bench_reference_runs_both_apps_side_by_side(request, tmp_path):
    if os.environ.get("BENCH_SMOKE") == "skip":
        pytest.skip("BENCH_SMOKE=skip")
    server = os.environ.get("TEST_DATABASE_DIRECT_URL") or os.environ.get("TEST_DATABASE_URL")
    if not server:
        skip_or_fail(request, "bench --reference smoke skipped: TEST_DATABASE_URL is not set")
    # A database of its own on that server (the run creates and drops it), not the tests' database.
    parts = urlsplit(server.replace("+psycopg", ""))
    pg_url = urlunsplit(parts._replace(path=f"/bench_reference_{os.getpid()}", query=""))
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "app.py").write_text(FAKE_REFERENCE_APP)
    (reference / "schema.sql").write_text(FAKE_REFERENCE_SCHEMA)

    # Two services, two turn_cost.py runs: about 15 s on 2 idle cores, more on a busy machine.
    code, output, results = run_quick_bench(tmp_path, "--reference", str(reference), "--scenarios", "S1",
                                            "--workers", "1", "--threads", "4", "--pg-url", pg_url, timeout=150)

    if code == MISSING_TOOLS_EXIT:
        skip_or_fail(request, f"bench --reference smoke skipped: {output.strip()}")
    assert code == 0, output
    for side in ("chatapp", "reference"):
        (run,) = results[side]["scenarios"]["S1"]["runs"]
        assert run["ok"] > 0, output
        assert run["statuses"].keys() == {"200"}, (side, run["statuses"])
        (cost,) = results["turn_cost"][side]
        assert cost["new"]["cpu_us"] > 0 and cost["continue"]["cpu_us"] > 0, (side, cost)
    (ratio,) = results["ratios"]
    assert ratio["key"] == "S1" and ratio["ratio"] > 0, ratio
    assert "| S1 | new-conversation turns" in output
