"""Where the master keyring comes from: TILL_SECRET_KEYS, or a file made on first run."""

from __future__ import annotations

import os
from pathlib import Path

from till.server.settings import Settings, SettingsError
from till.tokens import Keyring, KeyringError

KEYFILE_NAME = "secret_keys"


def load_keyring(settings: Settings) -> Keyring:
    """The keyring to seal and open tokens with.

    With the embedded store and no TILL_SECRET_KEYS, one keyring is generated into the data
    dir (mode 0600) the first time and read back ever after. With a shared Redis every worker
    must hold the same keyring, so it has to be given explicitly.
    """
    if settings.secret_keys:
        try:
            return Keyring.parse(settings.secret_keys)
        except KeyringError as exc:
            raise SettingsError(f"TILL_SECRET_KEYS: {exc}") from None
    if not settings.embedded:
        raise SettingsError(
            "TILL_SECRET_KEYS is required with TILL_REDIS_URL: every worker must share one "
            "keyring (generate one with `till secrets generate`)"
        )
    return _file_keyring(Path(settings.data_dir) / KEYFILE_NAME)


def keyfile_path(settings: Settings) -> Path | None:
    """The generated keyring's file, when the keyring comes from one (embedded store, no
    TILL_SECRET_KEYS); None when it is given in the environment."""
    if settings.secret_keys or not settings.embedded:
        return None
    return Path(settings.data_dir) / KEYFILE_NAME


def replace_keyfile(path: Path, keyring: Keyring) -> None:
    """Write a new keyring over the file, atomically (a worker starting meanwhile reads the
    old one or the new one, never half of one), mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(keyring.format() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_keyring(path: Path) -> Keyring:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: when several workers start at once, exactly one writes the file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(Keyring.generate().format() + "\n")
    spec = ""
    for _ in range(50):
        spec = path.read_text().strip()
        if spec:
            break
        # Another process created the file and has not written it yet.
        import time

        time.sleep(0.02)
    if path.stat().st_mode & 0o077:
        raise SettingsError(f"{path} must not be readable by group or others (chmod 600)")
    try:
        return Keyring.parse(spec)
    except KeyringError as exc:
        raise SettingsError(f"{path}: {exc}") from None
