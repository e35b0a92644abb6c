"""The reflector's state directory: its enrollment (server, credential, the server's
ticket key, where it listens and caches) and its counters. Files are replaced
atomically and readable by their owner only."""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from strata.errors import StrataError
from strata.store.backend import atomic_write

CONFIG = "reflector.json"
COUNTERS = "counters.json"


def default_state_dir() -> Path:
    return Path("/var/lib/strata-reflector")


class NotEnrolled(StrataError):
    pass


@dataclass
class ReflectorConfig:
    server: str
    reflector_id: str
    credential: str
    ticket_key: str  # the server's Ed25519 public key (hex) that signs tickets
    listen: str  # HOST:PORT it serves the branch's agents on
    url: str  # how the agents reach it (told to the server at enrollment)
    cache: str  # the cache's folder
    cache_size: int  # bytes
    name: str = ""
    ca_cert: str = ""  # trusting the server: a CA bundle, or
    server_cert: str = ""  # its certificate pinned at enrollment (PEM file)
    insecure: bool = False  # plain HTTP to a server beyond loopback was allowed

    @property
    def verify(self) -> bool | ssl.SSLContext:
        from strata.transport import verify_setting

        return verify_setting(self.ca_cert, self.server_cert)


class ReflectorState:
    def __init__(self, path: Path):
        self.path = Path(path)

    def save_config(self, cfg: ReflectorConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path / CONFIG, json.dumps(asdict(cfg), indent=1).encode())
        os.chmod(self.path / CONFIG, 0o600)

    def config(self) -> ReflectorConfig:
        try:
            return ReflectorConfig(**json.loads((self.path / CONFIG).read_text()))
        except FileNotFoundError:
            raise NotEnrolled(f"no reflector is enrolled in {self.path}; run `strata "
                              "reflector enroll`") from None
        except (ValueError, TypeError) as exc:
            raise StrataError(f"reflector state in {self.path} is malformed ({exc})") from None

    def enrolled(self) -> bool:
        return (self.path / CONFIG).exists()

    def save_counters(self, counters: dict[str, int]) -> None:
        atomic_write(self.path / COUNTERS, json.dumps(counters).encode(), durable=False)

    def counters(self) -> dict[str, int]:
        try:
            doc = json.loads((self.path / COUNTERS).read_text())
        except (OSError, ValueError):
            return {}
        return {k: int(v) for k, v in doc.items() if isinstance(v, int)}
