"""`bench/run.py --reference DIR`: chatapp and a reference app side by side, in one sitting.

A reference app is a directory holding `app.py` (a Flask app, `app`, serving `POST /api/<user_id>/chat`
as chatapp does, with a JSON answer holding `conversation_id`, and `GET /health`) and `schema.sql`.
It is served as its own README runs it: its tables in a schema of their own (`floor`) of the run's
database, gunicorn `app:app -k gthread` in its directory with chatapp's workers and threads, and
DATABASE_URL, AGENT_URL, JWT_SECRET_KEY and POOL_SIZE as its settings. S1, S2, S4 and S3 then run on
both, one run at a time, the two taking turns going first; the report is chatapp / reference. See
bench/README.md.
"""
import argparse
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import requests

import compare
import report
from service import Service
from tests.support.live_server import BIN, LiveServer

BENCH_DIR = Path(__file__).resolve().parent
SCENARIOS = ["S1", "S2", "S4", "S3"]  # in the order they run: the slow agent last, as run.py does
SIDES = ("chatapp", "reference")
SCHEMA = "floor"  # the reference's README: its tables apart from chatapp's, in the same database
MIN_THROUGHPUT_RATIO = 0.9  # S1 and S2: chatapp / reference req/s
MAX_LATENCY_RATIO = 1.3  # S4, conversations of 10 messages: chatapp / reference p50
# key in the results, what it is, what is compared, the goal of chatapp / reference (None: informative)
ROWS = [
    ("S1", "new-conversation turns, instant agent, 16 connections", "req/s", (">=", MIN_THROUGHPUT_RATIO)),
    ("S2", "turns continuing 256 conversations, instant agent, 16 connections", "req/s", (">=", MIN_THROUGHPUT_RATIO)),
    ("S3", "new-conversation turns, 200 ms agent, 128 connections", "req/s", None),
    ("S4-short", "sequential turns, conversations of 10 messages", "p50 ms", ("<=", MAX_LATENCY_RATIO)),
    ("S4-long", "sequential turns, a conversation of 2,000 messages", "p50 ms", None),
]


def check_args(parser: argparse.ArgumentParser, opts) -> None:
    """--reference's own rules, called by run.py's parse_args."""
    if opts.reference is None:
        return
    opts.reference = opts.reference.resolve()
    missing = [name for name in ("app.py", "schema.sql") if not (opts.reference / name).is_file()]
    if missing:
        parser.error(f"--reference {opts.reference}: no {' or '.join(missing)} there")
    if opts.sqlite:
        parser.error("--reference needs PostgreSQL: the reference app has no SQLite")
    opts.scenarios = [name for name in SCENARIOS if name in opts.scenarios]
    if not opts.scenarios:
        parser.error("--reference runs S1, S2, S3 and S4 only: choose some of them with --scenarios")


def in_schema(database_url: str) -> str:
    """The database URL with the reference's schema as search_path (a libpq option)."""
    parts = urlsplit(database_url)
    option = f"options=-csearch_path%3D{SCHEMA}"
    return urlunsplit(parts._replace(query=f"{parts.query}&{option}" if parts.query else option))


def database_named(database_url: str, name: str) -> str:
    """Another database of the same server."""
    return urlunsplit(urlsplit(database_url)._replace(path="/" + name))


def chatapp_pool_size(chatapp: Service) -> int:
    """The most connections a chatapp worker holds (DATABASE_POOL_SIZE + DATABASE_MAX_OVERFLOW), as
    the served checkout's config.py reads them from the service's settings (--env included)."""
    code = ("from config import config_from_env; settings = config_from_env(); "
            "print(settings.DATABASE_POOL_SIZE + settings.DATABASE_MAX_OVERFLOW)")
    done = subprocess.run([sys.executable, "-c", code], cwd=chatapp.app_dir, env=chatapp.env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"reading chatapp's pool size: {done.stderr[-2000:]}")
    return int(done.stdout.strip())


