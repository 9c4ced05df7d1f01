"""The OUTAGE scenario: an agent outage under S3's load. The service under gunicorn with production
settings (4 x 32), the tests' agent on loopback answering in 200 ms, 128 clients sending
new-conversation turns one after another, each waiting out a 503's Retry-After (at most 5 s) as a
client should; the agent hangs from the 10th second to the 25th, then answers again. AGENT_TIMEOUT and AGENT_BREAKER_SECONDS are 5 s (not 25 and 30) so that a run takes
under a minute; both are settings (`--agent-timeout`, `--breaker-seconds`).

Reported: the share of the turns asked and answered during the outage that took under 100 ms (a
turn asked then and answered after the recovery was served by the agent, and is not counted),
the p50 and p99 of /healthz during it (a load balancer's probe), the agent calls that began during
it, and the seconds from the agent's recovery to the first 200.

`make bench` runs it as its OUTAGE scenario on the bench's database. Alone, it runs each checkout
given by --variant in turn, each on a fresh SQLite database, and prints their figures side by side
(they differ between checkouts by much more than the machine's noise):

    .venv/bin/python bench/outage.py --variant before=../before --variant after=. \
        --variant "capped=.:AGENT_MAX_CONCURRENCY=24"
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH_DIR))

from service import Database, Service  # noqa: E402
from tests.support.agent import AgentServer, Echo, Hang  # noqa: E402

CLIENTS = 128  # S3's connections
AGENT_DELAY = 0.2  # S3's agent
OUTAGE_STARTS, OUTAGE_ENDS, RUN_ENDS = 10.0, 25.0, 45.0
MAX_WAIT = 5.0  # the longest Retry-After a client waits out
MEASURES = [
    ("turns", "turns asked and answered during the outage"),
    ("fast_share", "of them answered within 100 ms"),
    ("healthz", "/healthz during the outage, p50 / p99"),
    ("agent_calls", "agent calls begun during the outage"),
    ("recovery", "seconds from the agent's recovery to the first 200"),
]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def measure(app_dir: Path, database_url: str, workdir: Path, agent_timeout: float = 5,
            breaker_seconds: float = 5, settings: dict | None = None, log=lambda message: None) -> dict:
    """One outage against the checkout at `app_dir` with `settings` added: its figures (see the
    module's docstring)."""
    with AgentServer() as agent:
        agent.default = Echo(delay=AGENT_DELAY)
        service = Service(app_dir, workdir, database_url, agent.url, workers=4, threads=32, extra_env={
            "AGENT_TIMEOUT": str(agent_timeout), "AGENT_MAX_RETRIES": "0", "AGENT_BREAKER_SECONDS": str(breaker_seconds),
            **(settings or {}),
        })
        service.migrate()
        service.start()
        try:
            return _outage(service, agent, log)
        finally:
            service.stop()


def _outage(service: Service, agent: AgentServer, log) -> dict:
    token = service.token("outage-user")
    turns: list[tuple[float, float, int]] = []  # started, seconds, status
    probes: list[tuple[float, float]] = []
    stop = threading.Event()
    begin = time.monotonic()

    def client():
        session = requests.Session()
        while not stop.is_set():
            started = time.monotonic()
            wait = 0.05
            try:
                answer = session.post(f"{service.url}/api/outage-user/chat", json={"message": "hello"},
                                      headers={"Authorization": f"Bearer {token}"}, timeout=60)
                status = answer.status_code
                wait = min(float(answer.headers.get("Retry-After", wait)), MAX_WAIT)
            except requests.RequestException:
                status = 0
            turns.append((started - begin, time.monotonic() - started, status))
            if status != 200:
                stop.wait(wait)

    def prober():
        while not stop.is_set():
            started = time.monotonic()
            try:
                requests.get(service.url + "/healthz", timeout=30)
            except requests.RequestException:
                pass
            probes.append((started - begin, time.monotonic() - started))
            stop.wait(0.1)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=prober, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(OUTAGE_STARTS)
    log(f"OUTAGE: the agent hangs for {OUTAGE_ENDS - OUTAGE_STARTS:.0f} s")
    calls_at_start = len(agent.requests)
    agent.default = Hang()
    went_down = time.monotonic() - begin  # a little after OUTAGE_STARTS on a busy machine: the window is from here
    time.sleep(OUTAGE_ENDS - OUTAGE_STARTS)
    calls_during = len(agent.requests) - calls_at_start
    agent.default = Echo(delay=AGENT_DELAY)
    recovered = time.monotonic() - begin
    log("OUTAGE: the agent answers again")
    time.sleep(RUN_ENDS - OUTAGE_ENDS)
    stop.set()
    for thread in threads:
        thread.join(90)

    during = [(seconds, status) for started, seconds, status in turns
              if went_down <= started and started + seconds < recovered]
    healthz = [seconds for started, seconds in probes if went_down <= started < recovered]
    first_ok = min((started + seconds for started, seconds, status in turns
                    if status == 200 and started + seconds >= recovered), default=None)
    return {
        "turns": len(during),
        "fast": sum(1 for seconds, _ in during if seconds < 0.1),
        "statuses": {str(status): sum(1 for _, s in during if s == status) for status in sorted({s for _, s in during})},
        "healthz_p50_ms": statistics.median(healthz) * 1000 if healthz else None,
        "healthz_p99_ms": percentile(healthz, 0.99) * 1000 if healthz else None,
        "agent_calls": calls_during,
        "recovery_s": None if first_ok is None else first_ok - recovered,
    }


def cells(result: dict) -> dict[str, str]:
    """The figures of one outage as the table's cells."""
    turns, fast = result["turns"], result["fast"]
    return {
        "turns": f"{turns:,}",
        "fast_share": f"{fast:,} ({fast / turns:.0%})" if turns else "-",
        "healthz": (f"{result['healthz_p50_ms']:,.1f} / {result['healthz_p99_ms']:,.1f} ms"
                    if result["healthz_p50_ms"] is not None else "-"),
        "agent_calls": f"{result['agent_calls']:,}",
        "recovery": "none within the run" if result["recovery_s"] is None else f"{result['recovery_s']:.1f}",
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: a row a measure, a column a checkout."""
    names = list(results)
    rendered = {name: cells(result) for name, result in results.items()}
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in MEASURES:
        lines.append(f"| {label} | " + " | ".join(rendered[name][key] for name in names) + " |")
    lines.append("| their statuses | "
                 + " | ".join(", ".join(f"{status}: {count:,}" for status, count in results[name]["statuses"].items())
                              for name in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:SETTING=VALUE,...]",
                        help="a checkout and its extra settings (repeat to compare; default: this one)")
    parser.add_argument("--agent-timeout", type=float, default=5.0, help="AGENT_TIMEOUT (default 5 s)")
    parser.add_argument("--breaker-seconds", type=float, default=5.0, help="AGENT_BREAKER_SECONDS (default 5 s)")
    opts = parser.parse_args(argv)
    results = {}
    for variant in opts.variant or [f"this={ROOT}"]:
        name, _, spec = variant.partition("=")
        directory, _, settings_text = spec.partition(":")
        settings = dict(setting.split("=", 1) for setting in settings_text.split(",") if setting)
        app_dir = Path(directory)
        with tempfile.TemporaryDirectory(prefix="chatapp-outage-") as workdir:
            database = Database(None, Path(workdir)).create()
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=app_dir, capture_output=True, text=True)
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=app_dir,
                                   capture_output=True, text=True).stdout.strip()
            label = f"{name} ({commit.stdout.strip() or 'unknown'}{'+' if dirty else ''}{', ' + settings_text if settings_text else ''})"
            results[label] = measure(app_dir, database.url, Path(workdir), opts.agent_timeout, opts.breaker_seconds,
                                     settings, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"AGENT_TIMEOUT {opts.agent_timeout:g} s, AGENT_BREAKER_SECONDS {opts.breaker_seconds:g} s, "
          f"{CLIENTS} clients, the agent hangs from {OUTAGE_STARTS:g} s to {OUTAGE_ENDS:g} s of {RUN_ENDS:g} s\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
