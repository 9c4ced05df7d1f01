"""The CPU time and the wall time of one chat turn inside the app, without gunicorn, wrk or noise
from their threads: the app's WSGI callable called in this process, one turn after the other, on
the benchmark's own PostgreSQL database and nginx agent stub. A steadier reading than wrk's for
comparing two versions of the code (`--app-dir`), and what `--profile` profiles. `--reference DIR`
measures a reference app the same way (bench/reference.py: its app.py, configured as
`bench/run.py --reference DIR` serves it).

    .venv/bin/python bench/turn_cost.py                         # new and continued turns, 3 x 2000 each
    .venv/bin/python bench/turn_cost.py --app-dir ../other      # another checkout, same harness
    .venv/bin/python bench/turn_cost.py --kind continue --profile turn.prof   # cProfile of those turns
    .venv/bin/python bench/turn_cost.py --reference ../reference-app          # a reference app, same harness
"""
import argparse
import cProfile
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from reference import ReferenceService, chatapp_pool_size
from service import Database, Service
from stub import ECHO_MODULE, AgentStub, nginx_binary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/bench_turn"
USER = "bench-user"
CONVERSATIONS = 100
MISSING_TOOLS_EXIT = 3  # as bench/run.py


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--kind", choices=["new", "continue", "both"], default="both",
                        help="new conversations, turns continuing existing ones, or both (default)")
    parser.add_argument("--turns", type=int, default=2000, help="turns per run (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PostgreSQL")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help=f"database to create and drop (default {DEFAULT_PG_URL})")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the last run here (pstats format)")
    parser.add_argument("--reference", type=Path, metavar="DIR",
                        help="measure the reference app in DIR instead of chatapp (PostgreSQL only)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    opts = parser.parse_args(argv)
    if opts.reference and opts.sqlite:
        parser.error("--reference needs PostgreSQL")
    return opts


class TurnCaller:
    """POST /api/<user>/chat straight into the app's WSGI callable, from a prepared environ."""

    def __init__(self, app, token: str):
        from werkzeug.test import EnvironBuilder

        self.app = app
        self.base = EnvironBuilder(
            path=f"/api/{USER}/chat", method="POST", headers={"Authorization": f"Bearer {token}"},
            content_type="application/json", data=b"{}",
        ).get_environ()

    def turn(self, body: bytes) -> dict:
        environ = dict(self.base, CONTENT_LENGTH=str(len(body)))
        environ["wsgi.input"] = io.BytesIO(body)
        status = []
        chunks = self.app(environ, lambda code, headers, exc_info=None: status.append(code))
        answer = b"".join(chunks)
        if hasattr(chunks, "close"):
            chunks.close()
        if not status[0].startswith("200"):
            raise RuntimeError(f"turn failed: {status[0]} {answer[:300]!r}")
        return json.loads(answer)


def measure(turns, call) -> tuple[float, float]:
    """CPU and wall microseconds per turn over `turns` calls of `call(index)`."""
    cpu, wall = time.process_time(), time.perf_counter()
    for index in range(turns):
        call(index)
    return (time.process_time() - cpu) / turns * 1e6, (time.perf_counter() - wall) / turns * 1e6


def chatapp_app(app_dir: Path, database: Database, stub: AgentStub, workdir: Path):
    """chatapp's WSGI app of `app_dir`, migrated and configured as the benchmark serves it; a token
    for USER; a function that closes its database connections."""
    service = Service(app_dir, workdir, database.url, stub.base_url, workers=1, threads=1, extra_env={})
    service.migrate()
    os.environ.update(service.app_env)
    os.chdir(app_dir)
    sys.path.insert(0, str(app_dir))
    from wsgi import app  # noqa: E402  (the checkout under test, configured from the environment)

    def close():
        from chatapp.extensions import db

        with app.app_context():
            db.engine.dispose()

    return app, service.token(USER), close


def reference_app(reference_dir: Path, app_dir: Path, database: Database, stub: AgentStub, workdir: Path):
    """The reference app's `app` from its app.py, its schema created and its settings those of
    `bench/run.py --reference` (its pool as large as chatapp's of `app_dir`); a token; a closer."""
    chatapp = Service(app_dir, workdir, database.url, stub.base_url, workers=1, threads=1, extra_env={})
    service = ReferenceService(reference_dir, workdir, database.url, stub.base_url, workers=1, threads=1,
                               pool_size=chatapp_pool_size(chatapp))
    service.migrate()
    os.environ.update(service.app_env)
    os.chdir(reference_dir)
    spec = importlib.util.spec_from_file_location("reference_app", reference_dir / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def close():
        # A pool of connections (psycopg_pool's, as its README's app keeps), if it has one.
        pool = getattr(module, "pool", None)
        if hasattr(pool, "close"):
            pool.close()

    return module.app, service.token(USER), close


def main(argv=None) -> int:
    opts = parse_args(argv)
    if not nginx_binary() or not ECHO_MODULE.exists():
        print("turn_cost.py needs nginx and its echo module: make bench-deps", file=sys.stderr)
        return MISSING_TOOLS_EXIT
    app_dir = opts.app_dir.resolve()
    figures = {}
    with tempfile.TemporaryDirectory(prefix="chatapp-turn-") as workdir:
        workdir = Path(workdir)
        database = Database(None if opts.sqlite else opts.pg_url, workdir).create()
        stub = AgentStub(workdir).start()
        close = None
        try:
            # The app logs a JSON line a request to stdout, as under gunicorn: written, to nowhere.
            results_out, sys.stdout = sys.stdout, open(os.devnull, "w")
            if opts.reference:
                app, token, close = reference_app(opts.reference.resolve(), app_dir, database, stub, workdir)
            else:
                app, token, close = chatapp_app(app_dir, database, stub, workdir)
            caller = TurnCaller(app, token)
            new_body = b'{"message":"Hello from the turn benchmark: what is a good name for it?"}'
            conversations = [caller.turn(new_body)["conversation_id"] for _ in range(CONVERSATIONS)]

            def new_turn(_index):
                caller.turn(new_body)

            def continue_turn(index):
                conversation_id = conversations[index % CONVERSATIONS]
                caller.turn(b'{"message":"And another question, please?","conversation_id":"%s"}' % conversation_id.encode())

            kinds = {"new": new_turn, "continue": continue_turn}
            chosen = list(kinds) if opts.kind == "both" else [opts.kind]
            profiler = cProfile.Profile() if opts.profile else None
            measure(min(200, opts.turns), kinds[chosen[0]])  # warm-up: caches, pool, imports
            for kind in chosen:
                results = []
                for run in range(opts.runs):
                    last = run == opts.runs - 1 and kind == chosen[-1]
                    if profiler and last:
                        profiler.enable()
                    results.append(measure(opts.turns, kinds[kind]))
                    if profiler and last:
                        profiler.disable()
                cpu = statistics.median(r[0] for r in results)
                wall = statistics.median(r[1] for r in results)
                runs = ", ".join(f"{r[0]:.0f}/{r[1]:.0f}" for r in results)
                figures[kind] = {"cpu_us": cpu, "wall_us": wall, "runs": results}
                print(f"{kind:9s} turn: CPU {cpu:7.1f} us, wall {wall:7.1f} us (median of {opts.runs} x {opts.turns}; "
                      f"cpu/wall a run: {runs})", file=results_out)
            if profiler:
                profiler.dump_stats(opts.profile)
                print(f"profile of the last run written to {opts.profile}", file=results_out)
        finally:
            stub.stop()
            if close is not None:
                close()
            database.drop()
    if opts.json:
        opts.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
