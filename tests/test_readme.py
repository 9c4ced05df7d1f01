"""The README's shell examples, pasted as they are, against a server started as `make run` starts it."""
import json
import os
import re
import subprocess
import time

import pytest
import requests

from tests.support.live_server import BIN, ROOT
from tests.support.processes import free_port

START = "<!-- the README test runs every sh block from here to the end marker, in one shell -->"
END = "<!-- end of the sh blocks the README test runs -->"
README_URL = "http://127.0.0.1:5000"


def readme_script() -> str:
    """The sh blocks between the README's two markers, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(START):text.index(END)]
    return "\n".join(re.findall(r"^```sh\n(.*?)^```", section, flags=re.S | re.M))


def expected_answers(script: str) -> list[str]:
    """What the README's comments say the commands answer: '204', or the status and code of an error."""
    return [" ".join(filter(None, match)) for match in re.findall(r"^# (\d{3})(?: (\w+))?", script, flags=re.M)]


@pytest.fixture
def make_run_server(tmp_path):
    """`make run`'s server: the development config, the echo agent, flask's own server, threaded."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith(("JWT_", "AGENT_", "CHATAPP_", "DATABASE_"))}
    env.update(CHATAPP_ENV="development", DATABASE_URL=f"sqlite:///{tmp_path}/readme.db")
    flask = [str(BIN / "flask"), "--app", "wsgi"]
    subprocess.run([*flask, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    server = subprocess.Popen([*flask, "run", "--host", "127.0.0.1", "--port", str(port), "--with-threads"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the development server did not start"
                time.sleep(0.1)
        yield url, env
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_readme_examples_work_as_written(make_run_server):
    url, env = make_run_server
    script = readme_script()
    assert README_URL in script
    # The one change: the server's port. Everything else runs as pasted, in one shell.
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace(README_URL, url)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    bodies = [json.loads(line) for line in lines if line.startswith("{")]
    # Each error the comments announce came, in order, and nothing else failed; the DELETE said 204.
    said = expected_answers(script)
    assert [body["code"] for body in bodies if "code" in body] == [answer.split()[1] for answer in said if " " in answer]
    assert [line for line in lines if re.fullmatch(r"\d{3}", line)] == [answer for answer in said if " " not in answer] == ["204"]

    first, second = (body for body in bodies if body.get("role") == "assistant")
    assert first["conversation_id"] == second["conversation_id"]
    assert (first["message"], second["message"]) == ("Echo: Hello!", "Echo: And again")
    conversation_id = first["conversation_id"]
    [listing] = [body for body in bodies if "conversations" in body]
    assert [item["conversation_id"] for item in listing["conversations"]] == [conversation_id]
    [page] = [body for body in bodies if "messages" in body]
    assert [message["content"] for message in page["messages"]] == ["Hello!", "Echo: Hello!", "And again", "Echo: And again"]
    assert "event: done" in done.stdout and "event: delta" in done.stdout


def test_the_code_map_names_every_module():
    text = (ROOT / "README.md").read_text()
    code_map = text[text.index("## Code map"):]
    chatapp = ROOT / "chatapp"
    modules = sorted(str(path.relative_to(ROOT)) for path in chatapp.rglob("*.py")
                     if "agent" not in path.parts and (path.name != "__init__.py" or path.parent == chatapp))
    missing = [module for module in modules if f"`{module}`" not in code_map]
    assert not missing, f"README's Code map does not name {missing}"
    assert "`chatapp/agent/`" in code_map
    for module in (ROOT / "chatapp" / "agent").glob("*.py"):
        assert module.name == "__init__.py" or f"`{module.name}`" in code_map, module.name
