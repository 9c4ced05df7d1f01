"""Fixtures: app -> client -> db -> auth, on SQLite and (with TEST_DATABASE_URL) on PostgreSQL,
with a real agent HTTP server on loopback."""
import logging
import os
import shutil
import time
import uuid

import jwt as pyjwt
import pytest
from flask_migrate import upgrade
from sqlalchemy import create_engine, event, func, select, text

from chatapp import create_app
from chatapp.agent import OpenAIChatAgent
from chatapp.extensions import db as _db
from chatapp.models import Conversation, Message
from config import DevelopmentConfig, TestingConfig, database_url
from tests.support.agent import AgentServer
from tests.support.live_server import ThrowawayPostgres

TEST_SECRET = "test-secret-long-enough-for-every-hmac-algorithm-0123456789abcdef"
DATABASES = ["sqlite", "postgresql"]


def pytest_addoption(parser):
    parser.addoption(
        "--require-services",
        action="store_true",
        help="fail, instead of skipping, what needs PostgreSQL (TEST_DATABASE_URL), Redis (TEST_REDIS_URL), "
        "the PostgreSQL server binaries or the bench tools (make bench-deps) when they are unusable",
    )


def pytest_collection_modifyitems(items):
    """The PostgreSQL half of every database-parametrized test is marked `postgresql`, so that
    `-m postgresql` runs it alone (CI runs it again through PgBouncer)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_uri") == "postgresql":
            item.add_marker(pytest.mark.postgresql)


def through_a_pooler() -> bool:
    """Whether TEST_DATABASE_URL reaches PostgreSQL through a pooler (TEST_DATABASE_DIRECT_URL,
    set beside it, is the server itself)."""
    direct = os.environ.get("TEST_DATABASE_DIRECT_URL")
    return bool(direct) and direct != os.environ.get("TEST_DATABASE_URL")


def pytest_report_header(config):
    postgres = "TEST_DATABASE_URL set" if os.environ.get("TEST_DATABASE_URL") else "skipped: TEST_DATABASE_URL unset"
    redis = "TEST_REDIS_URL set" if os.environ.get("TEST_REDIS_URL") else "skipped: TEST_REDIS_URL unset"
    pooler = "; through a pooler (TEST_DATABASE_DIRECT_URL differs)" if through_a_pooler() else ""
    return f"databases: sqlite, postgresql ({postgres}{pooler}); redis ({redis})"


def app_settings(**overrides) -> dict:
    """The app's settings as config.py parses them (with its defaults), and `overrides`."""
    return {**vars(DevelopmentConfig()), **overrides}


def make_app(**settings):
    """An app with the testing config (and the test secret), as the `app` fixture builds it."""
    return create_app(TestingConfig(**{"JWT_SECRET_KEY": TEST_SECRET, **settings}))


def _migrate(url):
    """Build the schema with the project's migrations, as `flask db upgrade` does."""
    app = make_app(SQLALCHEMY_DATABASE_URI=url)
    with app.app_context():
        _db.drop_all()
        with _db.engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        upgrade()
        _db.engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """A migrated SQLite file; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url(request):
    """The migrated PostgreSQL database, or a skip (a failure with --require-services)."""
    url = os.environ.get("TEST_DATABASE_URL")
    reason = "PostgreSQL skipped: TEST_DATABASE_URL is not set"
    if url:
        url = database_url(url)
        try:
            engine = create_engine(url)
            with engine.connect():
                pass
            engine.dispose()
            _migrate(url)
            return url
        except Exception as exc:  # unreachable server: say so, then skip or fail
            reason = f"PostgreSQL skipped: cannot use TEST_DATABASE_URL ({type(exc).__name__})"
    skip_or_fail(request, reason)


def skip_or_fail(request, reason):
    """Skip a test whose service is missing, or fail it when the run requires every service."""
    if request.config.getoption("--require-services"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url(request):
    """A reachable Redis (TEST_REDIS_URL), or a skip (a failure with --require-services)."""
    import redis

    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        skip_or_fail(request, "Redis skipped: TEST_REDIS_URL is not set")
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1) as client:
            client.ping()
    except redis.RedisError as exc:
        skip_or_fail(request, f"Redis skipped: cannot reach TEST_REDIS_URL ({type(exc).__name__})")
    return url


@pytest.fixture(params=DATABASES)
def database_uri(request, tmp_path):
    """A clean, migrated database of each kind, emptied again after the test."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    with engine.begin() as connection:
        tables = ", ".join(table.name for table in _db.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()


@pytest.fixture
def agent_server():
    """A real OpenAI-compatible agent on 127.0.0.1, scripted per test."""
    with AgentServer() as server:
        yield server


@pytest.fixture
def make_agent(request):
    """OpenAIChatAgent factory with test-sized timeouts (the deadline: the test module's
    AGENT_DEADLINE); every agent is closed afterwards."""
    deadline = getattr(request.module, "AGENT_DEADLINE", 1.0)
    agents = []

    def make(url, **settings):
        agent = OpenAIChatAgent(url, **{"connect_timeout": 0.5, "timeout": deadline, "max_retries": 2,
                                        "max_response_bytes": 1048576, "stream_timeout": 10.0, **settings})
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.close()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def agent_log():
    """The agent client's log records, whatever other tests did to the chatapp loggers."""
    logger = logging.getLogger("chatapp.agent")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def config_overrides():
    """Per-test settings; a test or module overrides this fixture to change them."""
    return {}


@pytest.fixture
def app(database_uri, agent_server, config_overrides):
    settings = {"SQLALCHEMY_DATABASE_URI": database_uri, "AGENT_URL": agent_server.url, "AGENT_MAX_RETRIES": 1}
    app = make_app(**{**settings, **config_overrides})
    yield app
    with app.app_context():
        _db.session.remove()
        _db.engine.dispose()


class AuthActions:
    """Tokens for tests, signed as an identity provider would sign them; a claim given as ... is left out."""

    def __init__(self, secret=TEST_SECRET, algorithm="HS256"):
        self.secret, self.algorithm = secret, algorithm

    def token(self, user_id="alice", *, expires_in=600, key=None, algorithm=None, **claims):
        now = int(time.time())
        payload = {"sub": user_id, "iat": now, "nbf": now, "jti": uuid.uuid4().hex}
        if expires_in is not None:
            payload["exp"] = now + expires_in
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not ...}
        return pyjwt.encode(payload, key or self.secret, algorithm=algorithm or self.algorithm)

    def headers(self, user_id="alice", **claims):
        return {"Authorization": f"Bearer {self.token(user_id, **claims)}"}


