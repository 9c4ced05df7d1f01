"""nginx in the foreground on loopback, with its configuration, pid, logs and temp files in a directory
of the caller's: deploy/nginx.conf in front of one or several gunicorn instances (the tests), or a
site of the caller's own (the benchmark's proxy)."""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.live_server import ROOT
from tests.support.processes import children, popen, stop

MAIN_CONFIG = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/chatapp.conf;
}}
"""


def nginx_binary() -> str | None:
    """nginx on PATH, or Debian's /usr/sbin/nginx (not on a non-root PATH)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def deploy_site(port: int, upstream_ports: list[int]) -> str:
    """deploy/nginx.conf as shipped, but for its listen address (loopback `port`) and its upstream's
    servers (one a port, balanced round-robin, nginx's default)."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server 127.0.0.1:8000;" in site and "listen 80;" in site
    servers = "\n    ".join(f"server 127.0.0.1:{upstream};" for upstream in upstream_ports)
    return site.replace("server 127.0.0.1:8000;", servers).replace("listen 80;", f"listen 127.0.0.1:{port};")


class Nginx:
    """nginx serving `site` (the body of its http block) from `directory`; ready once `port` accepts."""

    def __init__(self, directory: Path, site: str, port: int, worker_connections: int = 1024):
        self.dir = directory
        self.site = site
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.worker_connections = worker_connections
        self.process = None

    def start(self, timeout: float = 10) -> "Nginx":
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (make bench-deps)")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "chatapp.conf").write_text(self.site)
        config = self.dir / "nginx.conf"
        config.write_text(MAIN_CONFIG.format(dir=self.dir, worker_connections=self.worker_connections))
        self.process = popen([binary, "-p", str(self.dir), "-c", str(config), "-e", str(self.dir / "error.log")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.errors()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen in {timeout:.0f} s: {self.errors()}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The master and its worker."""
        return [self.process.pid, *children(self.process.pid)] if self.process else []

    def errors(self) -> str:
        path = self.dir / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=10)
            self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
