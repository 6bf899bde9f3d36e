"""The `till` command: run the server, manage tenants and secrets, and keys through the SDK.

Server-side commands import the server lazily, so the SDK alone (`pip install till-ac`) still
gives a working `till --help`. `till keys` and `till account` talk to a running Till over HTTP
(`--url` / TILL_URL, `--admin-key` / TILL_ADMIN_KEY); `till key` does what a scoped key's
holder can do with the key alone, read from an environment variable (`--scoped-key-env`, else
TILL_SCOPED_KEY), never from an argument that `ps` would show. They exit 0 on success, 1 on an
error from Till, 2 on a usage error, 3 when Till cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from till.client import KeyClient, TillClient
    from till.models import AccountSummary, ScopedKey

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3


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


# --- till serve ---


def _self_command() -> str:
    """How the user can run this command again: `till` if on PATH, else its path."""
    import shutil

    here = os.path.realpath(sys.argv[0])
    found = shutil.which("till")
    if found is not None and os.path.realpath(found) == here:
        return "till"
    return os.path.relpath(here) if not os.path.relpath(here).startswith("..") else here


def cmd_serve(args: argparse.Namespace) -> int:
    from till.server import logs, serve
    from till.server.embedded import EmbeddedRedis
    from till.server.keyfile import load_keyring

    settings = _server_settings(
        host=args.host, port=args.port, workers=args.workers, server=args.server
    )
    logs.configure(settings.log_level)
    # Workers are separate processes that read their settings from the environment.
    os.environ.update(
        TILL_HOST=settings.host, TILL_PORT=str(settings.port), TILL_WORKERS=str(settings.workers),
        TILL_SERVER=settings.server,
    )  # fmt: skip
    load_keyring(settings)  # made once here, so workers starting together find one keyring
    embedded = None
    if settings.embedded:
        # Started before the workers, which join it; stopped after the last one exits.
        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    store = f"embedded Redis in {settings.data_dir}" if embedded else "Redis at TILL_REDIS_URL"
    print(
        f"Till listening on http://{host}:{settings.port} "
        f"({settings.workers} worker{'s' if settings.workers > 1 else ''}, {settings.server}, "
        f"{store})\n"
        f"  make a tenant:  {_self_command()} tenant create NAME    (prints its admin key)\n"
        f"  OpenAI base URL for scoped keys: http://{host}:{settings.port}/v1",
        flush=True,
    )
    try:
        return serve.run(settings) or EXIT_OK
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


def _change_keyring(args: argparse.Namespace, change: Callable[[Any], Any]) -> int:
    """Rotate or retire: read the keyring Till serves with, change it, print it (env var form)
    or write it back into the embedded store's key file (--write)."""
    from till.server.keyfile import keyfile_path, load_keyring, replace_keyfile
    from till.server.settings import SettingsError
    from till.tokens import KeyringError

    try:
        settings = _server_settings()
        path = keyfile_path(settings)
        if args.write and path is None:
            return _fail(
                "--write updates the embedded store's key file; this keyring comes from "
                "TILL_SECRET_KEYS: set the printed value there instead"
            )
        if path is not None and not path.exists():
            return _fail(f"no keyring in {path}: start Till once, or set TILL_SECRET_KEYS")
        keyring = change(load_keyring(settings))
    except (SettingsError, KeyringError) as exc:
        return _fail(str(exc))
    if args.write:
        assert path is not None
        replace_keyfile(path, keyring)
        print(f"wrote {path}: {', '.join(keyring.kids)} (restart Till to use it)", file=sys.stderr)
    else:
        print(keyring.format())
    return EXIT_OK


def cmd_secrets_add(args: argparse.Namespace) -> int:
    return _change_keyring(args, lambda keyring: keyring.added(args.kid))


def cmd_secrets_promote(args: argparse.Namespace) -> int:
    return _change_keyring(args, lambda keyring: keyring.promoted(args.kid))


def cmd_secrets_rotate(args: argparse.Namespace) -> int:
    def rotate(keyring: Any) -> Any:
        added = keyring.added(args.kid)
        return added.promoted(added.kids[-1])

    return _change_keyring(args, rotate)


def cmd_secrets_retire(args: argparse.Namespace) -> int:
    return _change_keyring(args, lambda keyring: keyring.without(args.kid))


