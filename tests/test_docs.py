"""docs/api.md stays true to the service: every error code, route and setting is in it, and it
(like README.md) links only to files of this repository."""
import os
import re
from pathlib import Path

import pytest

import config
from chatapp.errors import ApiError
from chatapp.extensions import db
from tests.conftest import make_app

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
DOCUMENTS = (API_DOC, README)

# Routes that are not part of the API: Flask's static files and Swagger UI's own assets.
UNDOCUMENTED_ENDPOINTS = {"static"}
UNDOCUMENTED_RULES = {"/docs/<path:filename>"}
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
# Environment variables read outside config.py's _env(): by gunicorn.conf.py and chatapp/metrics.py.
SETTINGS_READ_ELSEWHERE = {"PROMETHEUS_MULTIPROC_DIR"}
# What a clean environment keeps: what any process needs, nothing the service reads.
KEPT_ENVIRONMENT = re.compile(r"PATH|HOME|LANG|LC_\w+|TZ|TMPDIR|TEMP|TMP|SYSTEMROOT|PYTEST_\w+|COV_\w+")
# Words that point at documents kept outside the repository.
OUTSIDE_WORDS = ("shared files", "api-contract")


def read(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return path.read_text(encoding="utf-8")


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def all_subclasses(cls: type) -> list[type]:
    found = []
    for subclass in cls.__subclasses__():
        found += [subclass, *all_subclasses(subclass)]
    return found


def error_classes() -> list[type]:
    """ApiError and every class below it, however deep."""
    return [ApiError, *all_subclasses(ApiError)]


def test_every_error_code_is_documented():
    doc = read(API_DOC)
    codes = {cls.code for cls in error_classes()}
    missing = sorted(code for code in codes if f"`{code}`" not in doc)
    assert not missing, f"docs/api.md does not name these error codes of chatapp/errors.py (in backticks): {missing}"


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.lstrip().startswith("|")]


def test_the_error_table_gives_each_code_its_status():
    rows = table_rows(read(API_DOC))
    missing = []
    for cls in error_classes():
        if "code" not in vars(cls):
            continue  # inherits its parent's code (Unauthorized: a base of the 401s)
        if not any(row and row[0] == f"`{cls.code}`" and str(cls.status) in row for row in rows):
            missing.append(f"`{cls.code}` {cls.status}")
    assert not missing, (
        "docs/api.md has no error table row '| `code` | status | ...' for: " + ", ".join(missing)
    )


@pytest.fixture
def url_map(tmp_path):
    """The app's URL map, from an app on a SQLite file of its own."""
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'docs.db'}")
    yield app.url_map
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def doc_path(rule: str) -> str:
    """A Flask rule the way the doc writes paths: converters dropped, `<int:seq>` as `<seq>`."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"<\1>", rule)


def test_every_route_is_documented_with_its_methods(url_map):
    doc = read(API_DOC)
    routes = sorted(
        (method, doc_path(rule.rule))
        for rule in url_map.iter_rules()
        if rule.endpoint not in UNDOCUMENTED_ENDPOINTS and rule.rule not in UNDOCUMENTED_RULES
        for method in rule.methods - IMPLICIT_METHODS
    )
    assert routes, "the app has no routes?"
    missing = [
        f"{method} {path}"
        for method, path in routes
        # The path must end there: `GET /api/<user_id>/conversations` is not found in the line of
        # `GET /api/<user_id>/conversations/<conversation_id>`.
        if not re.search(rf"(?<![\w/]){re.escape(f'{method} {path}')}(?![\w/<>.?-])", doc)
    ]
    assert not missing, f"docs/api.md does not document these routes (as 'METHOD /path'): {missing}"


@pytest.fixture
def settings_read(monkeypatch):
    """Every environment variable config.py reads, under a clean environment holding only what
    production needs."""
    for variable in list(os.environ):
        if not KEPT_ENVIRONMENT.fullmatch(variable):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("JWT_SECRET_KEY", "s" * 32)
    monkeypatch.setenv("AGENT_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setattr(config, "SETTINGS_READ", set())  # only what these reads add
    config.ProductionConfig().validate()
    config.DevelopmentConfig().validate()
    config.config_from_env()  # CHATAPP_ENV
    config.log_format_from_env()
    return set(config.SETTINGS_READ)


def test_every_setting_is_documented(settings_read):
    doc = read(API_DOC)
    assert {"AGENT_URL", "JWT_SECRET_KEY", "CHATAPP_ENV"} <= settings_read, settings_read
    missing = sorted(setting for setting in settings_read if f"`{setting}`" not in doc)
    assert not missing, f"docs/api.md does not name these settings of config.py (in backticks): {missing}"


def test_settings_read_outside_config_are_documented():
    """What gunicorn.conf.py and the app read from the environment themselves."""
    sources = [ROOT / "gunicorn.conf.py", ROOT / "wsgi.py", *sorted((ROOT / "chatapp").rglob("*.py"))]
    read_directly = set()
    for source in sources:
        read_directly |= set(re.findall(r"""os\.environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]*)["']""", source.read_text()))
    assert SETTINGS_READ_ELSEWHERE <= read_directly, read_directly
    doc = read(API_DOC)
    missing = sorted(setting for setting in read_directly if f"`{setting}`" not in doc)
    assert not missing, f"docs/api.md does not name these environment variables (in backticks): {missing}"


