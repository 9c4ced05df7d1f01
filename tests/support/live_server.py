"""The service under gunicorn, as the Procfile runs it, on a free loopback port."""
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.support.processes import children, free_port, popen, stop

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def procfile() -> dict[str, str]:
    """The Procfile's process types and their commands."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


def raw_request(port: int, head: bytes, body_parts=(), read_timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send `head` and then each part of the body on one connection, as written (no framing
    added); the status, headers and body of the final answer (interim 1xx answers are skipped)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while True:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            head_bytes, _, body = answer.partition(b"\r\n\r\n")
            if not head_bytes.startswith(b"HTTP/1.1 1"):
                break
            answer = body  # an interim answer (100 Continue): the final one follows
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


# The app's settings are the caller's to give: none of the environment's may leak into the server.
APP_PREFIXES = ("JWT_", "AGENT_", "CHATAPP_", "DATABASE_", "SQLALCHEMY_", "CONTEXT_", "RATE_", "REDIS_",
                "IDEMPOTENCY_", "LOG_", "GUNICORN_", "TURN_", "REQUEST_", "METRICS_", "STREAM_", "TOKEN_")
APP_NAMES = {"WEB_CONCURRENCY", "PORT", "DEFAULT_MODEL", "ALLOWED_MODELS", "MAX_CONTENT_LENGTH",
             "PROMETHEUS_MULTIPROC_DIR", "RETENTION_DAYS"}


class LiveServer:
    """`gunicorn wsgi:app --config gunicorn.conf.py` of a checkout (this one by default) in a
    subprocess that dies with this one, bound to 127.0.0.1 only, with `env` as its settings."""

    def __init__(self, env: dict, workers: int = 1, threads: int = 8, extra_args: tuple = (),
                 app_dir: Path = ROOT, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app_dir = app_dir
        self.workers = workers
        self.env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(APP_PREFIXES) and key not in APP_NAMES},
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_THREADS": str(threads),
            **env,
        }
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.process = None
        self.log = None
        self.output = ""  # what gunicorn printed, once stopped

    def run_release(self) -> subprocess.CompletedProcess:
        """The Procfile's release line: `flask --app wsgi db upgrade`."""
        return subprocess.run(
            [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
            cwd=self.app_dir, env=self.env, capture_output=True, text=True, timeout=120,
        )

    def command(self) -> list[str]:
        # --bind overrides the config's 0.0.0.0 so that the test listens on loopback only.
        return [str(BIN / "gunicorn"), "wsgi:app", "--config", "gunicorn.conf.py", "--bind", f"127.0.0.1:{self.port}", *self.extra_args]

    def start(self, timeout: float = 30) -> "LiveServer":
        """Start it; ready once /healthz answers."""
        # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging.
        self.log = open(self.log_path, "w+") if self.log_path else tempfile.TemporaryFile(mode="w+")
        self.process = popen(self.command(), cwd=self.app_dir, env=self.env, stdout=self.log,
                             stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.stop()}")
            if self.ready():
                return self
            time.sleep(0.1)
        output = self.stop()
        raise RuntimeError(f"gunicorn did not become ready in {timeout:.0f} s: {output[-3000:]}")

    def ready(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:  # not listening yet, or the worker still booting
            return False

    def worker_pids(self) -> list[int]:
        return children(self.process.pid) if self.process else []

    def stop(self) -> str:
        """Stop gunicorn (SIGTERM: a graceful shutdown); its output."""
        if self.process is None:
            return ""
        stop(self.process, timeout=60)
        self.log.seek(0)
        self.output = self.log.read()
        self.log.close()
        self.process = None
        return self.output

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class ProcfileServer(LiveServer):
    """The Procfile's process types as a platform starts them, through a Procfile runner (honcho):
    `release` to its end, then `web`, with PORT and every other setting from the environment.
    GUNICORN_CMD_ARGS (which gunicorn reads after its config file) keeps it on loopback."""

    def __init__(self, env: dict, workers: int = 1, threads: int = 8):
        super().__init__(env, workers, threads)
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"  # the Procfile's commands, as a platform finds them
        self.env["GUNICORN_CMD_ARGS"] = f"--bind 127.0.0.1:{self.port}"

    def run_release(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "honcho"), "start", "--no-colour", "release"],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=120,
        )

    def command(self) -> list[str]:
        return [str(BIN / "honcho"), "start", "--no-colour", "web"]


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb) on a free loopback port, to stop and start at will:
    a database outage, for real. As root it runs as the postgres user (initdb refuses root)."""

    def __init__(self):
        self.bin_dir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        # Not a private temporary directory: the cluster may run as another user.
        self.base = Path(tempfile.mkdtemp(prefix="chatapp-pg-"))
        self.base.chmod(0o755)
        self.run_as = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres?connect_timeout=2"

    @staticmethod
    def available() -> bool:
        return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))

    def create(self) -> "ThrowawayPostgres":
        subprocess.run([*self.run_as, self.bin_dir / "initdb", "-D", self.base / "data", "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        return self

    def _pg_ctl(self, *args, check=True) -> None:
        subprocess.run([*self.run_as, self.bin_dir / "pg_ctl", "-D", self.base / "data", "-l", self.base / "log",
                        "-w", "-t", "30", *args], check=check, capture_output=True)

    def start(self) -> None:
        self._pg_ctl("-o", f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def destroy(self) -> None:
        self._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