class ReferenceService(Service):
    """The reference app as its README runs it: gunicorn `app:app -k gthread` in its directory, on
    loopback, with its tables in schema `floor` of the run's database; ready once /health answers."""

    def __init__(self, reference_dir: Path, workdir: Path, database_url: str, agent_url: str, *,
                 workers: int, threads: int, pool_size: int):
        self.secret = secrets.token_urlsafe(48)
        self.threads = threads
        self.database_url = database_url
        self.app_env = {
            "DATABASE_URL": in_schema(database_url),
            "AGENT_URL": agent_url,
            "JWT_SECRET_KEY": self.secret,
            "POOL_SIZE": str(pool_size),
        }
        # Not Service.__init__, which would give it chatapp's settings: the reference gets its own only.
        LiveServer.__init__(self, self.app_env, workers=workers, threads=threads, app_dir=Path(reference_dir),
                            log_path=workdir / "reference-gunicorn.log")

    def command(self) -> list[str]:
        """Its README's command line, with chatapp's workers and threads."""
        return [str(BIN / "gunicorn"), "app:app", "-k", "gthread", "-w", str(self.workers),
                "--threads", str(self.threads), "-b", f"127.0.0.1:{self.port}", "--keep-alive", "75",
                "--backlog", "2048"]

    def ready(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or a worker still booting
            return False

    def migrate(self) -> None:
        """Its schema.sql in its own schema (CREATE ... IF NOT EXISTS, as its README runs it)."""
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            connection.execute(f"SET search_path TO {SCHEMA}")
            connection.execute((self.app_dir / "schema.sql").read_text())

    def restart(self, agent_url: str) -> None:
        """The same app on the same port and secret, asking another agent URL."""
        self.stop()
        self.env["AGENT_URL"] = self.app_env["AGENT_URL"] = agent_url
        self.start()

    def wait_idle(self, timeout: float = 15) -> bool:
        # No gauge of turns in flight; its turns claim nothing, so one still running when the next
        # run starts fails nothing: a second is for the last of them to end.
        time.sleep(1)
        return True


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def turn_costs(opts, database, workdir: Path) -> dict[str, list[dict]]:
    """bench/turn_cost.py's CPU and wall time per turn, in process, of chatapp and of the reference:
    one run of each at a time, the two taking turns going first, on a database of their own."""
    url = database_named(database.url, f"{database.name}_turn")
    turns = "20" if opts.quick else "2000"
    costs = {side: [] for side in SIDES}
    for index in range(opts.runs):
        for side in SIDES if index % 2 == 0 else reversed(SIDES):
            log(f"turn cost in process, run {index + 1}/{opts.runs}: {side}")
            output = workdir / f"turn-cost-{side}-{index}.json"
            command = [sys.executable, str(BENCH_DIR / "turn_cost.py"), "--runs", "1", "--turns", turns,
                       "--pg-url", url, "--app-dir", str(opts.app_dir), "--json", str(output)]
            if side == "reference":
                command += ["--reference", str(opts.reference)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"turn_cost.py failed for {side}:\n{done.stderr[-3000:]}")
            costs[side].append(json.loads(output.read_text()))
    return costs


def side_by_side(opts, make_bench, chatapp: Service, stub, database, workdir: Path, *,
                 commit: str, dirty: bool, started, machine: dict) -> int:
    """The scenarios on chatapp and on the reference, one run at a time, taking turns; the report."""
    pool_size = chatapp_pool_size(chatapp)
    reference = ReferenceService(opts.reference, workdir, database.url, stub.base_url,
                                 workers=opts.workers, threads=opts.threads, pool_size=pool_size)
    # Each call of a scenario is one warm-up and one run: the rounds are made here.
    one_run = argparse.Namespace(**{**vars(opts), "runs": 1})
    try:
        reference.migrate()
        reference.start()
        log(f"reference on {reference.url}: workers {reference.worker_pids()}, {opts.threads} threads each")
        benches = {}
        for side, service in zip(SIDES, (chatapp, reference)):
            (workdir / side).mkdir()
            benches[side] = make_bench(one_run, service, stub, workdir / side, database)
        for name in opts.scenarios:
            if name == "S3":
                # A reference need not forward X-Request-ID, chatapp's way to the stub's 200 ms answers:
                # for S3 it asks the stub's slow path itself (the same nginx, the same 200 ms).
                reference.restart(stub.slow_base_url)
            for index in range(opts.runs):
                for side in SIDES if index % 2 == 0 else reversed(SIDES):
                    log(f"{name} run {index + 1}/{opts.runs}: {side}")
                    database.settle()
                    getattr(benches[side], name.lower())()
        costs = turn_costs(opts, database, workdir)
    except Exception:
        print(f"--- reference gunicorn log (tail) ---\n{reference.log_tail()}", file=sys.stderr)
        raise
    finally:
        reference.stop()

    results = {side: bench.results for side, bench in benches.items()}
    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "reference": opts.reference.name,
        "chatapp_checkout": None if opts.app_dir.resolve() == BENCH_DIR.parent else opts.app_dir.resolve().name,
        "runs": opts.runs,
        "duration": opts.duration,
        "s4_turns": opts.s4_turns,
        "workers": opts.workers,
        "threads": opts.threads,
        "pool_size": pool_size,
        "extra_settings": opts.env,
        "machine": machine,
    }
    text = markdown(meta, results, costs)
    print(text)
    if not opts.no_results_file:
        log(f"written to {report.write_results(text, opts.output, started, commit, '-reference')}")
    if opts.json:
        opts.json.write_text(json.dumps({"meta": meta, **results, "turn_cost": costs, "ratios": ratios(results)},
                                        indent=2, default=str))
    return 0


