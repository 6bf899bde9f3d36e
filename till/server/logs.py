"""Log set-up shared by the CLI and the worker processes it spawns."""

from __future__ import annotations

import logging
import re
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# Anything shaped like a key, prefix included: a client may put a token where it does not
# belong (a path, a header echoed in an error) and no log line may carry it on.
SECRET = re.compile(r"\b(?:till_sk_|till_admin_|sk-|AIza)[A-Za-z0-9._~%+/=-]*")


class RedactSecrets(logging.Filter):
    """Masks keys in every record the handler writes, whichever logger it came from: the
    message, and the traceback (an exception's message may quote its input)."""

    _traceback = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = SECRET.sub("<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # The formatter uses exc_text when it is set: it gets the masked one.
            record.exc_text = self._traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = SECRET.sub("<redacted>", record.exc_text)
        if record.stack_info:
            record.stack_info = SECRET.sub("<redacted>", record.stack_info)
        return True


class DropClientNoise(logging.Filter):
    """uvicorn warns once per malformed request, which any client can send as fast as it
    likes: the client gets its 400, the log gets nothing."""

    NOISE = ("Invalid HTTP request received.",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.NOISE))


def configure(level: str) -> None:
    """Once per process: spawned workers start with no handlers of their own."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RedactSecrets())
        root.addHandler(handler)
    root.setLevel(level.upper())
    server = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DropClientNoise) for f in server.filters):
        server.addFilter(DropClientNoise())