def without_code(text: str) -> str:
    """The text without fenced code blocks and inline code, where link syntax is only an example."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def link_targets(text: str) -> list[str]:
    """The targets of Markdown links and images, reference definitions and HTML href/src."""
    prose = without_code(text)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose, flags=re.M)
    targets += re.findall(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", prose)
    return targets


def is_url(target: str) -> bool:
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)) and not re.match(r"[a-zA-Z]:[\\/]", target)


ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/(?:work|root|home|Users|mnt|srv|opt)/|~/|file://|[A-Za-z]:\\)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=name)
def test_no_reference_to_files_outside_the_repository(path):
    text = read(path)
    problems = []
    for target in link_targets(text):
        if target.startswith("file:") or (not is_url(target) and target.startswith(("/", "\\", "~"))):
            problems.append(f"link to an absolute path: {target}")
        elif re.match(r"[A-Za-z]:[\\/]", target):
            problems.append(f"link to an absolute path: {target}")
        elif not is_url(target) and not target.startswith("#"):
            resolved = (path.parent / target.split("#")[0].split("?")[0]).resolve()
            if resolved != ROOT and ROOT not in resolved.parents:
                problems.append(f"link outside the repository: {target}")
    for match in ABSOLUTE_PATH.finditer(text):
        line = text[:match.start()].count("\n") + 1
        problems.append(f"line {line}: an absolute path to a file outside the repository: {text.splitlines()[line - 1].strip()}")
    for words in OUTSIDE_WORDS:
        for line_number, line in enumerate(text.splitlines(), 1):
            if words in line.lower():
                problems.append(f"line {line_number}: refers to {words!r}, outside the repository: {line.strip()}")
    assert not problems, f"{name(path)} refers to files outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", DOCUMENTS, ids=name)
def test_relative_links_point_to_files_of_the_repository(path):
    text = read(path)
    missing = []
    for target in link_targets(text):
        if is_url(target) or target.startswith(("#", "/", "\\", "~")) or not target:
            continue
        relative = target.split("#")[0].split("?")[0]
        resolved = (path.parent / relative).resolve()
        if (ROOT == resolved or ROOT in resolved.parents) and not resolved.exists():
            missing.append(target)
    assert not missing, f"{name(path)} links to files that do not exist in the repository: {missing}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the Markdown headings of `text` (duplicates get -1, -2...)."""
    anchors, seen = set(), {}
    body = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", body, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_links_within_the_api_reference_lead_to_its_headings():
    text = read(API_DOC)
    anchors = heading_anchors(text)
    broken = sorted({target for target in link_targets(text) if target.startswith("#") and target[1:] not in anchors})
    assert not broken, f"docs/api.md links to sections it does not have: {broken}"
