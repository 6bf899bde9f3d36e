"""Server settings: read once from the environment (and CLI flags), then immutable."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

SERVERS = ("uvicorn", "hypercorn")
DEFAULT_UPSTREAMS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
}


class SettingsError(ValueError):
    """A setting has a value Till cannot use; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8787
    workers: int = 1
    # None: the embedded Redis under data_dir.
    redis_url: str | None = None
    data_dir: Path = Path(".till")
    # None: generated into data_dir on first run (embedded store only).
    secret_keys: str | None = None
    upstream_openai: str = DEFAULT_UPSTREAMS["openai"]
    upstream_anthropic: str = DEFAULT_UPSTREAMS["anthropic"]
    upstream_google: str = DEFAULT_UPSTREAMS["google"]
    # Requests: bodies past this size get 413 before they are read in full.
    max_body_bytes: int = 32 * 1024 * 1024
    # Slow clients. A connection gets idle_timeout seconds to send a request's headers (after
    # it opens, or after the previous response: serve.py bounds both, under either server), then
    # body_timeout seconds for the whole body (408), then write_timeout seconds for each piece
    # of the response it is sent (a client that stops reading is dropped).
    idle_timeout: float = 75.0
    body_timeout: float = 60.0
    write_timeout: float = 60.0
    # Open streams per worker; more get 503 with Retry-After before anything is reserved.
    max_streams: int = 2000
    # On SIGTERM: stop accepting, give open requests this long to finish, settle, exit.
    graceful_timeout: float = 30.0
    # Upstream: connect, and the longest silence between two bytes of a response.
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 300.0
    # A hold not settled by then (worker died) is charged by the reaper, which looks this often.
    hold_seconds: int = 3600
    reap_interval: float = 10.0
    # A worker that has not beaten for this long is dead: its requests' holds are charged (and
    # their concurrency slots freed) then, not at their deadline. It beats six times as often.
    worker_timeout: float = 30.0
    # A key's `rpm` counts the requests of a sliding window this long: a minute, except in tests
    # that must not wait one (rpm is then requests per window).
    rate_window_seconds: int = 60
    # A retry under the same Idempotency-Key within this long is answered rather than sent on.
    idempotency_seconds: int = 86400
    # Output tokens reserved when a limited key's request sets no output cap of its own.
    default_max_output_tokens: int = 4096
    # Input reserved on top of the body for a request that continues a conversation stored at
    # the provider (Responses' previous_response_id): the body cannot show how long it is.
    hidden_input_tokens: int = 128_000
    # Redis: fail closed (503) rather than wait longer than this.
    redis_timeout: float = 2.0
    redis_max_connections: int = 512
    # X-Forwarded-For is believed only from these peers (the load balancer).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    access_log: bool = False
    log_level: str = "info"
    # The HTTP server: uvicorn (httptools; a quarter less CPU per request) or hypercorn (HTTP/2).
    server: str = "uvicorn"

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    def upstream(self, provider: str) -> str:
        value: str = getattr(self, f"upstream_{provider}")
        return value.rstrip("/")


