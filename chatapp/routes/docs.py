"""GET /openapi.json and GET /docs: Swagger UI served from the swagger-ui-bundle package (no CDN);
GET / leads there."""
from flask import Blueprint, Response, current_app, send_from_directory, url_for
from swagger_ui_bundle import swagger_ui_path

from chatapp.openapi import build_openapi

bp = Blueprint("docs", __name__)

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>chatapp API</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", persistAuthorization: true});
  </script>
</body>
</html>
"""


@bp.get("/")
def root():
    """A person who opens the service's address in a browser lands on its API reference."""
    response = Response(status=302, headers={"Location": url_for("docs.docs_page")})
    del response.headers["Content-Type"]  # no body, so no content type
    return response


@bp.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3 document, built once per process."""
    if "openapi" not in current_app.extensions:
        current_app.extensions["openapi"] = build_openapi(current_app)
    return current_app.extensions["openapi"]


@bp.get("/docs")
def docs_page():
    return DOCS_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/docs/<path:filename>")
def docs_asset(filename: str):
    return send_from_directory(swagger_ui_path, filename)
