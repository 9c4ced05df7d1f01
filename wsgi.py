"""The WSGI entry point: `gunicorn wsgi:app`, `flask --app wsgi ...`."""
import sys

from chatapp import create_app
from config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"chatapp: configuration error: {exc}")
