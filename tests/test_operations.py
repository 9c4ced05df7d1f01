"""Operating it: health probes, the create-token command, the migrations."""
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from chatapp.extensions import db


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert response.headers["X-Request-ID"]


def test_readyz(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready", "agent": "closed"}


def test_create_token_works_against_the_api(app, client, agent_server):
    result = app.test_cli_runner().invoke(args=["create-token", "carol", "--expires-in", "60"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    response = client.post("/api/carol/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    forbidden = client.post("/api/dave/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {token}"})
    assert forbidden.status_code == 403


def test_create_token_prints_a_curl_command(app):
    result = app.test_cli_runner().invoke(args=["create-token", "demo", "--curl", "http://127.0.0.1:5000"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("curl -s http://127.0.0.1:5000/api/demo/chat \\\n  -H 'Authorization: Bearer ey")


def test_create_token_rejects_bad_input(app):
    runner = app.test_cli_runner()
    assert runner.invoke(args=["create-token", "a/b"]).exit_code != 0
    assert runner.invoke(args=["create-token", "alice", "--expires-in", "0"]).exit_code != 0


def test_migrations_match_the_models(app):
    with app.app_context(), db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert differences == []


def test_migrations_that_rebuild_a_table_keep_every_row_that_refers_to_it(app, chat, store):
    """On SQLite, altering the conversations' title rebuilds their table: with foreign keys on,
    dropping the old one would have deleted every message (ON DELETE CASCADE)."""
    from flask_migrate import downgrade, upgrade

    conversation_id = chat.turn("kept")["conversation_id"]
    chat.turn("kept too", conversation_id=conversation_id, headers={"Idempotency-Key": "kept"})
    with app.app_context():
        db.session.remove()
        downgrade(revision="4f7d2b91c0e3")
        upgrade()
        if db.engine.dialect.name == "sqlite":
            assert db.session.execute(text("PRAGMA foreign_keys")).scalar() == 1  # on again for the app
        db.session.remove()
    assert store.counts() == (1, 4)
    assert chat.post({"message": "kept too", "conversation_id": conversation_id},
                     headers={"Idempotency-Key": "kept"}).headers["Idempotent-Replayed"] == "true"


def test_the_root_leads_a_browser_to_the_docs(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/docs"
    assert response.data == b"" and "Content-Type" not in response.headers
    assert client.get("/", follow_redirects=True).mimetype == "text/html"