def ratios(results: dict) -> list[dict]:
    """chatapp / reference for each row measured: medians over the runs, with the goal met or not."""
    out = []
    for key, what, measure, goal in ROWS:
        entries = [results[side]["scenarios"].get(key) for side in SIDES]
        if not all(entry and entry["runs"] for entry in entries):
            continue
        chatapp, reference = (report.summarize(entry["runs"]) for entry in entries)
        field = "rps" if measure == "req/s" else "p50_ms"
        ratio = chatapp[field] / reference[field] if reference[field] else None
        met = None
        if goal and ratio is not None:
            met = ratio >= goal[1] if goal[0] == ">=" else ratio <= goal[1]
        out.append({"key": key, "what": what, "measure": measure, "chatapp": chatapp[field],
                    "reference": reference[field], "ratio": ratio, "goal": f"{goal[0]} {goal[1]}" if goal else None,
                    "met": met, "non2xx": (chatapp["non2xx"], reference["non2xx"]),
                    "socket_errors": (chatapp["socket_errors"], reference["socket_errors"])})
    return out


def _median_costs(runs: list[dict], kind: str) -> tuple[float, float] | None:
    measured = [run[kind] for run in runs if kind in run]
    if not measured:
        return None
    return statistics.median(m["cpu_us"] for m in measured), statistics.median(m["wall_us"] for m in measured)


