"""HTTP routes: the only code that touches flask.request."""
