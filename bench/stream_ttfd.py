"""Time to first delta: a streamed turn through the service against the test agent's own time to
first token, measured side by side (median of N each).

    .venv/bin/python bench/stream_ttfd.py [--runs 20] [--database-url sqlite:///...]

It starts the loopback streaming test agent (tests/support/agent.py) and the service under gunicorn
with production settings (tests/support/live_server.py), both on 127.0.0.1, and stops them at the end.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jwt
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import AgentServer, StreamEcho  # noqa: E402
from tests.support.live_server import LiveServer  # noqa: E402

SECRET = "bench-secret-" + "x" * 48


def first_line_after(response, prefix: bytes) -> float:
    """Seconds until a line starting with `prefix` has arrived (the clock started by the caller)."""
    for line in response.iter_lines(chunk_size=1):
        if line.startswith(prefix):
            return time.perf_counter()
    raise RuntimeError("the stream ended without it")


def agent_ttft(agent_url: str) -> float:
    started = time.perf_counter()
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    with requests.post(f"{agent_url}/chat/completions", json=body, stream=True, timeout=10) as response:
        return first_line_after(response, b"data: {") - started


def service_ttfd(service_url: str, token: str) -> float:
    started = time.perf_counter()
    with requests.post(
        f"{service_url}/api/bench/chat",
        json={"message": "one two three", "stream": True},
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=10,
    ) as response:
        response.raise_for_status()
        return first_line_after(response, b"event: delta") - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    args = parser.parse_args()
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    with tempfile.TemporaryDirectory() as tmp, AgentServer() as agent:
        agent.default = StreamEcho()
        env = {
            "DATABASE_URL": args.database_url or f"sqlite:///{tmp}/ttfd.db",
            "JWT_SECRET_KEY": SECRET,
            "AGENT_URL": agent.url,
            "RATE_LIMIT": "100000 per minute",
            "LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": tmp,
        }
        server = LiveServer(env, workers=1, threads=4)
        release = server.run_release()
        if release.returncode != 0:
            sys.exit(release.stderr)
        with server:
            for _ in range(3):  # warm both up: connections, imports, caches
                agent_ttft(agent.url), service_ttfd(server.url, token)
            direct = [agent_ttft(agent.url) * 1000 for _ in range(args.runs)]
            through = [service_ttfd(server.url, token) * 1000 for _ in range(args.runs)]
    print(f"time to first piece, median of {args.runs} (ms)")
    print("| path | median | min | max |")
    print("|---|---|---|---|")
    for name, values in (("agent's own first token", direct), ("first delta through the service", through)):
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"service overhead (median difference): {statistics.median(through) - statistics.median(direct):.2f} ms")


if __name__ == "__main__":
    main()
