"""wrk, driven by bench/wrk/chat.lua: one bounded run, parsed into numbers."""
import json
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from procs import popen

LUA = Path(__file__).resolve().parent / "wrk" / "chat.lua"
# Requests slower than this count as wrk timeouts (socket errors), never as silent waits.
REQUEST_TIMEOUT_S = 10


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, *, connections: int, threads: int, duration: int, script_args: list[str],
            max_per_thread: int | None = None) -> dict:
    """One wrk run: rps, latency percentiles (ms), non-2xx and socket errors.

    With `max_per_thread`, each thread stops after that many responses and the run ends as soon as
    all have (wrk's own clock then covers only the requests made)."""
    threads = max(1, min(threads, connections))
    args = ["-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", f"{REQUEST_TIMEOUT_S}s",
            "-s", str(LUA), url, "--", f"threads={threads}", *script_args]
    if max_per_thread is not None:
        args.append(f"max={max_per_thread}")
    process = popen([wrk_binary(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines = []

    def watch_stderr():
        finished = 0
        for line in process.stderr:
            if line.strip() == "BENCH_THREAD_DONE":
                finished += 1
                if finished == threads and process.poll() is None:
                    process.send_signal(signal.SIGINT)  # wrk ends its run early and reports
            else:
                stderr_lines.append(line)

    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    # wrk stops itself after `duration`; this bounds a wrk that would not.
    killer = threading.Timer(duration + REQUEST_TIMEOUT_S + 30, process.kill)
    killer.start()
    try:
        stdout = process.stdout.read()
        process.wait()
    finally:
        killer.cancel()
        watcher.join(timeout=5)
        process.stdout.close()
        process.stderr.close()
    if process.returncode == -signal.SIGKILL:
        raise RuntimeError(f"wrk did not finish in time: wrk {' '.join(args)}")
    return parse_wrk(stdout, "".join(stderr_lines), process.returncode, args)


def parse_wrk(stdout: str, stderr: str, returncode: int, args: list[str]) -> dict:
    """The BENCH_RESULT line of chat.lua's done(), cross-checked with wrk's own summary lines."""
    match = re.search(r"^BENCH_RESULT (\{.*\})$", stdout, re.MULTILINE)
    if returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({returncode}): wrk {' '.join(args)}\n{stdout}\n{stderr}")
    raw = json.loads(match.group(1))
    # wrk's summary: "Non-2xx or 3xx responses: N" and "Socket errors: connect N, read N, write N, timeout N".
    summary_non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", stdout)
    socket_line = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    if socket_line:
        socket_errors = max(socket_errors, sum(int(n) for n in socket_line.groups()))
    non2xx = max(raw["non2xx"], int(summary_non2xx.group(1)) if summary_non2xx else 0)
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "mean_ms": raw["mean_us"] / 1000,
        "non2xx": non2xx,
        "socket_errors": socket_errors,
        "socket_detail": {key: raw[key] for key in ("connect", "read", "write", "timeout")},
        "statuses": raw["statuses"],
        "ok": sum(count for status, count in raw["statuses"].items() if 200 <= int(status) <= 299),
        "stderr": stderr.strip()[-500:],
    }
