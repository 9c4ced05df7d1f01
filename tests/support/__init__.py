"""What the tests, make e2e and make bench share: the service under gunicorn (live_server), a
scripted OpenAI-compatible agent (agent), processes and ports (processes), assertions."""
