"""The agent stub: nginx with its echo module answering OpenAI-shaped chat completions on loopback.

`POST /v1/chat/completions` answers at once; when the request's X-Request-ID starts with "slow-"
(the app forwards the client's X-Request-ID to the agent) it answers after 200 ms, as
`POST /slow/v1/chat/completions` always does. No Python in the path, so the stub is never the
bottleneck; `GET /stub_status` counts the requests in flight.
"""
import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from procs import free_port, popen
from tests.support.nginx import nginx_binary  # noqa: F401  (run.py and turn_cost.py take it from here)

ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
SLOW_SECONDS = 0.2
SLOW_PREFIX = "slow-"
COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1764000000,"model":"gpt-4",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the benchmark stub."},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
)

CONFIG = """\
load_module {echo_module};
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # The app keeps its connections to the agent alive: never make it reconnect.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 256k;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location = /v1/chat/completions {{
            if ($http_x_request_id ~ "^{slow_prefix}") {{
                rewrite ^ /slow/v1/chat/completions last;
            }}
            echo_read_request_body;
            echo '{completion}';
        }}
        # Also asked directly (AGENT_URL .../slow/v1) by an app that does not forward X-Request-ID:
        # bench/run.py --reference serves its reference app so for S3.
        location = /slow/v1/chat/completions {{
            echo_read_request_body;
            echo_sleep {slow_seconds};
            echo '{completion}';
        }}
        location = /stub_status {{
            stub_status;
        }}
    }}
}}
"""


class AgentStub:
    """nginx in the foreground, with its config, pid, logs and temp files under `workdir`."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "stub"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.completions_url = self.base_url + "/chat/completions"
        self.slow_base_url = f"http://127.0.0.1:{self.port}/slow/v1"  # every answer after 200 ms
        self.process = None

    def start(self) -> "AgentStub":
        config = self.dir / "nginx.conf"
        config.write_text(
            CONFIG.format(
                echo_module=ECHO_MODULE, dir=self.dir, port=self.port, slow_prefix=SLOW_PREFIX,
                slow_seconds=SLOW_SECONDS, completion=COMPLETION,
            )
        )
        log = open(self.dir / "nginx.out", "w")
        binary = nginx_binary()
        self.process = popen(
            [binary, "-p", str(self.dir), "-c", str(config), "-e", str(self.dir / "error.log")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.output()}")
            try:
                if requests.get(self.status_url, timeout=1).status_code == 200:
                    self._check_answers()
                    return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer in 10 s: {self.output()}")

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stub_status"

    def _check_answers(self) -> None:
        """One instant and one slow completion, as the app will ask for them."""
        body = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}
        for request_id, least in (("bench-check", 0.0), (SLOW_PREFIX + "check", SLOW_SECONDS)):
            started = time.monotonic()
            answer = requests.post(self.completions_url, json=body, headers={"X-Request-ID": request_id}, timeout=5)
            elapsed = time.monotonic() - started
            answer.raise_for_status()
            assert answer.json()["choices"][0]["message"]["content"], answer.text
            if elapsed < least:
                raise RuntimeError(f"the stub answered {request_id} in {elapsed:.3f} s, expected >= {least}")

    def in_flight(self) -> int | None:
        """Requests nginx is serving right now (agent calls in flight), this status request excluded."""
        try:
            text = requests.get(self.status_url, timeout=1).text
        except requests.RequestException:
            return None
        match = re.search(r"Writing:\s*(\d+)", text)
        return int(match.group(1)) - 1 if match else None

    def output(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text()[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
