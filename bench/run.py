"""`make bench`: throughput, latency, slow-agent concurrency, history flatness and memory of chatapp.

Starts an nginx agent stub, a database of its own, the service under gunicorn with the production
config, then drives it with wrk (bench/wrk/chat.lua). See bench/README.md.

    .venv/bin/python bench/run.py                       # everything, on PostgreSQL
    .venv/bin/python bench/run.py --sqlite --scenarios S1,S3 --runs 1 --duration 5
"""
import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

import big_db
import instances
import outage
import reference
import report
from loadgen import run_wrk, wrk_binary
from procs import connections_per_process, rss_mb, thread_count
from service import BENCH_RATE_LIMIT, Database, Service
from stub import ECHO_MODULE, SLOW_PREFIX, AgentStub, nginx_binary
from tests.support.identity_provider import IdentityProvider

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SCENARIOS = ["STUB", "S0", "S1", "S2", "S3", "S4", "S5", "OUTAGE"]
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/bench"
USERS = 16
CONNECTIONS = 16
SLOW_CONNECTIONS = 128
S2_CONVERSATIONS = 256
S4_SHORT_MESSAGES = 10
S4_LONG_MESSAGES = 2000
S4_TURN_BOUND_S = 300  # a wrk bound for S4's bounded number of turns, never reached when all is well
SETUP_CONCURRENCY = 16
MISSING_TOOLS_EXIT = 3


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from " + ",".join(SCENARIOS) + " (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; medians are reported (default 3)")
    parser.add_argument("--duration", type=int, default=8, help="seconds per run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unrecorded load before a scenario (default 2)")
    parser.add_argument("--s4-turns", type=int, default=500, help="sequential turns per S4 run (default 500)")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL,
                        help=f"PostgreSQL database to create, use and drop (default {DEFAULT_PG_URL})")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_CONCURRENCY", 4)),
                        help="WEB_CONCURRENCY (default: $WEB_CONCURRENCY or 4, gunicorn.conf.py's)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("GUNICORN_THREADS", 32)),
                        help="GUNICORN_THREADS (default: $GUNICORN_THREADS or 32, gunicorn.conf.py's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra setting for the service (repeatable), e.g. --env LOG_LEVEL=WARNING")
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the checkout to serve (default: this one)")
    parser.add_argument("--jwks", action="store_true",
                        help="tokens RS256 from an identity provider's key set (the tests' provider on loopback), "
                             "instead of HS256 with JWT_SECRET_KEY")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 run of 2 s, no warm-up, 50 S4 turns, no results file")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<date>-<commit>[-sqlite].md)")
    parser.add_argument("--no-results-file", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write every number as JSON here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temp dir (logs, nginx config)")
    parser.add_argument("--reference", type=Path, metavar="DIR",
                        help="also serve the reference app in DIR and run S1, S2, S4 and S3 (those of --scenarios) on "
                             "both, taking turns; the report is chatapp / reference (bench/reference.py)")
    big_db.add_arguments(parser)
    instances.add_arguments(parser)
    opts = parser.parse_args(argv)
    opts.scenarios = [name.strip().upper() for name in opts.scenarios.split(",") if name.strip()]
    unknown = sorted(set(opts.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if opts.quick:
        opts.runs, opts.duration, opts.warmup, opts.s4_turns = 1, 2, 0, 50
        if opts.output is None:
            opts.no_results_file = True
    for setting in opts.env:
        if "=" not in setting:
            parser.error(f"--env takes NAME=VALUE, got {setting!r}")
    if opts.runs < 1 or opts.duration < 1 or opts.s4_turns < 10:
        parser.error("--runs and --duration must be at least 1, --s4-turns at least 10")
    reference.check_args(parser, opts)
    instances.check_args(parser, opts)
    return opts


def missing_tools() -> list[str]:
    """What `make bench-deps` installs and is not there."""
    missing = []
    if not wrk_binary():
        missing.append("wrk")
    if not nginx_binary():
        missing.append("nginx")
    if not ECHO_MODULE.exists():
        missing.append(f"libnginx-mod-http-echo ({ECHO_MODULE})")
    return missing


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def command_output(args, cwd=None) -> str:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


class Client:
    """Turns through the API with requests, for building conversations (not for measuring)."""

    def __init__(self, service: Service, tokens: dict[str, str]):
        self.service = service
        self.tokens = tokens
        self.local = threading.local()

    def turn(self, user_id: str, conversation_id: str | None = None) -> str:
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        body = {"message": "Building a conversation for the benchmark: tell me something."}
        if conversation_id:
            body["conversation_id"] = conversation_id
        answer = session.post(f"{self.service.url}/api/{user_id}/chat", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {self.tokens[user_id]}"})
        if answer.status_code != 200:
            raise RuntimeError(f"building a conversation: {answer.status_code} {answer.text[:300]}")
        return answer.json()["conversation_id"]

    def conversations(self, count: int, messages: int) -> list[tuple[str, str]]:
        """`count` conversations of `messages` messages each, as (user_id, conversation_id): turns of
        one conversation one after the other, conversations side by side."""
        users = list(self.tokens)

        def build(index):
            user_id = users[index % len(users)]
            conversation_id = self.turn(user_id)
            for _ in range(messages // 2 - 1):
                self.turn(user_id, conversation_id)
            return user_id, conversation_id

        with ThreadPoolExecutor(SETUP_CONCURRENCY) as pool:
            return list(pool.map(build, range(count)))


class Bench:
    def __init__(self, opts, service: Service, stub: AgentStub, workdir: Path, database: Database):
        self.opts = opts
        self.service = service
        self.database = database
        self.stub = stub
        self.workdir = workdir
        self.tokens = {f"bench-user-{index:02d}": service.token(f"bench-user-{index:02d}") for index in range(USERS)}
        self.users_file = self.write_data("users.tsv", [(user, token) for user, token in self.tokens.items()])
        self.client = Client(service, self.tokens)
        self.results = {"scenarios": {}, "memory": None, "notes": []}
        self.memory = {}

    def write_data(self, name: str, rows) -> Path:
        path = self.workdir / name
        path.write_text("".join("\t".join(row) + "\n" for row in rows))
        return path

    def conversation_rows(self, conversations):
        return [(user, self.tokens[user], conversation_id) for user, conversation_id in conversations]

    def record(self, key: str, connections: int, run: dict) -> None:
        entry = self.results["scenarios"].setdefault(key, {"connections": connections, "runs": []})
        entry["runs"].append(run)
        log(f"{key}: {run['rps']:,.1f} req/s, p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, "
            f"non-2xx {report.non2xx_text(run)}, socket errors {run['socket_errors']}")

    def measure(self, key: str, url: str, connections: int, threads: int, script_args: list[str],
                during=None, duration=None, runs=None) -> None:
        """A warm-up, then `runs` recorded runs of one wrk load."""
        duration = duration or self.opts.duration
        if self.opts.warmup:
            run_wrk(url, connections=connections, threads=threads, duration=self.opts.warmup, script_args=script_args)
        for _ in range(runs or self.opts.runs):
            if not self.service.wait_idle():
                log(f"{key}: turns of the previous run still in flight after 15 s")
            sampler = during() if during else None
            try:
                run = run_wrk(url, connections=connections, threads=threads, duration=duration, script_args=script_args)
            finally:
                if sampler:
                    sampler.stop()
            self.record(key, connections, run)

    # --- scenarios ---------------------------------------------------------------------------

    def stub_capacity(self) -> None:
        """The stub alone, with the scenarios' connections: it must be far above what the app asks of it."""
        duration = min(self.opts.duration, 3)
        self.measure("STUB-instant", self.stub.completions_url, CONNECTIONS, 2, ["mode=stub"], duration=duration)
        self.measure("STUB-slow", self.stub.completions_url, SLOW_CONNECTIONS, 2,
                     ["mode=stub", f"request_id={SLOW_PREFIX}bench"], duration=duration)

    def s0(self) -> None:
        self.measure("S0", self.service.url + "/healthz", CONNECTIONS, CONNECTIONS, ["mode=get"])

    def s1(self) -> None:
        self.measure("S1", self.service.url, CONNECTIONS, CONNECTIONS, ["mode=new", f"data={self.users_file}"])

    def s2(self) -> None:
        log(f"S2: building {S2_CONVERSATIONS} conversations through the API")
        conversations = self.client.conversations(S2_CONVERSATIONS, 2)
        data = self.write_data("s2.tsv", self.conversation_rows(conversations))
        # One connection per wrk thread, and each thread its own conversations: a conversation never
        # has two turns in flight (that would be a 409 conversation_busy, by the contract).
        self.measure("S2", self.service.url, CONNECTIONS, CONNECTIONS, ["mode=continue", f"data={data}"])

    def s3(self) -> None:
        self.measure("S3", self.service.url, SLOW_CONNECTIONS, 4,
                     ["mode=new", f"data={self.users_file}", f"request_id={SLOW_PREFIX}bench"],
                     during=self.sample_in_flight)
        median_p50 = statistics.median(run["p50_ms"] for run in self.results["scenarios"]["S3"]["runs"])
        if median_p50 < report.SLOW_AGENT_SECONDS * 1000:
            self.results["notes"].append(
                f"S3's p50 ({median_p50:.1f} ms) is under the stub's 200 ms: the app did not forward X-Request-ID "
                "to the agent, so the stub answered at once and S3 did not measure a slow agent."
            )

    def s4(self) -> None:
        turns = self.opts.s4_turns
        log(f"S4: building a conversation of {S4_LONG_MESSAGES} messages through the API")
        long_conversation = self.client.conversations(1, 2)
        long_data = self.write_data("s4-long.tsv", self.conversation_rows(long_conversation))
        build = run_wrk(self.service.url, connections=1, threads=1, duration=S4_TURN_BOUND_S,
                        script_args=["mode=continue", f"data={long_data}"], max_per_thread=S4_LONG_MESSAGES // 2 - 1)
        if build["ok"] != S4_LONG_MESSAGES // 2 - 1 or build["non2xx"] or build["socket_errors"]:
            raise RuntimeError(f"building the long conversation failed: {build}")
        # Each short conversation takes at most 10 measured turns, so it stays under CONTEXT_MAX_MESSAGES
        # (50) and every measured turn really reads a short history; fresh ones for every run.
        per_short = 10
        short_count = math.ceil(turns / per_short)
        long_messages = S4_LONG_MESSAGES
        for index in range(self.opts.runs):
            log(f"S4 run {index + 1}: building {short_count} conversations of {S4_SHORT_MESSAGES} messages")
            shorts = self.client.conversations(short_count, S4_SHORT_MESSAGES)
            short_data = self.write_data(f"s4-short-{index}.tsv", self.conversation_rows(shorts))
            sides = [("S4-short", short_data), ("S4-long", long_data)]
            # Each side starts on a settled database, and the side that goes first alternates, so
            # that neither pays for the other's writes or always meets the machine's later state.
            for key, data in sides if index % 2 == 0 else reversed(sides):
                self.database.settle()
                run = run_wrk(self.service.url, connections=1, threads=1, duration=S4_TURN_BOUND_S,
                              script_args=["mode=continue", f"data={data}"], max_per_thread=turns)
                self.record(key, 1, run)
            long_messages += 2 * turns
        self.results["notes"].append(
            f"S4: {turns} sequential turns a run on each side; the short side uses {short_count} fresh conversations "
            f"of {S4_SHORT_MESSAGES} messages a run (at most {S4_SHORT_MESSAGES + 2 * per_short} messages when done), "
            f"the long side one conversation that grows from {S4_LONG_MESSAGES} to {long_messages} messages."
        )

    def note_stub_headroom(self) -> None:
        """Say how far the stub is from being the bottleneck, from its own capacity runs."""
        scenarios = self.results["scenarios"]

        def median_rps(key):
            entry = scenarios.get(key)
            return statistics.median(run["rps"] for run in entry["runs"]) if entry and entry["runs"] else None

        instant, slow, s1 = median_rps("STUB-instant"), median_rps("STUB-slow"), median_rps("S1")
        if instant and s1:
            self.results["notes"].append(
                f"The stub alone answers {instant:,.0f} req/s at {CONNECTIONS} connections, {instant / s1:,.0f} times S1: "
                "it is not the bottleneck."
            )
        if slow:
            ideal = SLOW_CONNECTIONS / report.SLOW_AGENT_SECONDS
            self.results["notes"].append(
                f"The 200 ms stub alone answers {slow:,.0f} req/s at {SLOW_CONNECTIONS} connections "
                f"({slow / ideal:.0%} of the {ideal:,.0f} req/s that 128 connections x 200 ms allow)."
            )

    def s5_start(self) -> None:
        self.memory = {pid: {"pid": pid, "start": rss_mb(pid)} for pid in self.service.worker_pids()}

    def s5_rest(self) -> None:
        time.sleep(2)  # let the last responses and any lingering work settle
        for pid in self.service.worker_pids():
            self.memory.setdefault(pid, {"pid": pid})["rest"] = rss_mb(pid)

    def sample_in_flight(self):
        """A sampler of worker RSS and agent calls in flight while a slow load runs (S5)."""
        bench = self

        class Sampler:
            def __init__(self):
                self.stopped = threading.Event()
                self.in_flight = []
                self.split = None
                self.thread = threading.Thread(target=self.loop, daemon=True)
                self.thread.start()

            def loop(self):
                # Skip the first second: wrk is still connecting and the first turns are not yet waiting.
                if self.stopped.wait(1.0):
                    return
                while not self.stopped.wait(0.25):
                    flying = bench.stub.in_flight()
                    if flying is not None:
                        self.in_flight.append(flying)
                    if self.split is None:
                        # wrk has connected by now; each connection stays with the worker that accepted it.
                        held = connections_per_process(bench.service.port) or {}
                        self.split = [held.get(pid, 0) for pid in sorted(bench.service.worker_pids())]
                    for pid in bench.service.worker_pids():
                        worker = bench.memory.setdefault(pid, {"pid": pid})
                        rss = rss_mb(pid)
                        if rss is not None:
                            worker["in_flight"] = max(worker.get("in_flight") or 0, rss)
                            worker["threads"] = max(worker.get("threads") or 0, thread_count(pid) or 0)

            def stop(self):
                self.stopped.set()
                self.thread.join(timeout=5)
                bench.memory_in_flight_samples = getattr(bench, "memory_in_flight_samples", []) + self.in_flight
                if self.split:
                    bench.connection_splits = getattr(bench, "connection_splits", []) + [self.split]

        return Sampler()

    def s5_load_alone(self) -> None:
        """S5 without S3: one slow load of 128 connections, for the in-flight reading only."""
        sampler = self.sample_in_flight()
        try:
            run_wrk(self.service.url, connections=SLOW_CONNECTIONS, threads=4, duration=self.opts.duration,
                    script_args=["mode=new", f"data={self.users_file}", f"request_id={SLOW_PREFIX}bench"])
        finally:
            sampler.stop()

    def run(self) -> dict:
        chosen = self.opts.scenarios
        self.s5_start()
        # Instant-agent scenarios first, then memory at rest, then the slow agent (S3, S5 in flight).
        steps = [("STUB", self.stub_capacity), ("S0", self.s0), ("S1", self.s1), ("S2", self.s2), ("S4", self.s4)]
        for name, step in steps:
            if name in chosen:
                log(f"{name}...")
                self.database.settle()
                step()
        if "S5" in chosen:
            self.s5_rest()
        if "S3" in chosen:
            log("S3...")
            self.database.settle()
            self.s3()
        elif "S5" in chosen:
            log("S5: 128 slow turns in flight...")
            self.s5_load_alone()
        self.note_stub_headroom()
        if "OUTAGE" in chosen:
            log("OUTAGE: a service of its own, with an agent that hangs for a while...")
            workdir = self.workdir / "outage"
            workdir.mkdir()
            self.results["outage"] = outage.measure(self.opts.app_dir, self.database.url, workdir, log=log)
        if "S5" in chosen:
            samples = sorted(getattr(self, "memory_in_flight_samples", []))
            self.results["memory"] = {
                "workers": [self.memory[pid] for pid in sorted(self.memory)],
                "agent_in_flight": {"median": statistics.median(samples), "max": samples[-1],
                                    "samples": len(samples)} if samples else None,
                "connection_splits": getattr(self, "connection_splits", []),
            }
        return self.results


def commit_of(app_dir: Path) -> tuple[str, bool]:
    """The short commit, and whether tracked files differ from it."""
    short = command_output(["git", "rev-parse", "--short", "HEAD"], cwd=app_dir) or "unknown"
    dirty = bool(command_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=app_dir))
    return short, dirty


def machine_info(database: Database) -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpus (nproc)": os.cpu_count(),
        "cpu": cpu or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "database server": database.server_version(),
        "load average at start": " ".join(f"{value:.2f}" for value in os.getloadavg()),
        "note": "wrk, nginx, PostgreSQL and gunicorn share these cores; other work on the machine adds noise",
    }


def main(argv=None) -> int:
    opts = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"bench: missing {', '.join(missing)}: run `make bench-deps` "
              "(apt-get install wrk nginx libnginx-mod-http-echo)", file=sys.stderr)
        return MISSING_TOOLS_EXIT

    # SIGTERM (a CI timeout, a test) unwinds through the finally blocks: nothing is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if opts.big_db:
        return big_db.main(opts)
    if opts.instances:
        return instances.main(opts, harness=sys.modules[__name__])  # this module: its loads, Client, log
    workdir = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
    commit, dirty = commit_of(opts.app_dir)
    started = datetime.now(timezone.utc)
    stub = database = service = provider = None
    try:
        stub = AgentStub(workdir).start()
        database = Database(None if opts.sqlite else opts.pg_url, workdir).create()
        extra_env = dict(setting.split("=", 1) for setting in opts.env)
        if opts.jwks:
            provider = IdentityProvider().__enter__()
            provider.add_key("RSA")
            extra_env.update(JWT_JWKS_URL=provider.jwks_url, JWT_ALGORITHM="RS256")
        service = Service(opts.app_dir, workdir, database.url, stub.base_url,
                          workers=opts.workers, threads=opts.threads, extra_env=extra_env)
        if provider is not None:
            service.token = lambda user_id, lifetime=6 * 3600: provider.token(user_id, expires_in=lifetime)
        log(f"database {database.name}: migrating")
        service.migrate()
        service.start()
        log(f"gunicorn on {service.url}: workers {service.worker_pids()}, {opts.threads} threads each")
        if opts.reference:
            return reference.side_by_side(opts, Bench, service, stub, database, workdir, commit=commit, dirty=dirty,
                                          started=started, machine=machine_info(database))
        bench = Bench(opts, service, stub, workdir, database)
        results = bench.run()
        results["meta"] = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "database": "SQLite (--sqlite)" if opts.sqlite else f"PostgreSQL, database {database.name} created for the run",
            "nginx": command_output([nginx_binary(), "-v"]).replace("nginx version: nginx/", ""),
            "wrk": command_output([wrk_binary(), "-v"]).splitlines()[0].split(" [")[0],
            "runs": opts.runs,
            "duration": opts.duration,
            "s4_turns": opts.s4_turns,
            "machine": machine_info(database),
            "settings": {
                "WEB_CONCURRENCY (gunicorn workers)": opts.workers,
                "GUNICORN_THREADS (gthread threads per worker)": opts.threads,
                "gunicorn": "gunicorn.conf.py as the Procfile's web line, --bind 127.0.0.1; its output to a file",
                "CHATAPP_ENV": "production",
                "RATE_LIMIT": f"{BENCH_RATE_LIMIT} (the per-user limit would otherwise answer 429 under load)",
                "extra service settings": ", ".join(opts.env) or "none",
                "app checkout": "this one" if opts.app_dir.resolve() == ROOT else f"another ({opts.app_dir.name})",
                "load generator": f"wrk, --timeout 10s; S0-S2 {CONNECTIONS} threads x 1 connection, "
                                  f"S3 4 threads x {SLOW_CONNECTIONS // 4} connections, S4 1 x 1",
                "users": f"{USERS} (tokens {'RS256 from a key set (--jwks)' if opts.jwks else 'HS256'} with sub, iat, exp)",
            },
        }
        text = report.markdown(results)
        print(text)
        if not opts.no_results_file:
            log(f"written to {report.write_results(text, opts.output, started, commit, '-sqlite' if opts.sqlite else '')}")
        if opts.json:
            opts.json.write_text(json.dumps({**results, "ratios": report.ratios(results)}, indent=2, default=str))
        return 0
    except Exception:
        if service is not None:
            print(f"--- gunicorn log (tail) ---\n{service.log_tail()}", file=sys.stderr)
        raise
    finally:
        if service is not None:
            service.stop()
        if database is not None:
            database.drop()
        if stub is not None:
            stub.stop()
        if provider is not None:
            provider.__exit__(None, None, None)
        if opts.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
