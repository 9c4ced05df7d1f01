"""`bench/run.py --instances N`: N instances of one worker each next to one instance of N workers,
both behind one nginx and one PgBouncer (transaction mode) on one PostgreSQL database, sharing one
Redis; S1, S2 and S3 against each set-up, the two taking turns going first. The only difference
between them is being several processes: the workers, threads, database and proxy are the same.

    .venv/bin/python bench/run.py --instances 3                      # S1, S2, S3; 3 runs each
    .venv/bin/python bench/run.py --instances 3 --scenarios S1 --runs 1

Besides req/s, each run reads what a turn cost on the way to the database: PgBouncer's SHOW STATS
(transactions, queries, their time in the server) and the CPU time of the database's backends, of
the workers, of PgBouncer and of nginx, each divided by the turns the run stored. See bench/README.md.
"""
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import report
from loadgen import run_wrk
from procs import free_port, popen
from service import Database, Service
from stub import SLOW_PREFIX, AgentStub
from tests.support.nginx import Nginx

SCENARIOS = ("S1", "S2", "S3")
TARGET_RATIO = 0.90
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
# What a small plan allows (README: "20 for a plan of 20"), above a set-up's 3 workers x
# DATABASE_POOL_SIZE 5 client connections, so that the pool itself makes no turn wait (SHOW STATS's
# wait time tells); transactions still move between the server connections.
DEFAULT_POOL = 20
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

