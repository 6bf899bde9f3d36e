"""The `till` command: run the server, manage tenants and secrets.

Server-side commands import the server lazily, so the SDK alone (`pip install till-ac`) still
gives a working `till --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"till: {message}", file=sys.stderr)
    return EXIT_ERROR


def _server_settings(**overrides: Any) -> Any:
    try:
        from till.server.settings import from_env
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            f"till: the server is not installed ({exc.name}); pip install 'till-ac[server]'"
        ) from None
    return from_env(**overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- till serve ---


def cmd_serve(args: argparse.Namespace) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run

    from till.server.embedded import EmbeddedRedis
    from till.server.keyfile import load_keyring

    settings = _server_settings(host=args.host, port=args.port, workers=args.workers)
    _configure_logging(settings.log_level)
    # Workers are separate processes that read their settings from the environment.
    os.environ.update(
        TILL_HOST=settings.host, TILL_PORT=str(settings.port), TILL_WORKERS=str(settings.workers)
    )
    load_keyring(settings)  # made once here, so workers starting together find one keyring
    embedded = None
    if settings.embedded:
        # Started before the workers, which join it; stopped after the last one exits.
        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.application_path = "till.server.asgi:app"
    config.workers = settings.workers if settings.workers > 1 else 0
    # Paths only: a query string can hold a token (?key=...), and logs must never see one.
    config.accesslog = logging.getLogger("till.access") if settings.access_log else None
    config.access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss'
    config.errorlog = logging.getLogger("hypercorn.error")
    config.loglevel = settings.log_level.upper()
    config.graceful_timeout = 30.0
    config.keep_alive_timeout = 75.0  # above common load balancers' idle timeouts
    config.include_server_header = False
    try:
        import uvloop  # noqa: F401

        config.worker_class = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is part of the server extra
        pass
    store = f"embedded Redis in {settings.data_dir}" if embedded else "Redis at TILL_REDIS_URL"
    print(
        f"Till listening on http://{host}:{settings.port} "
        f"({settings.workers} worker{'s' if settings.workers > 1 else ''}, {store})\n"
        f"  make a tenant:  till tenant create NAME    (prints its admin key)\n"
        f"  OpenAI base URL for scoped keys: http://{host}:{settings.port}/v1",
        flush=True,
    )
    try:
        return run(config) or EXIT_OK
    finally:
        if embedded is not None:
            embedded.stop()


# --- till tenant ---


async def _with_ledger(settings: Any, work: Any) -> Any:
    from till.server.embedded import EmbeddedRedis
    from till.server.ledger import Ledger, connect

    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await asyncio.to_thread(embedded.start)
    ledger = Ledger(connect(url, timeout=settings.redis_timeout, max_connections=4))
    try:
        return await work(ledger)
    finally:
        await ledger.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from till.server.ledger import StoreUnavailable
    from till.server.plans import PLANS

    plan = PLANS.get(args.plan)
    if plan is None:
        return _fail(f"unknown plan {args.plan!r}; choose one of: {', '.join(PLANS)}")
    settings = _server_settings()

    async def work(ledger: Any) -> Any:
        return await ledger.create_tenant(args.name, args.email or "", plan)

    try:
        tenant, admin_key = asyncio.run(_with_ledger(settings, work))
    except StoreUnavailable:
        return _fail("the store is unavailable (check TILL_REDIS_URL)")
    print(f"Created tenant {tenant.name!r} (id {tenant.id}, plan {tenant.plan}).")
    print(
        f"Plan limits: {tenant.max_keys} live keys, "
        f"{tenant.max_activations_per_month} activations per month."
    )
    print("Admin key (shown once, store it safely):", file=sys.stderr)
    print(admin_key)
    return EXIT_OK


def cmd_tenant_list(args: argparse.Namespace) -> int:
    settings = _server_settings()

    async def work(ledger: Any) -> Any:
        tenants = []
        for tenant_id in await ledger.tenant_ids():
            tenant = await ledger.tenant(tenant_id)
            if tenant is not None:
                tenants.append((tenant, await ledger.month_activations(tenant_id)))
        return tenants

    rows = asyncio.run(_with_ledger(settings, work))
    if args.json:
        import json

        print(json.dumps([
            {"id": t.id, "name": t.name, "email": t.email, "plan": t.plan, "status": t.status,
             "liveKeys": t.live_keys, "maxKeys": t.max_keys, "activationsThisMonth": m,
             "maxActivationsPerMonth": t.max_activations_per_month}
            for t, m in rows
        ], indent=2))  # fmt: skip
        return EXIT_OK
    print(f"{'ID':<17} {'NAME':<24} {'PLAN':<11} {'KEYS':>11} {'THIS MONTH':>21}")
    for t, m in rows:
        keys = f"{t.live_keys}/{t.max_keys}"
        month = f"{m}/{t.max_activations_per_month}"
        print(f"{t.id:<17} {t.name[:24]:<24} {t.plan:<11} {keys:>11} {month:>21}")
    return EXIT_OK


def cmd_tenant_admin_key(args: argparse.Namespace) -> int:
    settings = _server_settings()

    async def work(ledger: Any) -> Any:
        if await ledger.tenant(args.tenant_id) is None:
            return None
        return await ledger.add_admin_key(args.tenant_id)

    admin_key = asyncio.run(_with_ledger(settings, work))
    if admin_key is None:
        return _fail(f"no tenant {args.tenant_id!r}")
    print("New admin key (shown once, store it safely):", file=sys.stderr)
    print(admin_key)
    return EXIT_OK


# --- till secrets ---


def cmd_secrets_generate(args: argparse.Namespace) -> int:
    from till.tokens import Keyring

    print(Keyring.generate(kid=args.kid).format())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="till",
        description="Till: disposable, scoped stand-ins for LLM provider keys.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy and admin API")
    serve.add_argument("--host", help="address to listen on (TILL_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (TILL_PORT, default 8787)")
    serve.add_argument("--workers", type=int, help="worker processes (TILL_WORKERS, default 1)")
    serve.set_defaults(func=cmd_serve)

    tenant = sub.add_parser("tenant", help="manage tenants (talks to the store directly)")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    create = tsub.add_parser(
        "create", help="create a tenant; its admin key is the last line of stdout"
    )
    create.add_argument("name", help="a name for the tenant")
    create.add_argument("--email", help="contact email")
    create.add_argument("--plan", default="pro", help="free, pro or enterprise (default pro)")
    create.set_defaults(func=cmd_tenant_create)
    tlist = tsub.add_parser("list", help="list tenants")
    tlist.add_argument("--json", action="store_true", help="machine-readable output")
    tlist.set_defaults(func=cmd_tenant_list)
    akey = tsub.add_parser("admin-key", help="issue another admin key for a tenant")
    akey.add_argument("tenant_id")
    akey.set_defaults(func=cmd_tenant_admin_key)

    secrets_ = sub.add_parser("secrets", help="master keyring helpers")
    ssub = secrets_.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    gen = ssub.add_parser("generate", help="print a new keyring entry for TILL_SECRET_KEYS")
    gen.add_argument("--kid", default="k1", help="key id for the entry (default k1)")
    gen.set_defaults(func=cmd_secrets_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # SettingsError and friends: a clear line, no traceback
        return _fail(str(exc))
    return result


if __name__ == "__main__":
    sys.exit(main())
