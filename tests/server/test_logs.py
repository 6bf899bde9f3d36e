"""The log filter every Till process installs: no key reaches a log line, traceback included."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from tests.conftest import SECRET_PATTERN, UPSTREAM_KEY
from till.server.logs import FORMAT, RedactSecrets

KEYS = [
    UPSTREAM_KEY,
    "till_sk_abcdefghijklmnop.QUJDREVGR0hJSktMTU5PUA",
    "till_admin_0123456789abcdef0123456789abcdef",
    "AIzaSy-test-upstream-google-0123456789",
    "sk-ant-api03-test",
]


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through a handler set up as logs.configure sets up the root's."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("till.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out
    logger.removeHandler(handler)


@pytest.mark.parametrize("key", KEYS)
def test_keys_in_messages_and_arguments_are_masked(
    logged: tuple[logging.Logger, io.StringIO], key: str
) -> None:
    logger, out = logged
    logger.warning("a client sent %s in a path", key)
    logger.error(f"inline: /v1/{key}/x and again ?key={key}")
    text = out.getvalue()
    assert not SECRET_PATTERN.search(text), text
    assert text.count("<redacted>") == 3
    assert "a client sent <redacted> in a path" in text


@pytest.mark.parametrize("key", KEYS)
def test_keys_in_tracebacks_are_masked(
    logged: tuple[logging.Logger, io.StringIO], key: str
) -> None:
    logger, out = logged
    try:
        raise ValueError(f"could not parse {key}")
    except ValueError:
        logger.exception("request failed")
    logger.info("where: %s", "here", stack_info=True)
    text = out.getvalue()
    assert "Traceback" in text and "ValueError: could not parse <redacted>" in text
    assert not SECRET_PATTERN.search(text), text


def test_text_without_keys_is_left_alone(logged: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = logged
    logger.info("settled %d tokens for key %s", 57, "abcdefghijklmnop")
    assert out.getvalue().endswith("settled 57 tokens for key abcdefghijklmnop\n")
