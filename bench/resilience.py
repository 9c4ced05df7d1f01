"""Slow clients and a database blip, against the service as the Procfile runs it (production
settings, 4 workers x 32 threads unless told otherwise), for a checkout given by --app-dir; run it
on two checkouts to compare them.

    .venv/bin/python bench/resilience.py                      # this checkout
    .venv/bin/python bench/resilience.py --app-dir ../old     # another one

slow clients: /healthz latency and chat turns while 200 connections have sent a request line and
nothing more; then /healthz while 4 clients a second ask for `Connection: close` and do not hang up.
blip: 16 clients, each with its own conversation, send keyed turns (agent 0.5 s) and retry a
failed one with its key; PostgreSQL (a cluster of the run's own) stops for 5 s; reported: the
seconds from its return until every client's key ran, and the turns a second before and after.
"""
import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from service import Database, Service  # noqa: E402
from tests.support.agent import AgentServer, Echo  # noqa: E402
from tests.support.live_server import ThrowawayPostgres  # noqa: E402

SLOW_CONNECTIONS = 200
BLIP_CLIENTS = 16
BLIP_SECONDS = 5.0


def log(message: str) -> None:
    print(f"[resilience {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def healthz_latencies(url: str, count: int, interval: float = 0.05) -> list[float]:
    """Seconds for each of `count` GET /healthz, 5 for one that did not answer within 5 s."""
    seconds = []
    for _ in range(count):
        started = time.monotonic()
        try:
            ok = requests.get(url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        seconds.append(time.monotonic() - started if ok else 5.0)
        time.sleep(interval)
    return seconds


def summary(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:,.1f} ms, max {max(seconds) * 1000:,.1f} ms"


def slow_clients(service: Service) -> dict:
    results = {"healthz alone": summary(healthz_latencies(service.url, 20))}
    sockets = []
    try:
        for _ in range(SLOW_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
            sock.sendall(b"POST /api/bench/chat HTTP/1.1\r\n")
            sockets.append(sock)
        time.sleep(0.5)
        results[f"healthz, {SLOW_CONNECTIONS} slow connections open"] = summary(healthz_latencies(service.url, 20))
        token = service.token("bench")
        turns = []
        for n in range(10):
            started = time.monotonic()
            try:
                status = requests.post(f"{service.url}/api/bench/chat", json={"message": f"hi {n}"},
                                       headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code
            except requests.RequestException:
                status = "timeout"
            turns.append((status, time.monotonic() - started))
        served = sum(1 for status, _ in turns if status == 200)
        results["chat turns meanwhile"] = f"{served} of 10 answered 200, median {statistics.median(s for _, s in turns) * 1000:,.1f} ms"
    finally:
        for sock in sockets:
            sock.close()

    lingering, stop = [], threading.Event()

    def linger():
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                sock.recv(4096)
                lingering.append(sock)  # answered; it never hangs up
            except OSError:
                pass
            stop.wait(0.25)

    linger_thread = threading.Thread(target=linger, daemon=True)
    linger_thread.start()
    try:
        time.sleep(1)
        results["healthz, 4 a second Connection: close clients that stay"] = summary(healthz_latencies(service.url, 40, 0.1))
    finally:
        stop.set()
        linger_thread.join(5)
        for sock in lingering:
            sock.close()
    return results


def blip(app_dir: Path, workdir: Path, workers: int, threads: int) -> dict:
    cluster = ThrowawayPostgres().create()
    cluster.start()
    agent = AgentServer().start()
    agent.default = Echo(delay=0.5)
    service = Service(app_dir, workdir, cluster.url.replace("postgresql+psycopg://", "postgresql://"), agent.url,
                      workers=workers, threads=threads, extra_env={})
    try:
        service.migrate()
        service.start()
        token = service.token("bench")
        headers = {"Authorization": f"Bearer {token}"}
        conversations = [requests.post(f"{service.url}/api/bench/chat", json={"message": "start"}, headers=headers,
                                       timeout=10).json()["conversation_id"] for _ in range(BLIP_CLIENTS)]
        done_turns, stop = [], threading.Event()
        marks = {}

        def client(n):
            session = requests.Session()
            while not stop.is_set():
                key = uuid.uuid4().hex
                body = {"message": f"turn of client {n}", "conversation_id": conversations[n]}
                while not stop.is_set():  # this key until it runs
                    try:
                        status = session.post(f"{service.url}/api/bench/chat", json=body, timeout=30,
                                              headers={**headers, "Idempotency-Key": key}).status_code
                    except requests.RequestException:
                        status = None
                    if status == 200:
                        done_turns.append((n, time.monotonic()))
                        break
                    time.sleep(0.05)

        with ThreadPoolExecutor(BLIP_CLIENTS) as pool:
            for n in range(BLIP_CLIENTS):
                pool.submit(client, n)
            time.sleep(5)
            marks["down"] = time.monotonic()
            cluster.stop()
            time.sleep(BLIP_SECONDS)
            cluster.start()
            marks["up"] = time.monotonic()
            time.sleep(15)
            stop.set()
        before = [t for _, t in done_turns if marks["down"] - 5 <= t < marks["down"]]
        after = [t for _, t in done_turns if marks["up"] <= t < marks["up"] + 10]
        first_after = {}
        for n, t in done_turns:
            if t >= marks["up"]:
                first_after.setdefault(n, t)
        recovered = max(first_after.values()) - marks["up"] if len(first_after) == BLIP_CLIENTS else None
        return {
            "turns a second, the 5 s before the outage": f"{len(before) / 5:.1f}",
            "turns a second, the 10 s after the return": f"{len(after) / 10:.1f}",
            "seconds from the return until every client's key ran": "not all within 15 s" if recovered is None else f"{recovered:.2f}",
            "clients whose key ran within 2 s of the return": f"{sum(1 for t in first_after.values() if t - marks['up'] < 2)} of {BLIP_CLIENTS}",
        }
    finally:
        service.stop()
        agent.stop()
        cluster.destroy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the checkout to serve (default: this one)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--scenarios", default="slow,blip")
    opts = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="chatapp-resilience-") as workdir:
        workdir = Path(workdir)
        if "slow" in opts.scenarios:
            agent = AgentServer().start()
            database = Database(None, workdir).create()
            service = Service(opts.app_dir, workdir, database.url, agent.url, workers=opts.workers,
                              threads=opts.threads, extra_env={})
            try:
                service.migrate()
                service.start()
                log("slow clients...")
                results.update(slow_clients(service))
            finally:
                service.stop()
                agent.stop()
        if "blip" in opts.scenarios:
            log("database blip...")
            results.update(blip(opts.app_dir, workdir, opts.workers, opts.threads))
    print(f"| measure ({opts.workers} x {opts.threads}, {opts.app_dir.resolve().name}) | value |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
