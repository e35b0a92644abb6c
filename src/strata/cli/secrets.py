"""Secrets the CLI is given (enrollment tokens, admin tokens): from a file, the
environment or a prompt, so that they need not appear in argv, where `ps` shows them to
every local user."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from strata.errors import StrataError


def read_secret(value: str | None, file: Path | None, *, env: str, what: str,
                prompt: str) -> str:
    """The secret from `--X` (value), `--X-file`, $env, or a hidden prompt on a terminal,
    in that order; one line if there is none."""
    if value and file is not None:
        raise StrataError(f"give the {what} once: --{_flag(what)} or --{_flag(what)}-file")
    if file is not None:
        try:
            text = file.read_text().strip()
        except OSError as exc:
            raise StrataError(f"cannot read {what} file {file}: "
                              f"{(exc.strerror or str(exc)).lower()}") from None
        if not text:
            raise StrataError(f"{what} file {file} is empty")
        return text
    secret = value or os.environ.get(env, "").strip()
    if secret:
        return secret
    if sys.stdin.isatty():
        import getpass

        secret = getpass.getpass(f"{prompt}: ").strip()
        if secret:
            return secret
    raise StrataError(f"no {what}: give --{_flag(what)}-file FILE (or set {env}, or type it "
                      "at the prompt on a terminal)")


def _flag(what: str) -> str:
    return what.split()[-1]


def write_secret_file(path: Path, secret: str) -> None:
    """Replace `path` with `secret` atomically, readable by its owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StrataError(f"cannot write {path}: {(exc.strerror or str(exc)).lower()} (the "
                          f"new token, shown once: {secret})") from None
