"""The service under test, as the Procfile runs it: its own database, the release line, then gunicorn."""
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import jwt
import requests

import procs  # noqa: F401  (puts the checkout on sys.path for tests.support)
from tests.support.live_server import LiveServer

# The contract's per-user limit (60 turns a minute) would turn a load test into 429s: the benchmark
# measures what a turn costs, the limiter included, with a limit that load never reaches.
BENCH_RATE_LIMIT = "100000000 per minute"


class Database:
    """A PostgreSQL database created for the run and dropped after it, or a SQLite file."""

    def __init__(self, url: str | None, workdir: Path):
        self.sqlite = url is None
        if self.sqlite:
            self.url = f"sqlite:///{workdir / 'bench.db'}"
            self.name = str(workdir / "bench.db")
        else:
            self.url = url
            parts = urlsplit(url)
            self.name = parts.path.lstrip("/")
            if not self.name or not self.name.replace("_", "").isalnum():
                raise ValueError(f"the benchmark database needs a plain name, got {self.name!r}")
            self._admin_url = urlunsplit(parts._replace(path="/postgres"))
        self.created = False

    def _admin(self, statement: str) -> None:
        import psycopg  # the project's own driver, from its venv

        with psycopg.connect(self._admin_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(statement)

    def create(self) -> "Database":
        if not self.sqlite:
            # A database of its own: a leftover of a crashed run is dropped; one in use makes this fail.
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}"')
            self._admin(f'CREATE DATABASE "{self.name}"')
        self.created = True
        return self

    def drop(self) -> None:
        if self.created and not self.sqlite:
            self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False

    def settle(self) -> None:
        """VACUUM ANALYZE, then CHECKPOINT: the next scenario starts without the previous one's
        dead rows, stale planner statistics or unwritten pages, which autovacuum and the
        checkpointer would otherwise work off in the middle of its measurement."""
        if self.sqlite:
            return
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
            connection.execute("VACUUM ANALYZE")
            connection.execute("CHECKPOINT")

    def server_version(self) -> str:
        if self.sqlite:
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        import psycopg

        with psycopg.connect(self.url, connect_timeout=5) as connection:
            return "PostgreSQL " + connection.execute("SHOW server_version").fetchone()[0]


class Service(LiveServer):
    """The Procfile's two lines for the benchmark: `flask --app wsgi db upgrade`, then gunicorn with
    production settings on loopback (the tests' LiveServer), ready once every worker answers."""

    def __init__(self, app_dir: Path, workdir: Path, database_url: str, agent_url: str, *,
                 workers: int, threads: int, extra_env: dict[str, str]):
        self.secret = secrets.token_urlsafe(48)
        (workdir / "metrics").mkdir(exist_ok=True)
        self.app_env = {
            "CHATAPP_ENV": "production",
            "DATABASE_URL": database_url,
            "JWT_SECRET_KEY": self.secret,
            "AGENT_URL": agent_url,
            "RATE_LIMIT": BENCH_RATE_LIMIT,
            # Where gunicorn.conf.py's Prometheus multiprocess files go: in the run's temp dir, removed with it.
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
            **extra_env,
        }
        super().__init__(self.app_env, workers=workers, threads=threads, app_dir=app_dir,
                         log_path=workdir / "gunicorn.log")

    def migrate(self) -> None:
        """The Procfile's release line."""
        done = self.run_release()
        if done.returncode != 0:
            raise RuntimeError(f"flask db upgrade failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> "Service":
        super().start(timeout=60)
        deadline = time.monotonic() + 60
        while len(self.worker_pids()) < self.workers or not self.ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn's workers did not all start in 60 s:\n{self.log_tail()}")
            time.sleep(0.1)
        # Every worker imports the app before its first request: give them a few requests each.
        for _ in range(self.workers * 4):
            self.ready()
        return self

    def wait_idle(self, timeout: float = 15) -> bool:
        """Wait until no turn is in flight (the app's own gauge, summed over the workers): wrk drops
        its connections at the end of a run, but the turns they sent still run to their end, and a
        turn still holding its conversation would answer the next run's first turn on it with 409."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = requests.get(self.url + "/metrics", timeout=2).text
            except requests.RequestException:
                text = ""
            for line in text.splitlines():
                if line.startswith("chatapp_turns_in_flight ") and float(line.split()[1]) == 0:
                    return True
            time.sleep(0.05)
        return False

    def token(self, user_id: str, lifetime: int = 6 * 3600) -> str:
        """A bearer token as `flask create-token` makes it: HS256 with sub, iat and exp."""
        now = int(time.time())
        return jwt.encode({"sub": user_id, "iat": now, "exp": now + lifetime}, self.secret, algorithm="HS256")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