def turn_cost_table(costs: dict[str, list[dict]]) -> list[str]:
    lines = ["| turn | chatapp CPU us | reference CPU us | CPU ratio | chatapp wall us | reference wall us | wall ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, what in (("new", "new conversation"), ("continue", "continuing one")):
        chatapp, reference = _median_costs(costs["chatapp"], kind), _median_costs(costs["reference"], kind)
        if chatapp and reference:
            lines.append(f"| {what} | {chatapp[0]:,.0f} | {reference[0]:,.0f} | {chatapp[0] / reference[0]:.2f} | "
                         f"{chatapp[1]:,.0f} | {reference[1]:,.0f} | {chatapp[1] / reference[1]:.2f} |")
    return lines


def markdown(meta: dict, results: dict, costs: dict) -> str:
    machine = meta["machine"]
    lines = [
        f"# chatapp and a reference app side by side, {meta['date']}, commit {meta['commit']}", "",
        f"Reference: `{meta['reference']}`. One sitting, one stub, one PostgreSQL database: each scenario "
        f"{meta['runs']} run(s) of {meta['duration']} s on each app (S4: {meta['s4_turns']} turns a run), one at a "
        "time, the two taking turns going first, each run after a warm-up and on a settled database "
        "(`VACUUM ANALYZE`, `CHECKPOINT`); medians over the runs, non-2xx and socket errors summed. "
        f"Machine: {machine['cpus (nproc)']} cores ({machine['cpu']}), load average at the start "
        f"{machine['load average at start']}; {machine['database server']}.", "",
        "Ratio: chatapp / reference, of req/s for S1-S3 (higher is better for chatapp) and of the p50 "
        "for S4 (lower is better).", "",
        "| scenario | what | measure | chatapp | reference | ratio | goal | met | non-2xx (chatapp / reference) "
        "| socket errors (chatapp / reference) |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for row in ratios(results):
        met = {True: "met", False: "**not met**", None: "-"}[row["met"]]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        digits = 1 if row["measure"] == "req/s" else 2
        lines.append(f"| {row['key']} | {row['what']} | {row['measure']} | {row['chatapp']:,.{digits}f} | "
                     f"{row['reference']:,.{digits}f} | {ratio} | {row['goal'] or 'informative'} | {met} | "
                     f"{row['non2xx'][0]} / {row['non2xx'][1]} | {row['socket_errors'][0]} / {row['socket_errors'][1]} |")
    # compare.py's table of medians, the reference as its baseline: "req/s vs reference" is chatapp / reference.
    lines += ["", "## Each app", "",
              compare.table(SimpleNamespace(variant=[{"name": "reference"}, {"name": "chatapp"}]),
                            {side: [results[side]] for side in SIDES})]
    if any(costs.values()):
        lines += ["", "## CPU and wall time of one turn, in process (bench/turn_cost.py)", "",
                  "The app's WSGI callable called in one process, one turn after another, on a database of its "
                  "own and the same nginx stub: no gunicorn, wrk or other threads. Medians over "
                  f"{len(costs['chatapp'])} run(s) of each, the two taking turns going first "
                  "(`bench/turn_cost.py` and `bench/turn_cost.py --reference DIR`).", ""]
        lines += turn_cost_table(costs)
    # Each call of a scenario adds its notes again, and both apps often have the same: each note once.
    notes: dict[str, list[str]] = {}
    for side in SIDES:
        for note in results[side].get("notes") or []:
            notes.setdefault(note, [])
            if side not in notes[note]:
                notes[note].append(side)
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {'both' if len(sides) == 2 else sides[0]}: {note}" for note, sides in notes.items()]
    extra = ", ".join(meta["extra_settings"]) or "none"
    checkout = f"another checkout ({meta['chatapp_checkout']})" if meta["chatapp_checkout"] else "this checkout"
    lines += [
        "", "## Settings", "",
        f"- both: {meta['workers']} gunicorn workers x {meta['threads']} gthread threads, {meta['pool_size']} "
        "database connections a worker, the same nginx agent stub, HS256 tokens (sub, iat, exp) for 16 users",
        f"- chatapp: {checkout}, as `bench/run.py` serves it (gunicorn.conf.py, CHATAPP_ENV=production, "
        f"RATE_LIMIT out of reach); extra settings: {extra}",
        f"- reference: `gunicorn app:app -k gthread -w {meta['workers']} --threads {meta['threads']} "
        f"--keep-alive 75 --backlog 2048` in its directory, POOL_SIZE={meta['pool_size']}, its tables in schema "
        f"`{SCHEMA}` of the same database, its own JWT_SECRET_KEY; AGENT_URL the stub's /v1, and for S3 the "
        "stub's /slow/v1 (the stub answers chatapp slowly by the X-Request-ID it forwards; a reference need not)",
    ]
    return "\n".join(lines) + "\n"
