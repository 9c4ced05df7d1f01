"""The WSGI entry point: `gunicorn wsgi:app`, `flask --app wsgi ...`."""
from chatapp import create_app
from config import ConfigError, exit_on_config_error

try:
    app = create_app()
except ConfigError as exc:
    exit_on_config_error(exc)
