"""Several instances behind one proxy: three gunicorn instances of one worker each, on one
PostgreSQL database and one Redis, with deploy/nginx.conf in front balancing them round-robin. The
exactly-once stress goes through nginx, so that a key's retries and duplicates, and the turns of one
conversation, land on different instances at the same time. PostgreSQL only: SQLite is one file on
one host, not what several instances share."""
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import AuthActions, skip_or_fail
from tests.support.assertions import metric
from tests.support.live_server import LiveServer
from tests.support.nginx import Nginx, deploy_site, nginx_binary
from tests.support.processes import free_port
from tests.support.stress import live_settings, run_stress

INSTANCES = 3
# Smaller than test_concurrency's stress, to stay within seconds: still several clients a
# conversation, so that its turns meet on different instances.
CLIENTS, TURNS, CONVERSATIONS = 24, 8, 8
CHAT_ROUTE = "/api/<user_id>/chat"


@pytest.fixture
def instances_behind_nginx(request, tmp_path, database_uri, agent_server, redis_url):
    """The instances (one worker each; one database, one Redis) and nginx's URL in front of them."""
    if nginx_binary() is None:
        skip_or_fail(request, "nginx is not installed (make bench-deps)")
    settings = {**live_settings(database_uri, agent_server.url), "REDIS_URL": redis_url}
    instances = [LiveServer(settings, workers=1, threads=16) for _ in range(INSTANCES)]
    try:
        for instance in instances:
            # From this thread: a child started from a pool's thread would get its parent-death
            # signal when that thread ends.
            instance.start()
        port = free_port()
        with Nginx(tmp_path / "nginx", deploy_site(port, [instance.port for instance in instances]), port) as nginx:
            yield nginx.url, instances
    finally:
        with ThreadPoolExecutor(INSTANCES) as pool:  # each takes a second to stop gracefully: side by side
            list(pool.map(LiveServer.stop, instances))


def served(instance: LiveServer) -> dict:
    """What one instance did itself, from its own /metrics (not through nginx)."""
    text = requests.get(instance.url + "/metrics", timeout=5).text
    return {
        "agent calls": metric(text, "chatapp_agent_call_duration_seconds_count", outcome="ok", agent="primary"),
        "200": metric(text, "chatapp_http_requests_total", method="POST", route=CHAT_ROUTE, status="200"),
        "409": metric(text, "chatapp_http_requests_total", method="POST", route=CHAT_ROUTE, status="409"),
    }


@pytest.mark.parametrize("database_uri", ["postgresql"], indirect=True)
def test_stress_through_nginx_across_three_instances(instances_behind_nginx, agent_server, database_uri, capsys):
    url, instances = instances_behind_nginx
    chat_url = f"{url}/api/alice/chat"

    result = run_stress([chat_url], agent_server, database_uri, clients=CLIENTS, turns=TURNS,
                        conversations=CONVERSATIONS)

    # Every key, asked once more through nginx (so most of them of another instance than the one
    # that answered first), replays its answer byte for byte, without calling the agent.
    headers = AuthActions().headers()

    def replay(item):
        key, answer = item
        body = {"message": key, "conversation_id": json.loads(answer)["conversation_id"]}
        response = requests.post(chat_url, json=body, headers={**headers, "Idempotency-Key": key}, timeout=30)
        return key, response.status_code, response.headers.get("Idempotent-Replayed"), response.content == answer

    assert len(result.answers) == CLIENTS * TURNS
    with ThreadPoolExecutor(8) as pool:
        replays = list(pool.map(replay, result.answers.items()))
    assert [r for r in replays if r[1:] != (200, "true", True)] == []
    assert len(agent_server.requests) == result.agent_calls

    # Each instance served turns and called the agent; together, once a key (and once a conversation's start).
    figures = [served(instance) for instance in instances]
    assert all(figure["agent calls"] > 0 and figure["200"] > 0 for figure in figures), figures
    assert sum(figure["agent calls"] for figure in figures) == result.agent_calls

    with capsys.disabled():
        split = ", ".join(f"{f['200']:.0f} x 200 / {f['409']:.0f} x 409 / {f['agent calls']:.0f} agent calls"
                          for f in figures)
        print(f"\nstress through nginx across {INSTANCES} instances: {result.summary()}; "
              f"{len(replays)} keys replayed; by instance: {split}")