@pytest.fixture
def auth():
    return AuthActions()


class Store:
    """What the database holds, read through its own session."""

    def counts(self):
        return (
            _db.session.scalar(select(func.count()).select_from(Conversation)),
            _db.session.scalar(select(func.count()).select_from(Message)),
        )

    def messages(self, conversation_id):
        _db.session.expire_all()
        return _db.session.execute(
            select(Message.seq, Message.role, Message.content)
            .where(Message.conversation_id == uuid.UUID(conversation_id))
            .order_by(Message.seq)
        ).all()

    def conversation(self, conversation_id):
        _db.session.expire_all()
        return _db.session.get(Conversation, uuid.UUID(conversation_id))


@pytest.fixture
def store(app):
    with app.app_context():
        yield Store()
        _db.session.remove()


class Chat:
    """Posts chat turns as a client would."""

    def __init__(self, client, auth):
        self.client, self.auth = client, auth

    def post(self, body=None, user_id="alice", headers=None, **kwargs):
        request_headers = self.auth.headers(user_id)
        request_headers.update(headers or {})
        return self.client.post(f"/api/{user_id}/chat", json=body, headers=request_headers, **kwargs)

    def turn(self, message="Hello", conversation_id=None, **kwargs):
        body = {"message": message}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        response = self.post(body, **kwargs)
        assert response.status_code == 200, response.get_json()
        return response.get_json()


@pytest.fixture
def chat(client, auth):
    return Chat(client, auth)


@pytest.fixture
def count_statements(app):
    """A context manager factory counting the SQL statements the app's engine runs."""

    class Counter:
        def __init__(self):
            self.statements = []

        def __enter__(self):
            with app.app_context():
                self.engine = _db.engine
            event.listen(self.engine, "before_cursor_execute", self._record)
            return self

        def _record(self, conn, cursor, statement, *args):
            self.statements.append(statement)

        def __exit__(self, *exc):
            event.remove(self.engine, "before_cursor_execute", self._record)

    return Counter


@pytest.fixture
def throwaway_postgres(request):
    """A PostgreSQL cluster of the test's own on a free port, to stop and start at will."""
    if not ThrowawayPostgres.available():
        skip_or_fail(request, "PostgreSQL server binaries are not installed")
    cluster = ThrowawayPostgres().create()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def own_redis(request, tmp_path):
    """A Redis server of the test's own, on a free port, to freeze (SIGSTOP) and thaw."""
    import shutil
    import signal
    import subprocess

    from tests.support.processes import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail(request, "redis-server is not installed")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        freeze = staticmethod(lambda: process.send_signal(signal.SIGSTOP))
        thaw = staticmethod(lambda: process.send_signal(signal.SIGCONT))
        kill = staticmethod(lambda: process.kill())

    yield Server
    process.send_signal(signal.SIGCONT)
    process.terminate()
    process.wait(timeout=10)
