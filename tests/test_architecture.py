"""Which way the imports point: the agent package knows neither Flask nor the database, the turn's
services import no Flask, errors and config import nothing of ours, models and schemas little."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHATAPP = ROOT / "chatapp"


def imports(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports (`chatapp.x.y` kept whole)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name if name.startswith("chatapp") else name.split(".")[0] for name in found}


def third_party(names: set[str]) -> set[str]:
    return {name for name in names if not name.startswith("chatapp") and name not in sys.stdlib_module_names}


def ours(names: set[str]) -> set[str]:
    return {name for name in names if name.startswith("chatapp")}


@pytest.mark.parametrize("path", sorted((CHATAPP / "agent").glob("*.py")), ids=lambda path: path.name)
def test_the_agent_package_imports_requests_and_errors_only(path):
    names = imports(path)
    assert third_party(names) <= {"requests", "urllib3"}, names
    assert {name for name in ours(names) if not name.startswith("chatapp.agent")} <= {"chatapp.errors", "chatapp.values"}


@pytest.mark.parametrize("module", ["chat_service", "claims", "context", "idempotency", "queries", "values"])
def test_the_turns_services_import_no_flask(module):
    names = imports(CHATAPP / f"{module}.py")
    assert not {name for name in names if name.startswith("flask")}, names
    assert "chatapp.extensions" not in names  # the session comes as an argument, not from the app


@pytest.mark.parametrize("path", [CHATAPP / "errors.py", ROOT / "config.py"], ids=lambda path: path.name)
def test_errors_and_config_import_nothing_of_ours(path):
    assert not ours(imports(path)), imports(path)


def test_models_and_schemas_import_little_of_ours():
    assert ours(imports(CHATAPP / "models.py")) <= {"chatapp.extensions", "chatapp.values"}
    assert ours(imports(CHATAPP / "schemas.py")) <= {"chatapp.values"}
    assert third_party(imports(CHATAPP / "schemas.py")) <= {"marshmallow"}


def test_only_the_views_and_the_request_hooks_read_flask_request():
    readers = set()
    for path in CHATAPP.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "flask" and any(alias.name == "request" for alias in node.names):
                readers.add(str(path.relative_to(CHATAPP)))
    hooks = {"auth.py", "log_config.py", "request_ids.py", "metrics.py"}  # the bearer token, the log line, the id, the route label
    assert readers - hooks <= {str(path.relative_to(CHATAPP)) for path in (CHATAPP / "routes").glob("*.py")}, readers