# --- till keys / till account (through the SDK) ---


def _run(open_client: Callable[[], Any], work: Callable[[Any], None]) -> int:
    from till.client import APIConnectionError, TillError

    try:
        with open_client() as client:
            work(client)
    except APIConnectionError as exc:
        print(f"till: [{exc.code}] {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except TillError as exc:
        print(f"till: [{exc.code}] {exc}", file=sys.stderr)
        # No HTTP exchange and no connection failure: the flags or environment are incomplete.
        return EXIT_USAGE if exc.status_code == 0 else EXIT_ERROR
    except ValueError as exc:  # refused by the SDK before anything was sent
        print(f"till: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _api(args: argparse.Namespace, work: Callable[[TillClient], None]) -> int:
    from till.client import TillClient

    return _run(lambda: TillClient(args.admin_key, args.url), work)


def _holder(args: argparse.Namespace, work: Callable[[KeyClient], None]) -> int:
    from till.client import KeyClient

    var = args.scoped_key_env or "TILL_SCOPED_KEY"
    token = os.environ.get(var, "").strip()
    if not token:
        print(f"till: no scoped key in environment variable {var}", file=sys.stderr)
        return EXIT_USAGE
    return _run(lambda: KeyClient(token, args.url), work)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _as_json(obj: Any) -> str:
    import dataclasses
    import json

    def wire(value: Any) -> Any:
        # The admin API's own names (camelCase), as `till tenant list --json` prints them.
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {_camel(f.name): wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, list):
            return [wire(v) for v in value]
        return value

    return json.dumps(wire(obj), indent=2)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _budget(used: float, limit: float | None, left: float | None) -> str:
    if limit is None:
        return f"{_num(used)} (no limit)"
    return f"{_num(used)} / {_num(limit)} ({_num(left)} left)"


def _print_key(key: ScopedKey) -> None:
    import json

    rows = [
        ("id", key.id),
        ("name", key.name or "-"),
        ("provider", key.provider),
        ("status", key.status),
        ("activations", _budget(key.used_activations, key.max_activations,
                                key.remaining_activations)),
        ("tokens", _budget(key.used_tokens, key.max_tokens, key.remaining_tokens)),
        ("spend (cents)", _budget(key.used_spend_cents, key.max_spend_cents,
                                  key.remaining_spend_cents)),
        ("ip whitelist", ", ".join(key.ip_whitelist) or "any"),
        ("models", ", ".join(key.allowed_models) if key.allowed_models else "any"),
        ("expires", key.expires_at or "never"),
        ("rate", f"{key.rpm} per minute" if key.rpm is not None else "no limit"),
        ("concurrency", f"{key.in_flight} / {key.max_concurrent} in flight"
                        if key.max_concurrent is not None else "no limit"),
        ("metadata", json.dumps(key.metadata) if key.metadata else "-"),
        ("created", key.created_at or "-"),
        ("last used", key.last_used_at or "never"),
    ]  # fmt: skip
    if key.parent_id is not None:
        rows.append(("parent", key.parent_id))
    for label, value in rows:
        print(f"{label + ':':<14} {value}")


def _show(args: argparse.Namespace, key: ScopedKey) -> None:
    if args.json:
        print(_as_json(key))
    else:
        _print_key(key)


def _show_new(args: argparse.Namespace, key: ScopedKey) -> None:
    """A key just made: its token, shown this once, alone on the last line of stdout."""
    print("Scoped key (shown once, save it now; Till cannot show it again):", file=sys.stderr)
    if args.json:
        print(_as_json(key))
        return
    _print_key(key)
    print(key.scoped_key)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    for row in (headers, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _upstream_key(args: argparse.Namespace) -> str | None:
    if args.upstream_key_env is not None:
        value = os.environ.get(args.upstream_key_env, "")
        source = f"environment variable {args.upstream_key_env}"
    elif args.upstream_key_stdin:
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass("Upstream key (not echoed): ")
        else:
            value = sys.stdin.readline()
        source = "stdin"
    else:
        value, source = args.upstream_key, "--upstream-key"
    value = value.strip()
    if not value:
        print(f"till: no upstream key in {source}", file=sys.stderr)
        return None
    return value


def cmd_keys_create(args: argparse.Namespace) -> int:
    upstream_key = _upstream_key(args)
    if upstream_key is None:
        return EXIT_USAGE

    def work(client: TillClient) -> None:
        key = client.create_key(
            args.provider,
            upstream_key,
            args.max_activations,
            name=args.name,
            ip_whitelist=args.ip or None,
            metadata=dict(args.metadata) if args.metadata else None,
            max_tokens=args.max_tokens,
            max_spend_cents=args.max_spend_cents,
            expires_at=args.expires_at,
            ttl_seconds=args.ttl,
            allowed_models=args.model,
            rpm=args.rpm,
            max_concurrent=args.max_concurrent,
        )
        _show_new(args, key)

    return _api(args, work)


KEY_COLUMNS = ("ID", "NAME", "PROVIDER", "STATUS", "ACTIVATIONS", "TOKENS", "CENTS", "LAST USED")


def cmd_keys_list(args: argparse.Namespace) -> int:
    def work(client: TillClient) -> None:
        keys = client.list_keys()
        if args.json:
            print(_as_json(keys))
            return
        rows = [
            (k.id, (k.name or "-")[:32], k.provider, k.status,
             f"{k.used_activations}/{k.max_activations}",
             f"{k.used_tokens}/{_num(k.max_tokens)}",
             f"{_num(k.used_spend_cents)}/{_num(k.max_spend_cents)}",
             k.last_used_at or "never")
            for k in keys
        ]  # fmt: skip
        _table(KEY_COLUMNS, rows)

    return _api(args, work)


def cmd_keys_get(args: argparse.Namespace) -> int:
    return _api(args, lambda client: _show(args, client.get_key(args.key_id)))


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    return _api(args, lambda client: _show(args, client.revoke_key(args.key_id)))


def cmd_keys_update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {
        "name": args.name,
        "metadata": dict(args.metadata) if args.metadata else None,
        "max_activations": args.max_activations,
        "max_tokens": args.max_tokens,
        "max_spend_cents": args.max_spend_cents,
        "rpm": args.rpm,
        "max_concurrent": args.max_concurrent,
        "add_activations": args.add_activations,
        "add_tokens": args.add_tokens,
        "add_spend_cents": args.add_spend_cents,
    }
    removed = [name.replace("-", "_") for name in args.remove_limit or ()]
    if not removed and all(value is None for value in changes.values()):
        print("till: nothing to change (see till keys update --help)", file=sys.stderr)
        return EXIT_USAGE

    def work(client: TillClient) -> None:
        _show(args, client.update_key(args.key_id, remove_limits=removed, **changes))

    return _api(args, work)


def cmd_keys_top_up(args: argparse.Namespace) -> int:
    if args.activations is None and args.tokens is None and args.spend_cents is None:
        print(
            "till: nothing to add: give --activations, --tokens or --spend-cents", file=sys.stderr
        )
        return EXIT_USAGE

    def work(client: TillClient) -> None:
        key = client.top_up(
            args.key_id,
            activations=args.activations,
            tokens=args.tokens,
            spend_cents=args.spend_cents,
        )
        _show(args, key)

    return _api(args, work)


def cmd_key_info(args: argparse.Namespace) -> int:
    return _holder(args, lambda client: _show(args, client.info()))


def cmd_key_revoke(args: argparse.Namespace) -> int:
    return _holder(args, lambda client: _show(args, client.revoke()))


def cmd_key_child(args: argparse.Namespace) -> int:
    def work(client: KeyClient) -> None:
        child = client.create_child(
            args.max_activations,
            name=args.name,
            metadata=dict(args.metadata) if args.metadata else None,
            max_tokens=args.max_tokens,
            max_spend_cents=args.max_spend_cents,
            expires_at=args.expires_at,
            ttl_seconds=args.ttl_seconds,
            allowed_models=args.allowed_model,
            ip_whitelist=args.ip,
            rpm=args.rpm,
            max_concurrent=args.max_concurrent,
        )
        _show_new(args, child)

    return _holder(args, work)


def _print_account(account: AccountSummary) -> None:
    t = account.tenant
    rows = [("scope", account.scope or "-")]
    if t is not None:
        rows += [
            ("tenant", f"{t.name or t.id} (id {t.id}, {t.email or 'no email'})"),
            ("plan", f"{t.plan} ({t.status})"),
            ("keys", f"{account.keys_used} / {t.max_keys} live"),
            ("activations", f"{t.activations_this_month} / {t.max_activations_per_month} "
                            "this month"),
        ]  # fmt: skip
    else:
        rows += [
            ("keys", f"{account.keys_used} live"),
            ("activations", f"{account.activations_used_this_month} this month"),
        ]
    for label, value in rows:
        print(f"{label + ':':<12} {value}")


def cmd_account(args: argparse.Namespace) -> int:
    def work(client: TillClient) -> None:
        account = client.account()
        if args.json:
            print(_as_json(account))
        else:
            _print_account(account)

    return _api(args, work)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _metadata_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name, value


# The limits `keys update --remove-limit` lifts (the SDK's names with dashes).
REMOVABLE = ("max-tokens", "max-spend-cents", "rpm", "max-concurrent")


def _limit_name(text: str) -> str:
    return text.strip().replace("_", "-")


def _add_keys_parsers(sub: Any) -> None:
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--url", help="Till's base URL (default: TILL_URL, else https://api.till.ac)")
    api.add_argument(
        "--admin-key",
        help="the tenant's admin key (default: TILL_ADMIN_KEY, which keeps it out of history)",
    )
    api.add_argument("--json", action="store_true", help="machine-readable output")

    keys = sub.add_parser(
        "keys", help="create, list, inspect, change and revoke scoped keys (with the admin key)"
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = ksub.add_parser(
        "create",
        parents=[api],
        help="create a scoped key; the key is the last line of stdout (shown once)",
        description="Create a scoped key. Its token is printed once, alone on the last line "
        "of stdout (inside the JSON with --json); a reminder to save it goes to stderr.",
    )
    create.add_argument(
        "--provider", required=True, choices=["openai", "anthropic", "google"],
        help="the provider of the upstream key",
    )  # fmt: skip
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--upstream-key", metavar="KEY", help="the provider's key (visible in ps)")
    source.add_argument(
        "--upstream-key-env", metavar="VAR", help="read the provider's key from this variable"
    )
    source.add_argument(
        "--upstream-key-stdin", action="store_true", help="read the provider's key from stdin"
    )
    create.add_argument(
        "--max-activations", type=_positive_int, required=True, metavar="N",
        help="requests the key may make",
    )  # fmt: skip
    create.add_argument("--name", help="a name, stored as metadata name")
    create.add_argument(
        "--max-tokens", type=_positive_int, metavar="N", help="input + output tokens"
    )
    create.add_argument("--max-spend-cents", type=_positive_int, metavar="N", help="cost ceiling")
    create.add_argument(
        "--ip", action="extend", nargs="+", metavar="CIDR", help="allowed client IPs or CIDRs"
    )
    create.add_argument(
        "--metadata", action="extend", nargs="+", type=_metadata_item, metavar="KEY=VALUE",
        help="metadata entries (string values)",
    )  # fmt: skip
    create.add_argument(
        "--model", action="extend", nargs="+", metavar="MODEL",
        help="models the key may use: exact names or prefixes ending in * (quote them)",
    )  # fmt: skip
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument(
        "--ttl", type=_positive_int, metavar="SECONDS", help="the key expires this much later"
    )
    expiry.add_argument(
        "--expires-at", metavar="TIME",
        help="when the key expires, RFC 3339 with a timezone (2030-01-31T12:00:00Z)",
    )  # fmt: skip
    create.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute")
    create.add_argument(
        "--max-concurrent", type=_positive_int, metavar="N", help="requests in flight at once"
    )
    create.set_defaults(func=cmd_keys_create)

    klist = ksub.add_parser("list", parents=[api], help="list the account's keys")
    klist.set_defaults(func=cmd_keys_list)
    get = ksub.add_parser("get", parents=[api], help="show one key")
    get.add_argument("key_id", metavar="ID")
    get.set_defaults(func=cmd_keys_get)
    revoke = ksub.add_parser("revoke", parents=[api], help="revoke a key at once")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(func=cmd_keys_revoke)

    update = ksub.add_parser(
        "update",
        parents=[api],
        help="change a key's name, metadata or limits",
        description="Change a live key's name, metadata or limits; every worker sees the change "
        "at once. --max-* set a limit, --add-* raise one atomically (not both for one limit), "
        "--remove-limit lifts one. A key exhausted with room again is active; a limit lowered "
        "to what the key has used exhausts it. What is sealed in the token (provider, upstream "
        "key, IPs, models, expiry) cannot change. A revoked key cannot change (exit 1, "
        "already_revoked).",
    )
    update.add_argument("key_id", metavar="ID", help="the key's id (see keys list)")
    update.add_argument("--name", help="a new name (metadata name)")
    update.add_argument(
        "--metadata", action="extend", nargs="+", type=_metadata_item, metavar="KEY=VALUE",
        help="replace the metadata with these entries (the name goes too, unless --name)",
    )  # fmt: skip
    limits = update.add_argument_group("set a limit")
    limits.add_argument(
        "--max-activations", type=_positive_int, metavar="N", help="requests the key may make"
    )
    limits.add_argument(
        "--max-tokens", type=_positive_int, metavar="N", help="input + output tokens"
    )
    limits.add_argument("--max-spend-cents", type=_positive_int, metavar="N", help="cost ceiling")
    limits.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute")
    limits.add_argument(
        "--max-concurrent", type=_positive_int, metavar="N", help="requests in flight at once"
    )
    adds = update.add_argument_group("raise a limit (a top-up)")
    adds.add_argument(
        "--add-activations", type=_positive_int, metavar="N", help="add N to max activations"
    )
    adds.add_argument(
        "--add-tokens", type=_positive_int, metavar="N",
        help="add N to max tokens (the key must have a token limit)",
    )  # fmt: skip
    adds.add_argument(
        "--add-spend-cents", type=_positive_int, metavar="N",
        help="add N to max spend (the key must have a spend limit)",
    )  # fmt: skip
    update.add_argument(
        "--remove-limit", action="extend", nargs="+", type=_limit_name, choices=REMOVABLE,
        metavar="NAME", help=f"lift limits: {', '.join(REMOVABLE)}",
    )  # fmt: skip
    update.set_defaults(func=cmd_keys_update)

    top_up = ksub.add_parser(
        "top-up",
        parents=[api],
        help="add activations, tokens or cents to a key's limits",
        description="Raise a key's limits atomically (the same as keys update --add-*). A key "
        "exhausted with room again is active. Not repeated on a lost answer: check with keys "
        "get before trying again.",
    )
    top_up.add_argument("key_id", metavar="ID", help="the key's id (see keys list)")
    top_up.add_argument("--activations", type=_positive_int, metavar="N", help="requests to add")
    top_up.add_argument(
        "--tokens", type=_positive_int, metavar="N",
        help="tokens to add (the key must have a token limit)",
    )  # fmt: skip
    top_up.add_argument(
        "--spend-cents", type=_positive_int, metavar="N",
        help="cents to add (the key must have a spend limit)",
    )  # fmt: skip
    top_up.set_defaults(func=cmd_keys_top_up)

    account = sub.add_parser(
        "account", parents=[api], help="the account: plan, live keys, activations this month"
    )
    account.set_defaults(func=cmd_account)


def _add_key_parsers(sub: Any) -> None:
    holder = argparse.ArgumentParser(add_help=False)
    holder.add_argument(
        "--url", help="Till's base URL (default: TILL_URL, else https://api.till.ac)"
    )
    holder.add_argument(
        "--scoped-key-env", metavar="VAR",
        help="the environment variable holding the scoped key (default: TILL_SCOPED_KEY)",
    )  # fmt: skip
    holder.add_argument("--json", action="store_true", help="machine-readable output")

    key = sub.add_parser(
        "key",
        help="as a scoped key's holder, with the key alone: inspect, revoke, child keys",
        description="Commands for the holder of a scoped key, authenticated with that key. The "
        "key is read from an environment variable (TILL_SCOPED_KEY, or the one --scoped-key-env "
        "names), never from the command line, where ps would show it.",
    )
    ksub = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    info = ksub.add_parser(
        "info",
        parents=[holder],
        help="the key's own view: status, limits, what is left",
        description="Show the scoped key: status, limits and what it can really still use "
        "(for a child key, also within what its parents have left).",
    )
    info.set_defaults(func=cmd_key_info)
    revoke = ksub.add_parser(
        "revoke",
        parents=[holder],
        help="revoke the key (and its child keys) at once",
        description="Revoke the scoped key and every child key made from it; they answer 401 "
        "from then on. There is no undo.",
    )
    revoke.set_defaults(func=cmd_key_revoke)
    child = ksub.add_parser(
        "child",
        parents=[holder],
        help="make a child key within this key's limits; its token is the last line of stdout",
        description="Make a child key: the same provider and upstream key, limits that fit in "
        "what this key has left, models and IPs within this key's, an expiry no later than its "
        "own. Every request of the child also counts against this key, and revoking this key "
        "revokes the child. The child's token is printed once, alone on the last line of "
        "stdout (inside the JSON with --json); a reminder to save it goes to stderr.",
    )
    child.add_argument(
        "--max-activations", type=_positive_int, required=True, metavar="N",
        help="requests the child may make",
    )  # fmt: skip
    child.add_argument("--name", help="a name, stored as metadata name")
    child.add_argument(
        "--metadata", action="extend", nargs="+", type=_metadata_item, metavar="KEY=VALUE",
        help="metadata entries (string values)",
    )  # fmt: skip
    child.add_argument(
        "--max-tokens", type=_positive_int, metavar="N", help="input + output tokens"
    )
    child.add_argument("--max-spend-cents", type=_positive_int, metavar="N", help="cost ceiling")
    expiry = child.add_mutually_exclusive_group()
    expiry.add_argument(
        "--ttl-seconds", "--ttl", type=_positive_int, metavar="SECONDS",
        help="the child expires this much later (never after this key)",
    )  # fmt: skip
    expiry.add_argument(
        "--expires-at", metavar="TIME",
        help="when the child expires, RFC 3339 with a timezone (2030-01-31T12:00:00Z)",
    )  # fmt: skip
    child.add_argument(
        "--allowed-model", "--model", action="extend", nargs="+", metavar="MODEL",
        help="models the child may use, within this key's: exact names or prefixes ending in *",
    )  # fmt: skip
    child.add_argument(
        "--ip", action="extend", nargs="+", metavar="CIDR",
        help="allowed client IPs or CIDRs, within this key's",
    )  # fmt: skip
    child.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute")
    child.add_argument(
        "--max-concurrent", type=_positive_int, metavar="N", help="requests in flight at once"
    )
    child.set_defaults(func=cmd_key_child)


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
    serve.add_argument(
        "--server",
        choices=("uvicorn", "hypercorn"),
        help="HTTP server (TILL_SERVER, default uvicorn; hypercorn speaks HTTP/2 as well)",
    )
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
    write_help = "write the embedded store's key file instead of printing (then restart Till)"
    source = (
        "Reads the keyring Till uses (TILL_SECRET_KEYS, or the embedded store's key file) and "
        "prints the changed one for TILL_SECRET_KEYS (or writes the file with --write). "
    )
    steps = {
        "add": (cmd_secrets_add, "add a new key at the end: it opens tokens, seals none yet",
                "Step 1 of a rolling rotation: give the result to every worker, then promote."),
        "promote": (cmd_secrets_promote, "put KID first: new tokens are sealed with it",
                    "Step 2: once every worker has the key, put it first everywhere."),
        "rotate": (cmd_secrets_rotate, "add and promote a new key in one step",
                   "For one server, or when every worker restarts at once; with rolling "
                   "restarts use add, then promote, so no worker meets a token it cannot open."),
        "retire": (cmd_secrets_retire, "drop KID: tokens sealed with it stop working (401)",
                   "Last step, when no token sealed with KID should work any more."),
    }  # fmt: skip
    for name, (func, summary, detail) in steps.items():
        step = ssub.add_parser(name, help=summary, description=source + detail)
        if name in ("add", "rotate"):
            step.add_argument("--kid", help="key id of the new key (default: the next free kN)")
        else:
            step.add_argument("kid", metavar="KID")
        step.add_argument("--write", action="store_true", help=write_help)
        step.set_defaults(func=func)

    _add_keys_parsers(sub)
    _add_key_parsers(sub)
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
