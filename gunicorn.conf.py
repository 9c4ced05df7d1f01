"""gunicorn settings, from the app's own configuration (config.py): a setting that cannot serve
stops gunicorn here, in its master process, with one line that names it, before any worker boots."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config.py, from any working directory

from config import ConfigError, config_from_env, startup_failure  # noqa: E402

try:
    settings = config_from_env()
    settings.validate()
except ConfigError as exc:
    # SystemExit passes gunicorn's handler for a broken config file, which would print a traceback.
    sys.exit(startup_failure(exc))

bind = f"0.0.0.0:{settings.PORT}"
# Two workers a core (make bench on 2 cores): each worker's threads share one GIL, and a turn's
# many short waits (database, agent, client) each hand it over; with 64 threads in each of 2
# workers, a slow agent (S3) kept 0.62-0.69 of S1's throughput, with 32 in each of 4, 0.74-0.82.
workers = settings.WEB_CONCURRENCY
# Threads, not processes, wait on the agent: a turn blocked on a slow agent costs one thread.
# gunicorn's gthread worker, reading each request whole before a thread takes it, so that slow
# clients hold no thread (REQUEST_READ_TIMEOUT), and answering its own errors in JSON.
worker_class = "chatapp.serving.RequestReadingWorker"
# 4 x 32 threads hold 128 slow turns in flight (S3).
threads = settings.GUNICORN_THREADS
# gthread keeps accepting until a worker holds worker_connections (default 1000), and keep-alive
# connections stay with it: one worker would take most connections while the others idle.
worker_connections = threads + 8
# Under gthread `timeout` is a heartbeat, not a request limit; AGENT_TIMEOUT is what bounds a turn.
# Keep it well above AGENT_TIMEOUT so that a busy worker is never killed mid-turn.
timeout = int(settings.AGENT_TIMEOUT) + 30
# On SIGTERM, turns in flight get this long to finish and be stored. Heroku-style platforms send
# SIGKILL 30 s after SIGTERM: 28 s leaves the workers 2 s to exit, and a blocking turn with the
# default AGENT_TIMEOUT (25 s) still ends inside it.
graceful_timeout = 28
keepalive = 5
# A path of two 255-character ids in 4-byte UTF-8 is about 6 KB once percent-encoded; gunicorn's
# default (4094) would answer such a valid request with its own HTML 414.
limit_request_line = 8190
# The app writes one JSON line per request itself; gunicorn's access log would repeat it as text.
accesslog = None
errorlog = "-"
loglevel = settings.LOG_LEVEL.lower()
if settings.LOG_FORMAT == "json":
    # gunicorn's own lines (start, worker boot and exit, errors) as JSON objects too, like the
    # app's, so that a log pipeline reads one format.
    logger_class = "chatapp.log_config.GunicornJsonLogger"
# No runtime control socket: one per user by default, so two servers on a host would fight over it.
control_socket_disable = True

# Prometheus multiprocess mode: every worker writes its metrics to files that /metrics sums.
# Set before the app is imported (prometheus_client reads it at import), which the JSON log
# formatter above does in this process already.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chatapp-metrics-")
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


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