PGBOUNCER_CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {dir}/userlist.txt
stats_users = {user}
pool_mode = transaction
default_pool_size = {pool}
max_client_conn = 1000
logfile = {dir}/pgbouncer.log
"""

# One upstream and one server a set-up, in one nginx. Upstream connections are kept alive (as
# deploy/nginx.conf keeps them), and closed by nginx after 4 s idle, before gunicorn closes them
# at 5 s (its keepalive): a POST sent on a connection gunicorn is closing would be a 502, which
# nginx does not retry on another connection.
PROXY_SITE = """\
upstream {name} {{
    {servers}
    keepalive {keepalive};
    keepalive_timeout 4s;
    keepalive_requests 1000000;
}}
server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    client_max_body_size 256k;
    client_body_buffer_size 256k;
    location / {{
        proxy_pass http://{name};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_read_timeout 60s;
    }}
}}
"""
# As deploy/nginx.conf: idle upstream connections nginx keeps.
UPSTREAM_KEEPALIVE = 32


def add_arguments(parser) -> None:
    parser.add_argument("--instances", type=int, metavar="N",
                        help="N instances of one worker next to one instance of N workers, behind one nginx and one "
                             "PgBouncer, with one Redis; S1, S2, S3 (those of --scenarios) against both, taking turns "
                             "(bench/instances.py); results/<date>-<commit>-instances.md")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL,
                        help=f"with --instances: the Redis database they share, emptied before and after "
                             f"(default {DEFAULT_REDIS_URL})")
    parser.add_argument("--pgbouncer-pool", type=int, default=DEFAULT_POOL,
                        help=f"with --instances: PgBouncer's default_pool_size (default {DEFAULT_POOL})")


def check_args(parser, opts) -> None:
    if opts.instances is None:
        return
    if opts.instances < 2:
        parser.error("--instances takes 2 or more")
    if opts.sqlite:
        parser.error("--instances runs on PostgreSQL, through PgBouncer: not with --sqlite")
    opts.scenarios = [name for name in opts.scenarios if name in SCENARIOS]
    if not opts.scenarios:
        parser.error(f"--instances runs {', '.join(SCENARIOS)}: choose some of them with --scenarios")


def pgbouncer_binary() -> str | None:
    """pgbouncer on PATH, or Debian's /usr/sbin/pgbouncer (not on a non-root PATH)."""
    return shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of `pid` so far; None once it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def preemptions(pid: int) -> int:
    """Times the threads of `pid` were switched out while runnable (nonvoluntary context switches):
    what waiting for a core costs it."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            total += int(status.read_text().split("nonvoluntary_ctxt_switches:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


class PgBouncer:
    """PgBouncer in the foreground, in transaction mode, on a free loopback port in front of the
    PostgreSQL server of `server_url`; its config, log and user list under `workdir`. It refuses
    to run as root: as root it runs as the postgres user."""

    def __init__(self, workdir: Path, server_url: str, pool: int):
        self.dir = workdir / "pgbouncer"
        self.dir.mkdir()
        self.server = urlsplit(server_url)
        self.port = free_port()
        self.pool = pool
        self.process = None

    def url(self, database: str) -> str:
        """`database` through PgBouncer."""
        netloc = f"{self.server.username or 'postgres'}@127.0.0.1:{self.port}"
        return urlunsplit(self.server._replace(netloc=netloc, path=f"/{database}"))

    def start(self) -> "PgBouncer":
        user = self.server.username or "postgres"
        (self.dir / "pgbouncer.ini").write_text(PGBOUNCER_CONFIG.format(
            host=self.server.hostname or "127.0.0.1", port=self.server.port or 5432, listen_port=self.port,
            dir=self.dir, user=user, pool=self.pool))
        (self.dir / "userlist.txt").write_text(f'"{user}" ""\n')
        as_postgres = {}
        if os.geteuid() == 0:
            # The temp dir is root's: the postgres user may pass through it to its own directory.
            self.dir.parent.chmod(0o711)
            for path in [self.dir, *self.dir.iterdir()]:
                shutil.chown(path, "postgres", "postgres")
            as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self.process = popen([pgbouncer_binary(), str(self.dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, **as_postgres)
        deadline = time.monotonic() + 15
        while True:
            try:
                self.stats("pgbouncer")
                return self
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {self.log_tail()}")
                time.sleep(0.1)

    def stats(self, database: str) -> dict[str, int]:
        """SHOW STATS's totals for `database` (counts, and times in microseconds), from the admin console."""
        import psycopg

        with psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=2) as connection:
            cursor = connection.execute("SHOW STATS")
            names = [column.name for column in cursor.description]
            for row in cursor.fetchall():
                values = dict(zip(names, row))
                if values["database"] == database:
                    return {name: int(value) for name, value in values.items() if name.startswith("total_")}
        return {}

    def version(self) -> str:
        done = subprocess.run([pgbouncer_binary(), "--version"], capture_output=True, text=True, timeout=10)
        return done.stdout.splitlines()[0].replace("PgBouncer ", "") if done.stdout else "unknown"

    def log_tail(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class SetUp:
    """Instances of the service behind their own upstream in the proxy."""

    def __init__(self, name: str, services: list[Service]):
        self.name = name
        self.services = services
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = name.replace(" ", "")

    def site(self, keepalive: int) -> str:
        servers = "\n    ".join(f"server 127.0.0.1:{service.port};" for service in self.services)
        return PROXY_SITE.format(name=f"chatapp_{len(self.services)}_instances", servers=servers,
                                 keepalive=keepalive, port=self.port)

    def worker_pids(self) -> list[int]:
        return [pid for service in self.services for pid in service.worker_pids()]

    def wait_idle(self, log) -> None:
        for service in self.services:
            if not service.wait_idle():
                log(f"{self.name}: turns of the previous run still in flight after 15 s")


class Meter:
    """What one run cost on the way to the database: PgBouncer's counters, the CPU time of the
    processes involved, and the turns stored (messages / 2), read before and after it."""

    def __init__(self, database: Database, pgbouncer: PgBouncer, proxy: Nginx):
        self.database = database
        self.pgbouncer = pgbouncer
        self.proxy = proxy

    def read(self, setup: SetUp) -> dict:
        import psycopg

        with psycopg.connect(self.database.url, autocommit=True, connect_timeout=5) as connection:
            messages = connection.execute("SELECT count(*) FROM messages").fetchone()[0]
            backends = [pid for (pid,) in connection.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")]
        processes = {
            "database": backends,
            "workers": setup.worker_pids(),
            "pgbouncer": [self.pgbouncer.process.pid],
            "nginx": self.proxy.pids(),
        }
        return {"messages": messages, "pgbouncer": self.pgbouncer.stats(self.database.name),
                "cpu": {group: {pid: cpu_seconds(pid) for pid in pids} for group, pids in processes.items()},
                "preemptions": sum(preemptions(pid) for pid in processes["workers"])}

    @staticmethod
    def per_turn(before: dict, after: dict) -> dict:
        turns = (after["messages"] - before["messages"]) // 2
        if turns <= 0:
            return {"turns": 0}
        counters = {name: after["pgbouncer"].get(name, 0) - before["pgbouncer"].get(name, 0) for name in after["pgbouncer"]}
        cpu = {}
        for group, pids in after["cpu"].items():
            # A process started during the run (a new server connection) counts from zero.
            spent = [(seconds or 0) - (before["cpu"][group].get(pid) or 0) for pid, seconds in pids.items()]
            cpu[group] = {"ms_per_turn": 1000 * sum(spent) / turns, "each_s": [round(value, 2) for value in spent]}
        return {
            "turns": turns,
            "transactions": counters.get("total_xact_count", 0) / turns,
            "queries": counters.get("total_query_count", 0) / turns,
            "query_ms": counters.get("total_query_time", 0) / 1000 / turns,
            "transaction_ms": counters.get("total_xact_time", 0) / 1000 / turns,
            "wait_ms": counters.get("total_wait_time", 0) / 1000 / turns,
            "cpu": cpu,
            "worker_preemptions": (after["preemptions"] - before["preemptions"]) / turns,
        }


class InstancesBench:
    """The scenarios against each set-up, run by run, the set-ups taking turns going first."""

    def __init__(self, opts, harness, setups: list[SetUp], database: Database, meter: Meter,
                 tokens: dict[str, str], workdir: Path):
        self.opts = opts
        self.harness = harness
        self.setups = setups
        self.database = database
        self.meter = meter
        self.tokens = tokens
        self.workdir = workdir
        self.users_file = workdir / "users.tsv"
        self.users_file.write_text("".join(f"{user}\t{token}\n" for user, token in tokens.items()))
        self.results = {setup.key: {} for setup in setups}
        self.rounds = 0

    def load(self, scenario: str, setup: SetUp, label: str) -> dict:
        """The scenario's wrk arguments, as run.py's scenarios define them; S2's conversations built
        fresh through `setup`, so that every run continues conversations of the same length."""
        harness = self.harness
        if scenario == "S1":
            return {"connections": harness.CONNECTIONS, "threads": harness.CONNECTIONS,
                    "script_args": ["mode=new", f"data={self.users_file}"]}
        if scenario == "S2":
            client = harness.Client(SimpleNamespace(url=setup.url), self.tokens)
            conversations = client.conversations(harness.S2_CONVERSATIONS, 2)
            data = self.workdir / f"s2-{setup.key}-{label}.tsv"
            data.write_text("".join(f"{user}\t{self.tokens[user]}\t{conversation}\n" for user, conversation in conversations))
            return {"connections": harness.CONNECTIONS, "threads": harness.CONNECTIONS,
                    "script_args": ["mode=continue", f"data={data}"]}
        return {"connections": harness.SLOW_CONNECTIONS, "threads": 4,
                "script_args": ["mode=new", f"data={self.users_file}", f"request_id={SLOW_PREFIX}bench"]}

    def scenario(self, scenario: str) -> None:
        log = self.harness.log
        log(f"{scenario}: warm-up of each set-up")
        for setup in self.setups:
            if self.opts.warmup:
                run_wrk(setup.url, duration=self.opts.warmup, **self.load(scenario, setup, "warmup"))
        for index in range(self.opts.runs):
            # Over all the scenarios' runs, each set-up goes first as often as the other.
            order = self.setups if self.rounds % 2 == 0 else list(reversed(self.setups))
            self.rounds += 1
            for setup in order:
                load = self.load(scenario, setup, str(index))
                setup.wait_idle(log)
                self.database.settle()
                before = self.meter.read(setup)
                run = run_wrk(setup.url, duration=self.opts.duration, **load)
                setup.wait_idle(log)
                run["per_turn"] = Meter.per_turn(before, self.meter.read(setup))
                run["first"] = setup is order[0]
                self.results[setup.key].setdefault(scenario, []).append(run)
                log(f"{scenario} {setup.name}: {run['rps']:,.1f} req/s, p50 {run['p50_ms']:.2f} ms, "
                    f"p99 {run['p99_ms']:.2f} ms, non-2xx {run['non2xx']}, socket errors {run['socket_errors']}; "
                    f"{run['per_turn'].get('queries', 0):.2f} queries and "
                    f"{run['per_turn'].get('cpu', {}).get('database', {}).get('ms_per_turn', 0):.2f} ms of database CPU a turn")

    def run(self) -> dict:
        for scenario in self.opts.scenarios:
            self.scenario(scenario)
        return self.results


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def markdown(opts, setups: list[SetUp], results: dict, meta: dict) -> str:
    one, several = setups
    lines = [
        f"# {opts.instances} instances of one worker next to one instance of {opts.instances} workers, "
        "behind nginx and PgBouncer",
        "",
        f"{meta['date']}, commit {meta['commit']}; {opts.runs} run(s) of {opts.duration} s per scenario and set-up "
        "after a warm-up, the set-ups taking turns going first; medians over the runs (non-2xx and socket errors: "
        f"totals). Machine: {meta['machine']['cpus (nproc)']} cores ({meta['machine']['cpu']}), load average at the "
        f"start {meta['machine']['load average at start']}, at the end {meta['machine']['load average at the end']} "
        f"(other work on the machine is noise). {meta['stack']}",
        "",
        f"| scenario | {one.name} (req/s) | {several.name} (req/s) | ratio | non-2xx | socket errors | "
        "ratio within each round (median) | p50 ms | p99 ms | req/s of each run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for scenario in opts.scenarios:
        runs = {setup.key: results[setup.key].get(scenario, []) for setup in setups}
        if not all(runs.values()):
            continue
        rps = {key: statistics.median(run["rps"] for run in value) for key, value in runs.items()}
        ratio = rps[several.key] / rps[one.key] if rps[one.key] else 0.0
        non2xx = {key: sum(run["non2xx"] for run in value) for key, value in runs.items()}
        errors = {key: sum(run["socket_errors"] for run in value) for key, value in runs.items()}
        p50 = {key: statistics.median(run["p50_ms"] for run in value) for key, value in runs.items()}
        p99 = {key: statistics.median(run["p99_ms"] for run in value) for key, value in runs.items()}
        each = " / ".join(", ".join(f"{run['rps']:,.0f}" for run in runs[setup.key]) for setup in setups)
        # A round's two runs are seconds apart: their ratio is less moved by other work on the machine.
        in_rounds = [b["rps"] / a["rps"] for a, b in zip(runs[one.key], runs[several.key]) if a["rps"]]
        rounds = ", ".join(f"{value:.2f}" for value in in_rounds)
        lines.append(
            f"| {scenario} | {rps[one.key]:,.1f} | {rps[several.key]:,.1f} | {ratio:.2f} | "
            f"{non2xx[one.key]} / {non2xx[several.key]} | {errors[one.key]} / {errors[several.key]} | "
            f"{median(in_rounds):.2f} ({rounds}) | {p50[one.key]:.1f} / {p50[several.key]:.1f} | {p99[one.key]:.1f} / {p99[several.key]:.1f} | {each} |")
        verdicts.append(ratio >= TARGET_RATIO and not any(non2xx.values()) and not any(errors.values()))
    lines += [
        "",
        f"Pairs are {one.name} / {several.name}. Target: ratio >= {TARGET_RATIO:.2f} in every scenario, with no "
        f"non-2xx and no socket errors: **{'met' if verdicts and all(verdicts) else 'not met'}** (on the ratio of "
        "the medians).",
        "",
        "## Per turn, on the way to the database",
        "",
        "Medians over the runs, each run's figures divided by the turns it stored (messages / 2). Transactions, "
        "queries and their time in the server (PgBouncer's query time: from sending a query to its last row, "
        "the round trip included) and the time clients waited for a server connection are PgBouncer's SHOW STATS; "
        "CPU is user + system time from /proc: the database's backends (of this database only: not the WAL writer, "
        "checkpointer or autovacuum), the gunicorn workers of the set-up, PgBouncer, and the proxy nginx; "
        "preemptions are the workers' threads switched out while runnable (waiting for a core).",
        "",
        "| scenario | set-up | transactions | queries | query ms | transaction ms | wait ms | database CPU ms | "
        "workers CPU ms | PgBouncer CPU ms | nginx CPU ms | workers' preemptions | workers' CPU split |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario in opts.scenarios:
        for setup in setups:
            runs = [run["per_turn"] for run in results[setup.key].get(scenario, []) if run["per_turn"].get("turns")]
            if not runs:
                continue

            def cpu(group):
                return median(run["cpu"][group]["ms_per_turn"] for run in runs)

            split = []
            for run in runs:
                each = run["cpu"]["workers"]["each_s"]
                split.append("/".join(f"{100 * value / sum(each):.0f}" for value in each) if sum(each) else "-")
            lines.append(
                f"| {scenario} | {setup.name} | {median(r['transactions'] for r in runs):.2f} | "
                f"{median(r['queries'] for r in runs):.2f} | {median(r['query_ms'] for r in runs):.3f} | "
                f"{median(r['transaction_ms'] for r in runs):.3f} | {median(r['wait_ms'] for r in runs):.3f} | "
                f"{cpu('database'):.3f} | {cpu('workers'):.3f} | {cpu('pgbouncer'):.3f} | {cpu('nginx'):.3f} | "
                f"{median(r['worker_preemptions'] for r in runs):.2f} | {', '.join(split)} % |")
    lines += ["", "## Machine and settings", ""]
    lines += [f"- {name}: {value}" for name, value in meta["machine"].items()]
    lines += [f"- {name}: {value}" for name, value in meta["settings"].items()]
    return "\n".join(lines) + "\n"


def empty_redis(url: str) -> None:
    import redis

    with redis.Redis.from_url(url, socket_connect_timeout=2) as client:
        client.flushdb()


def main(opts, harness) -> int:
    """The whole side-by-side run; `harness` is run.py (its Client, loads, log and report helpers)."""
    log = harness.log
    if not pgbouncer_binary():
        print("bench: missing pgbouncer: run `make bench-deps` (apt-get install pgbouncer)", file=sys.stderr)
        return harness.MISSING_TOOLS_EXIT
    workdir = Path(tempfile.mkdtemp(prefix="chatapp-bench-instances-"))
    commit, dirty = harness.commit_of(opts.app_dir)
    started = datetime.now(timezone.utc)
    stub = database = pgbouncer = proxy = None
    services: list[Service] = []
    try:
        empty_redis(opts.redis_url)
        stub = AgentStub(workdir).start()
        database = Database(opts.pg_url, workdir).create()
        machine = harness.machine_info(database)  # the load average before the run's own load
        pgbouncer = PgBouncer(workdir, opts.pg_url, opts.pgbouncer_pool).start()
        pooled_url = pgbouncer.url(database.name)
        secret = secrets.token_urlsafe(48)  # one for every instance: a token is good on any of them
        env = {**dict(setting.split("=", 1) for setting in opts.env), "REDIS_URL": opts.redis_url,
               "JWT_SECRET_KEY": secret}

        def service(name: str, workers: int) -> Service:
            directory = workdir / name
            directory.mkdir()
            made = Service(opts.app_dir, directory, pooled_url, stub.base_url, workers=workers, threads=opts.threads,
                           extra_env=env)
            made.secret = secret
            services.append(made)
            return made

        count = opts.instances
        one = SetUp(f"1 x {count} workers", [service("one", count)])
        several = SetUp(f"{count} x 1 worker", [service(f"instance-{n}", 1) for n in range(1, count + 1)])
        log(f"database {database.name} through PgBouncer on port {pgbouncer.port}: migrating")
        services[0].migrate()
        for started_service in services:
            started_service.start()
        proxy = Nginx(workdir / "proxy", "\n".join(setup.site(UPSTREAM_KEEPALIVE) for setup in (one, several)),
                      one.port, worker_connections=4096).start()
        log(f"nginx: {one.name} on {one.url}, {several.name} on {several.url}")
        tokens = {f"bench-user-{index:02d}": services[0].token(f"bench-user-{index:02d}") for index in range(harness.USERS)}
        meter = Meter(database, pgbouncer, proxy)
        bench = InstancesBench(opts, harness, [one, several], database, meter, tokens, workdir)
        results = bench.run()
        machine["load average at the end"] = " ".join(f"{value:.2f}" for value in os.getloadavg())
        meta = {
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + (" (with uncommitted changes)" if dirty else ""),
            "machine": machine,
            "stack": (f"{machine['database server']} through PgBouncer {pgbouncer.version()} (transaction mode, "
                      f"default_pool_size {opts.pgbouncer_pool}); Redis {opts.redis_url} for the rate limit; nginx, "
                      f"1 worker process, keeping {UPSTREAM_KEEPALIVE} idle connections to each upstream."),
            "settings": {
                "set-ups": f"{one.name}: one gunicorn master, WEB_CONCURRENCY={count}; {several.name}: {count} "
                           "gunicorn masters, WEB_CONCURRENCY=1 each, one nginx upstream of them (round-robin)",
                "GUNICORN_THREADS (gthread threads per worker)": opts.threads,
                "service": "gunicorn.conf.py as the Procfile's web line, CHATAPP_ENV=production, "
                           f"RATE_LIMIT={harness.BENCH_RATE_LIMIT} (in Redis), DATABASE_URL through PgBouncer",
                "extra service settings": ", ".join(opts.env) or "none",
                "app checkout": "this one" if opts.app_dir.resolve() == harness.ROOT else f"another ({opts.app_dir.name})",
                "load generator": f"wrk against nginx, --timeout 10s; S1, S2 {harness.CONNECTIONS} threads x 1 "
                                  f"connection, S3 4 threads x {harness.SLOW_CONNECTIONS // 4} connections",
                "S2": f"{harness.S2_CONVERSATIONS} conversations of 2 messages built through the set-up before each run",
                "database": f"PostgreSQL, database {database.name} created for the run; VACUUM ANALYZE and "
                            "CHECKPOINT before each run",
            },
        }
        text = markdown(opts, [one, several], results, meta)
        print(text)
        if not opts.no_results_file:
            log(f"written to {report.write_results(text, opts.output, started, commit, '-instances')}")
        if opts.json:
            opts.json.write_text(json.dumps({"meta": meta, "setups": [one.name, several.name], "results": results},
                                            indent=2, default=str))
        return 0
    except Exception:
        for failed in services:
            print(f"--- gunicorn log of {failed.log_path.parent.name} (tail) ---\n{failed.log_tail()}", file=sys.stderr)
        if pgbouncer is not None:
            print(f"--- pgbouncer log (tail) ---\n{pgbouncer.log_tail()}", file=sys.stderr)
        raise
    finally:
        if proxy is not None:
            proxy.stop()
        for running in services:
            running.stop()
        if pgbouncer is not None:
            pgbouncer.stop()
        if database is not None:
            database.drop()
        if stub is not None:
            stub.stop()
        try:
            empty_redis(opts.redis_url)
        except Exception as exc:  # Redis gone meanwhile: nothing of ours left to remove there
            log(f"could not empty {opts.redis_url}: {exc}")
        if opts.keep_workdir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
