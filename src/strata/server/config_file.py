"""`strata server --config FILE`: the server's options in a TOML file, one key per flag
(spelled as the flag, without its dashes: `listen`, `tls-cert`, `maintenance-interval`),
so a deployment keeps them in /etc/strata/server.toml instead of a long unit file line.

The file is read whole and checked before anything starts: every problem is reported,
one plain line each, with the file and the key at fault. Flags given on the command line
(and STRATA_* variables) override the file.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.errors import StrataError


@dataclass(frozen=True)
class Key:
    kind: str  # "text", "path", "flag", "number", "count", "texts"
    what: str  # how a wrong value is explained


KEYS: dict[str, Key] = {
    "data": Key("path", "a directory path"),
    "listen": Key("text", 'an address "HOST:PORT"'),
    "tls-cert": Key("path", "a file path"),
    "tls-key": Key("path", "a file path"),
    "tls": Key("flag", "true or false"),
    "tls-name": Key("texts", 'a list of names, e.g. ["strata.example.net"]'),
    "insecure": Key("flag", "true or false"),
    "catalog": Key("text", 'a URL "postgresql://USER@HOST/DATABASE" or "sqlite:///PATH"'),
    "maintenance-interval": Key("number", "a number of seconds"),
    "store": Key("text", 'a directory or "s3://BUCKET/PREFIX"'),
    "s3-endpoint-url": Key("text", 'a URL, e.g. "https://minio.example:9000"'),
    "s3-region": Key("text", 'a region name, e.g. "eu-west-1"'),
    "encrypt": Key("flag", "true or false"),
    "passphrase-file": Key("path", "a file path"),
    "credential-rotation": Key("text", 'a duration, e.g. "7d" or "12h"'),
    "credential-lifetime": Key("text", 'a duration, e.g. "90d"'),
    "metrics-listen": Key("text", 'an address "HOST:PORT"'),
    "header-timeout": Key("number", "a number of seconds"),
    "body-timeout": Key("number", "a number of seconds"),
    "common-holders": Key("count", "a whole number of at least 2"),
}
MAX_BYTES = 1 << 20  # a configuration file, not a data file


class ConfigFileInvalid(StrataError):
    """The configuration file cannot be used; `problems` holds one line per fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else
                         f"{len(problems)} problems: " + "; ".join(problems))


def _check(path: Path, name: str, key: Key, value: Any) -> tuple[Any, str | None]:
    """The value as the flag would take it, or why not."""
    where = f"{path}: {name!r}"
    ok: bool
    if key.kind in ("text", "path"):
        ok = isinstance(value, str) and value.strip() != "" and "\0" not in value
        value = Path(value) if ok and key.kind == "path" else value
    elif key.kind == "flag":
        ok = isinstance(value, bool)
    elif key.kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        value = float(value) if ok else value
    elif key.kind == "count":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 2
    else:  # texts
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    if ok:
        return value, None
    shown = repr(value) if not isinstance(value, dict) else "a table"
    return None, f"{where} must be {key.what}, not {shown[:80]}"


def load_config(path: Path) -> dict[str, Any]:
    """The file's settings by key, each checked; `ConfigFileInvalid` lists every fault."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigFileInvalid([f"{path}: no such configuration file"]) from None
    except OSError as exc:
        raise ConfigFileInvalid([f"{path}: cannot be read ({exc.strerror})"]) from None
    if len(raw) > MAX_BYTES:
        raise ConfigFileInvalid([f"{path}: larger than 1 MiB; is it the right file?"])
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigFileInvalid([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileInvalid([f"{path}: not valid TOML ({exc})"]) from None
    settings: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in doc.items():
        key = KEYS.get(name)
        if key is None:
            near = difflib.get_close_matches(name.replace("_", "-"), KEYS, n=1)
            problems.append(f"{path}: unknown key {name!r}"
                            + (f" (did you mean {near[0]!r}?)" if near else
                               " (the keys are the server's flags without '--')"))
            continue
        checked, problem = _check(path, name, key, value)
        if problem:
            problems.append(problem)
        else:
            settings[name] = checked
    if problems:
        raise ConfigFileInvalid(problems)
    return settings
