"""gunicorn settings, from the environment (PORT, WEB_CONCURRENCY, GUNICORN_THREADS, AGENT_TIMEOUT)."""
import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads, not processes, wait on the agent: a turn blocked on a slow agent costs one thread.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "32"))
# Under gthread `timeout` is a heartbeat, not a request limit; AGENT_TIMEOUT is what bounds a turn.
# Keep it well above AGENT_TIMEOUT so that a busy worker is never killed mid-turn.
timeout = int(float(os.environ.get("AGENT_TIMEOUT", "30"))) + 30
graceful_timeout = int(float(os.environ.get("AGENT_TIMEOUT", "30"))) + 10
keepalive = 5
accesslog = "-"
errorlog = "-"
# No runtime control socket: one per user by default, so two servers on a host would fight over it.
control_socket_disable = True
