"""The generated OpenAPI document and the offline Swagger UI."""
import re

import pytest

from chatapp.schemas import ChatRequestSchema, ConversationListQuerySchema, MessageListQuerySchema


@pytest.fixture
def document(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.get_json()


OPERATIONS = {
    ("/api/{user_id}/chat", "post"): {"200", "400", "401", "403", "404", "409", "413", "422", "429", "500", "503"},
    ("/api/{user_id}/conversations", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}", "delete"): {"204", "400", "401", "403", "404", "409", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}/messages", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
}


def test_every_operation_and_status_is_documented(document):
    assert document["openapi"].startswith("3.")
    found = {(path, method): set(operation["responses"]) for path, item in document["paths"].items() for method, operation in item.items()}
    assert found == OPERATIONS


def test_every_route_is_documented(app, document):
    documented = {re.sub(r"\{(\w+)\}", r"<\1>", path) for path in document["paths"]}
    not_api = ("static", "docs.docs_page", "docs.docs_asset", "docs.openapi_document", "metrics.metrics")
    served = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint not in not_api}
    assert served == documented


def test_bearer_security_on_api_operations(document):
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    for path, item in document["paths"].items():
        for operation in item.values():
            assert ("security" in operation) is path.startswith("/api/")


def test_errors_use_the_error_schema_and_say_their_codes(document):
    chat = document["paths"]["/api/{user_id}/chat"]["post"]["responses"]
    assert chat["409"]["description"] == "`conversation_busy` or `idempotency_in_progress`"
    assert chat["503"]["description"] == "`agent_unavailable` or `service_unavailable`"
    assert "Retry-After" in chat["503"]["headers"] and "WWW-Authenticate" in chat["401"]["headers"]
    for status in ("400", "401", "404", "503"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["Error"]["required"] == ["code", "detail", "request_id"]


def test_schemas_come_from_the_validating_schemas(document):
    schemas = document["components"]["schemas"]
    assert set(schemas["ChatRequest"]["properties"]) == set(ChatRequestSchema().fields)
    assert schemas["ChatRequest"]["required"] == ["message"]
    assert schemas["ChatRequest"]["additionalProperties"] is False
    assert schemas["ChatRequest"]["properties"]["message"]["maxLength"] == 10_000
    parameters = {
        path: {p["name"]: p for p in document["paths"][path]["get"]["parameters"] if p["in"] == "query"}
        for path in ("/api/{user_id}/conversations", "/api/{user_id}/conversations/{conversation_id}/messages")
    }
    assert set(parameters["/api/{user_id}/conversations"]) == set(ConversationListQuerySchema().fields)
    assert parameters["/api/{user_id}/conversations"]["limit"]["schema"]["maximum"] == 100
    assert set(parameters["/api/{user_id}/conversations/{conversation_id}/messages"]) == set(MessageListQuerySchema().fields)
    chat_ok = document["paths"]["/api/{user_id}/chat"]["post"]["responses"]["200"]["content"]
    assert set(chat_ok) == {"application/json", "text/event-stream"}
    assert set(schemas["ChatResponse"]["required"]) == {"conversation_id", "message", "role", "created_at", "usage", "message_id", "model"}


def test_swagger_ui_is_served_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html
    assets = re.findall(r'(?:src|href)="(/docs/[^"]+)"', html)
    assert sorted(assets) == ["/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"]
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200 and len(response.data) > 1000
        response.close()
    assert "http" not in "".join(assets)
    missing = client.get("/docs/nothing-here.js")
    assert missing.status_code == 404 and missing.get_json()["code"] == "not_found"
