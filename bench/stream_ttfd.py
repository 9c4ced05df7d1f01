"""Time to the first delta and time between deltas of a streamed turn, for checkouts and settings
side by side (the variants take turns, round after round), next to the test agent's own.

    .venv/bin/python bench/stream_ttfd.py --variant "before=../before" --variant "after=." \\
        --variant "after, Redis=.:REDIS_URL=redis://127.0.0.1:6379/0" [--rounds 5] [--turns 20]

It starts the loopback streaming test agent (tests/support/agent.py: 12 pieces, 20 ms apart) and,
for each variant, the service under gunicorn with production settings (tests/support/live_server.py),
all on 127.0.0.1, and stops them at the end. Reported per variant: the median over its turns of the
time to the first delta and of the gaps between deltas, less the agent's own (measured straight
from the agent in the same rounds): what the service adds.
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

from tests.support.agent import AgentServer, Stream  # noqa: E402
from tests.support.live_server import LiveServer  # noqa: E402

SECRET = "bench-secret-" + "x" * 48
PIECES = tuple(f"word{n} " for n in range(12))
INTERVAL = 0.02


def arrivals(response, prefix: bytes) -> list[float]:
    """The perf_counter time at which each line starting with `prefix` arrived."""
    return [time.perf_counter() for line in response.iter_lines(chunk_size=1) if line.startswith(prefix)]


def through_agent(agent_url: str) -> tuple[float, list[float]]:
    started = time.perf_counter()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with requests.post(f"{agent_url}/chat/completions", json=body, stream=True, timeout=10) as response:
        times = arrivals(response, b'data: {"id"')[1:]  # the role's chunk first, then a chunk a piece
    return times[0] - started, [b - a for a, b in zip(times, times[1:])][:len(PIECES) - 1]


def through_service(service_url: str, token: str) -> tuple[float, list[float]]:
    started = time.perf_counter()
    with requests.post(f"{service_url}/api/bench/chat", json={"message": "hi", "stream": True},
                       headers={"Authorization": f"Bearer {token}"}, stream=True, timeout=10) as response:
        response.raise_for_status()
        times = arrivals(response, b"event: delta")
    return times[0] - started, [b - a for a, b in zip(times, times[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:SETTING=VALUE,...]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=20, help="turns a variant a round")
    args = parser.parse_args()
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    variants = []
    for text in args.variant or [f"this={ROOT}"]:
        name, _, spec = text.partition("=")
        directory, _, settings = spec.partition(":")
        variants.append((name, Path(directory), dict(s.split("=", 1) for s in settings.split(",") if s)))
    first = {name: [] for name, _, _ in variants} | {"the agent itself": []}
    gaps = {name: [] for name in first}
    with tempfile.TemporaryDirectory() as tmp, AgentServer() as agent:
        agent.default = Stream(pieces=PIECES, interval=INTERVAL)
        servers = []
        for index, (name, app_dir, settings) in enumerate(variants):
            env = {"DATABASE_URL": f"sqlite:///{tmp}/ttfd-{index}.db", "JWT_SECRET_KEY": SECRET, "AGENT_URL": agent.url,
                   "RATE_LIMIT": "100000 per minute", "LOG_LEVEL": "WARNING",
                   "PROMETHEUS_MULTIPROC_DIR": f"{tmp}/metrics-{index}", **settings}
            Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
            server = LiveServer(env, workers=1, threads=4, app_dir=app_dir)
            release = server.run_release()
            if release.returncode != 0:
                sys.exit(release.stderr)
            servers.append((name, server.start()))
        try:
            for _ in range(3):  # warm up: connections, imports, caches
                through_agent(agent.url)
                for _, server in servers:
                    through_service(server.url, token)
            for round_ in range(args.rounds):
                order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
                for _ in range(args.turns):
                    ttft, agent_gaps = through_agent(agent.url)
                    first["the agent itself"].append(ttft)
                    gaps["the agent itself"] += agent_gaps
                for name, server in order:
                    for _ in range(args.turns):
                        ttfd, service_gaps = through_service(server.url, token)
                        first[name].append(ttfd)
                        gaps[name] += service_gaps
        finally:
            for _, server in servers:
                server.stop()
    agent_first, agent_gap = statistics.median(first["the agent itself"]), statistics.median(gaps["the agent itself"])
    print(f"{args.rounds} rounds of {args.turns} streamed turns a variant; {len(PIECES)} pieces {INTERVAL * 1000:.0f} ms apart\n")
    print("| variant | first delta, median ms | added to the agent's | gap between deltas, median ms | added to the agent's |")
    print("|---|---:|---:|---:|---:|")
    for name in first:
        f, g = statistics.median(first[name]), statistics.median(gaps[name])
        print(f"| {name} | {f * 1000:.2f} | {(f - agent_first) * 1000:+.2f} | {g * 1000:.2f} | {(g - agent_gap) * 1000:+.2f} |")


if __name__ == "__main__":
    main()
