"""The ASGI app as hypercorn workers import it: settings come from the environment."""

from till.server.app import create_app
from till.server.settings import from_env

app = create_app(from_env())
