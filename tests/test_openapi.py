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
    ("/api/{user_id}/conversations", "delete"): {"204", "400", "401", "403", "404", "409", "500", "503"},
    ("/api/{user_id}/export", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}", "patch"): {"200", "400", "401", "403", "404", "413", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}", "delete"): {"204", "400", "401", "403", "404", "409", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}/messages/{message_id}/feedback", "put"):
        {"200", "400", "401", "403", "404", "413", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}/messages", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}/stop", "post"): {"200", "400", "401", "403", "404", "409", "500", "503"},
    ("/api/{user_id}/conversations/{conversation_id}/regenerate", "post"): {
        "200", "400", "401", "403", "404", "409", "413", "422", "429", "500", "503"},
    ("/api/{user_id}/usage", "get"): {"200", "400", "401", "403", "404", "500", "503"},
    ("/healthz", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/metrics", "get"): {"200"},
}


def test_every_operation_and_status_is_documented(document):
    assert document["openapi"].startswith("3.")
    found = {(path, method): set(operation["responses"]) for path, item in document["paths"].items() for method, operation in item.items()}
    assert found == OPERATIONS


def test_every_route_is_documented(app, document):
    documented = {re.sub(r"\{(\w+)\}", r"<\1>", path) for path in document["paths"]}
    not_api = ("static", "docs.root", "docs.docs_page", "docs.docs_asset", "docs.openapi_document")
    served = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint not in not_api}
    assert served == documented


def test_bearer_security_on_api_operations(document):
    assert document["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    for path, item in document["paths"].items():
        for operation in item.values():
            assert (operation.get("security") == [{"bearerAuth": []}]) is path.startswith("/api/")
    assert "security" not in document["paths"]["/metrics"]["get"]  # no METRICS_TOKEN: open


@pytest.mark.parametrize("config_overrides", [{"METRICS_TOKEN": "scraper-token"}])
def test_metrics_with_a_token_document_their_own_security(document):
    metrics = document["paths"]["/metrics"]["get"]
    assert metrics["security"] == [{"metricsToken": []}]
    assert set(metrics["responses"]) == {"200", "401"}
    assert metrics["responses"]["401"]["description"] == "`authentication_required` or `invalid_token`"
    assert set(metrics["responses"]["200"]["content"]) == {"text/plain"}


def operations(document):
    return [(path, method, operation) for path, item in document["paths"].items() for method, operation in item.items()]


def test_the_document_reads_well_in_generators_and_swagger_ui(document):
    assert len(document["info"]["description"]) > 200
    tags = {tag["name"]: tag["description"] for tag in document["tags"]}
    assert set(tags) == {"chat", "history", "usage", "operations"} and all(tags.values())
    ids = [operation["operationId"] for _path, _method, operation in operations(document)]
    assert len(ids) == len(set(ids)) == len(operations(document))
    assert all(re.fullmatch(r"[a-z][a-z_]*", operation_id) for operation_id in ids)
    for path, method, operation in operations(document):
        assert set(operation["tags"]) <= set(tags), (path, method)
        if "requestBody" in operation:
            assert operation["requestBody"]["content"]["application/json"]["example"], (path, method)
        for status, response in operation["responses"].items():
            for media_type, content in response.get("content", {}).items():
                assert content.get("example"), (path, method, status, media_type)


def test_examples_are_valid_answers(document):
    """The documented examples validate against the documented schemas (what Swagger UI shows is real)."""
    from chatapp.openapi import EXAMPLES
    from chatapp.schemas import ChatResponseSchema, ConversationListSchema, MessageListSchema

    assert ChatRequestSchema(default_model="gpt-4").load(EXAMPLES["send_message"]["request"])
    for operation_id, schema in (("send_message", ChatResponseSchema), ("list_conversations", ConversationListSchema),
                                 ("list_messages", MessageListSchema)):
        assert schema().validate(EXAMPLES[operation_id]["response"]) == {}, operation_id


def test_the_examples_of_changing_history_are_valid():
    """Renaming a conversation and giving feedback: the examples' requests load, their answers validate."""
    from chatapp.openapi import EXAMPLES
    from chatapp.schemas import ConversationSchema, ConversationUpdateSchema, FeedbackRequestSchema, FeedbackResponseSchema

    assert ConversationUpdateSchema().load(EXAMPLES["update_conversation"]["request"])
    assert FeedbackRequestSchema().load(EXAMPLES["put_feedback"]["request"])
    for operation_id, schema in (("get_conversation", ConversationSchema), ("update_conversation", ConversationSchema),
                                 ("put_feedback", FeedbackResponseSchema)):
        assert schema().validate(EXAMPLES[operation_id]["response"]) == {}, operation_id


def test_chat_documents_replays_and_the_probes_their_bodies(document):
    chat_ok = document["paths"]["/api/{user_id}/chat"]["post"]["responses"]["200"]
    assert "Idempotent-Replayed" in chat_ok["headers"]
    schemas = document["components"]["schemas"]
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert content["example"]["status"] == status
        name = content["schema"]["$ref"].rsplit("/", 1)[1]
        assert schemas[name]["properties"]["status"]["enum"] == [status]


def test_errors_use_the_error_schema_and_say_their_codes(document):
    chat = document["paths"]["/api/{user_id}/chat"]["post"]["responses"]
    assert chat["409"]["description"] == "`conversation_busy` or `idempotency_in_progress` or `turn_stopped`"
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
    assert set(schemas["ChatResponse"]["required"]) == {"conversation_id", "message", "role", "created_at", "usage", "message_id", "model",
                                                        "finish_reason"}
    assert schemas["ChatResponse"]["properties"]["finish_reason"]["enum"] == ["stop", "length", "stopped"]


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


def test_a_rename_must_change_something(document):
    """An empty PATCH body is 400: the document says so too, so that generated clients and fuzzers agree."""
    assert document["components"]["schemas"]["ConversationUpdate"]["minProperties"] == 1
    patch = document["paths"]["/api/{user_id}/conversations/{conversation_id}"]["patch"]
    assert patch["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ConversationUpdate"}
