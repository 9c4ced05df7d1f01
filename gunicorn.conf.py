"""gunicorn settings, from the environment (PORT, WEB_CONCURRENCY, GUNICORN_THREADS, AGENT_TIMEOUT)."""
import os
import tempfile

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Two workers a core (make bench on 2 cores): each worker's threads share one GIL, and a turn's
# many short waits (database, agent, client) each hand it over; with 64 threads in each of 2
# workers, a slow agent (S3) kept 0.62-0.69 of S1's throughput, with 32 in each of 4, 0.74-0.82.
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
# Threads, not processes, wait on the agent: a turn blocked on a slow agent costs one thread.
worker_class = "gthread"
# 4 x 32 threads hold 128 slow turns in flight (S3).
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# gthread keeps accepting until a worker holds worker_connections (default 1000), and keep-alive
# connections stay with it: one worker would take most connections while the others idle.
worker_connections = threads + 8
# Under gthread `timeout` is a heartbeat, not a request limit; AGENT_TIMEOUT is what bounds a turn.
# Keep it well above AGENT_TIMEOUT so that a busy worker is never killed mid-turn.
timeout = int(float(os.environ.get("AGENT_TIMEOUT", "30"))) + 30
# On SIGTERM, turns in flight get this long to finish and be stored.
graceful_timeout = int(float(os.environ.get("AGENT_TIMEOUT", "30"))) + 10
keepalive = 5
# A path of two 255-character ids in 4-byte UTF-8 is about 6 KB once percent-encoded; gunicorn's
# default (4094) would answer such a valid request with its own HTML 414.
limit_request_line = 8190
# The app writes one JSON line per request itself; gunicorn's access log would repeat it as text.
accesslog = None
errorlog = "-"
# No runtime control socket: one per user by default, so two servers on a host would fight over it.
control_socket_disable = True

# Prometheus multiprocess mode: every worker writes its metrics to files that /metrics sums.
# Set before the workers import the app (prometheus_client reads it at import).
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chatapp-metrics-")


def on_starting(server):
    """Start from empty metric files: old ones would count a previous run."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def child_exit(server, worker):
    """A dead worker's live gauges (turns in flight) must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