_ENV: dict[str, tuple[str, type]] = {
    "TILL_HOST": ("host", str),
    "TILL_PORT": ("port", int),
    "TILL_WORKERS": ("workers", int),
    "TILL_REDIS_URL": ("redis_url", str),
    "TILL_DATA_DIR": ("data_dir", Path),
    "TILL_SECRET_KEYS": ("secret_keys", str),
    "TILL_UPSTREAM_OPENAI": ("upstream_openai", str),
    "TILL_UPSTREAM_ANTHROPIC": ("upstream_anthropic", str),
    "TILL_UPSTREAM_GOOGLE": ("upstream_google", str),
    "TILL_MAX_BODY_BYTES": ("max_body_bytes", int),
    "TILL_IDLE_TIMEOUT": ("idle_timeout", float),
    "TILL_BODY_TIMEOUT": ("body_timeout", float),
    "TILL_WRITE_TIMEOUT": ("write_timeout", float),
    "TILL_MAX_STREAMS": ("max_streams", int),
    "TILL_GRACEFUL_TIMEOUT": ("graceful_timeout", float),
    "TILL_UPSTREAM_CONNECT_TIMEOUT": ("upstream_connect_timeout", float),
    "TILL_UPSTREAM_READ_TIMEOUT": ("upstream_read_timeout", float),
    "TILL_HOLD_SECONDS": ("hold_seconds", int),
    "TILL_REAP_INTERVAL": ("reap_interval", float),
    "TILL_WORKER_TIMEOUT": ("worker_timeout", float),
    "TILL_RATE_WINDOW_SECONDS": ("rate_window_seconds", int),
    "TILL_IDEMPOTENCY_SECONDS": ("idempotency_seconds", int),
    "TILL_DEFAULT_MAX_OUTPUT_TOKENS": ("default_max_output_tokens", int),
    "TILL_HIDDEN_INPUT_TOKENS": ("hidden_input_tokens", int),
    "TILL_REDIS_TIMEOUT": ("redis_timeout", float),
    "TILL_REDIS_MAX_CONNECTIONS": ("redis_max_connections", int),
    "TILL_TRUSTED_PROXIES": ("trusted_proxies", tuple),
    "TILL_ACCESS_LOG": ("access_log", bool),
    "TILL_LOG_LEVEL": ("log_level", str),
    "TILL_SERVER": ("server", str),
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(name: str, raw: str, kind: type) -> object:
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(raw)
            return low in _TRUE
        if kind is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return kind(raw)
    except ValueError:
        # The value itself is not echoed: TILL_SECRET_KEYS must never reach a log.
        raise SettingsError(f"{name} is not a valid {kind.__name__}") from None


def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build Settings from TILL_* variables; keyword overrides (CLI flags) win."""
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, (field, kind) in _ENV.items():
        raw = env.get(name)
        if raw is not None and (raw != "" or kind is bool):
            values[field] = _convert(name, raw, kind)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)  # type: ignore[arg-type]
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    if not 0 <= s.port <= 65535:
        raise SettingsError("TILL_PORT must be between 0 and 65535")
    if s.workers < 1:
        raise SettingsError("TILL_WORKERS must be at least 1")
    if s.max_body_bytes < 1024:
        raise SettingsError("TILL_MAX_BODY_BYTES must be at least 1024")
    if s.max_streams < 1:
        raise SettingsError("TILL_MAX_STREAMS must be at least 1")
    if s.hold_seconds < 1:
        raise SettingsError("TILL_HOLD_SECONDS must be at least 1")
    if s.reap_interval <= 0:
        raise SettingsError("TILL_REAP_INTERVAL must be positive")
    if s.worker_timeout < 1:
        raise SettingsError("TILL_WORKER_TIMEOUT must be at least 1 second")
    if not 1 <= s.rate_window_seconds <= 86400:
        raise SettingsError("TILL_RATE_WINDOW_SECONDS must be between 1 and 86400")
    if s.server not in SERVERS:
        raise SettingsError("TILL_SERVER must be uvicorn or hypercorn")
    if s.idempotency_seconds < 1:
        raise SettingsError("TILL_IDEMPOTENCY_SECONDS must be at least 1")
    if s.hidden_input_tokens < 0:
        raise SettingsError("TILL_HIDDEN_INPUT_TOKENS must not be negative")
    if s.default_max_output_tokens < 1:
        raise SettingsError("TILL_DEFAULT_MAX_OUTPUT_TOKENS must be at least 1")
    for name in (
        "redis_timeout", "upstream_connect_timeout", "upstream_read_timeout",
        "idle_timeout", "body_timeout", "write_timeout", "graceful_timeout",
    ):  # fmt: skip
        if getattr(s, name) <= 0:
            raise SettingsError(f"TILL_{name.upper()} must be positive")
    for provider in DEFAULT_UPSTREAMS:
        url = s.upstream(provider)
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"TILL_UPSTREAM_{provider.upper()} must be an http(s) URL")
    if s.redis_url is not None and not s.redis_url.startswith(
        ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
    ):
        raise SettingsError(
            "TILL_REDIS_URL must start with redis://, rediss://, unix:// or redis+cluster://"
        )
    for peer in s.trusted_proxies:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError:
            raise SettingsError(f"TILL_TRUSTED_PROXIES: {peer!r} is not an IP or CIDR") from None
