"""The ASGI app as the server's workers import it: settings come from the environment."""

from till.server import logs
from till.server.app import create_app
from till.server.settings import from_env

settings = from_env()
logs.configure(settings.log_level)
app = create_app(settings)
