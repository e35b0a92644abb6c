"""The agent's own state directory: credential, files-cache parent manifest, status.

Never centralized itself. Every file is replaced atomically, and the credential is
readable by its owner only (mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from strata.errors import StrataError
from strata.model.entry import Entry
from strata.model.manifest import decode_manifest
from strata.store.backend import atomic_write


def default_state_dir() -> Path:
    if platform.system() == "Windows":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "Strata"
    return Path("/var/lib/strata-agent")


def default_root() -> Path:
    return Path(os.environ.get("SYSTEMDRIVE", "C:") + "\\") if platform.system() == "Windows" \
        else Path("/")


class NotEnrolled(StrataError):
    pass


@dataclass
class Credential:
    server: str
    endpoint_id: str
    credential: str
    root: str
    ca_cert: str = ""  # PEM bundle to trust for a server with a private CA ("" = system)
    # Stay on the root's file system (mounts inside it are not walked); None: only when
    # the root is the machine's own "/" (NFS shares, USB disks, tmpfs stay out).
    one_file_system: bool | None = None
    server_cert: str = ""  # the server's own certificate, pinned at enrollment (PEM file)
    # Plain HTTP beyond loopback allowed at enrollment (--insecure); None: enrolled by a
    # version that did not ask, whose credential keeps working as it did.
    insecure: bool | None = None

    @property
    def server_trust(self) -> str:
        """How the server's identity is checked, in words (`agent status`)."""
        if not self.server.startswith("https://"):
            return "none: plain HTTP"
        if self.server_cert:
            from strata.transport import certificate_file_fingerprint

            return f"pinned certificate {certificate_file_fingerprint(self.server_cert)}"
        return f"CA bundle {self.ca_cert}" if self.ca_cert else "the system's CAs"

    @property
    def verify(self) -> bool | ssl.SSLContext:
        from strata.transport import verify_setting

        return verify_setting(self.ca_cert, self.server_cert)

    @property
    def stays_on_root_fs(self) -> bool:
        if self.one_file_system is not None:
            return self.one_file_system
        return os.path.realpath(self.root) == os.path.realpath(os.sep)


class AgentState:
    def __init__(self, path: Path):
        self.path = Path(path)

    # -- credential -----------------------------------------------------------
    def save_credential(self, cred: Credential) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path / "credential.json", json.dumps(cred.__dict__).encode())
        os.chmod(self.path / "credential.json", 0o600)

    def save_server_certificate(self, pem: str) -> Path:
        """The server's certificate as pinned at enrollment."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path / "server-cert.pem"
        atomic_write(path, pem.encode())
        return path

    def credential(self) -> Credential:
        try:
            return Credential(**json.loads((self.path / "credential.json").read_text()))
        except FileNotFoundError:
            raise NotEnrolled(f"this agent is not enrolled (no credential in {self.path}); "
                              "run `strata agent enroll`") from None
        except (ValueError, TypeError) as exc:
            raise StrataError(f"agent credential in {self.path} is malformed ({exc})") from None

    # -- status ---------------------------------------------------------------
    def status(self) -> dict:
        try:
            return json.loads((self.path / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {"bytes_sent": 0, "bytes_received": 0}

    def update_status(self, **changes: object) -> dict:
        doc = self.status()
        doc.update(changes)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path / "status.json", json.dumps(doc, indent=1, default=str).encode(),
                     durable=False)
        return doc

    def add_wire_bytes(self, sent: int, received: int) -> None:
        doc = self.status()
        self.update_status(bytes_sent=int(doc.get("bytes_sent", 0)) + sent,
                           bytes_received=int(doc.get("bytes_received", 0)) + received)

    # -- files cache ----------------------------------------------------------
    def save_parent(self, snapshot: str, manifest: bytes) -> None:
        atomic_write(self.path / "parent.manifest", manifest)
        atomic_write(self.path / "parent.json", json.dumps({"snapshot": snapshot}).encode())

    def parent(self) -> tuple[str | None, bytes | None]:
        """The last snapshot's id (None after a re-enrollment) and manifest, with the
        stat keys (the files cache)."""
        try:
            sid = json.loads((self.path / "parent.json").read_text())["snapshot"]
            if sid is not None and not isinstance(sid, str):
                raise ValueError("snapshot")
            return sid, (self.path / "parent.manifest").read_bytes()
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None, None

    def reset_parent(self) -> None:
        for name in ("parent.json", "parent.manifest"):
            (self.path / name).unlink(missing_ok=True)

    def forget_endpoint(self, keep_files_cache: bool = False) -> None:
        """Drop what belonged to the endpoint this directory was enrolled as (its status,
        its last snapshot, its update in progress). What describes the tree stays: the
        layers applied to it, the chunk cache, hardware.json, and with `keep_files_cache`
        the last snapshot's manifest, as the files cache (no longer as a parent): a
        machine enrolling again on the same server holds what it held (docs/security.md),
        so the files it has not changed are neither read nor sent again."""
        if keep_files_cache and self.parent()[1] is not None:
            atomic_write(self.path / "parent.json", json.dumps({"snapshot": None}).encode())
        else:
            self.reset_parent()
        for name in ("status.json", "update.json"):
            (self.path / name).unlink(missing_ok=True)

    # -- layers ---------------------------------------------------------------
    def update(self) -> dict:
        """The layer update in progress: desired state, download/ready/failed, plan."""
        try:
            return json.loads((self.path / "update.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save_update(self, doc: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path / "update.json", json.dumps(doc, default=str).encode())

    def applied_key(self) -> str:
        try:
            return json.loads((self.path / "applied.json").read_text())["key"]
        except (FileNotFoundError, ValueError, KeyError):
            return ""

    def save_applied(self, key: str, desired: dict | None = None) -> None:
        """The applied desired state's key, and the state itself (what `agent compliance`
        measures against when the server is unreachable)."""
        doc: dict = {"key": key} if desired is None else {"key": key, "desired": desired}
        atomic_write(self.path / "applied.json", json.dumps(doc).encode())

    def applied_desired(self) -> dict | None:
        try:
            doc = json.loads((self.path / "applied.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return doc.get("desired") if isinstance(doc, dict) else None

    def owned(self) -> dict[bytes, Entry]:
        """What the applied IT layers put on the endpoint (path -> entry)."""
        try:
            data = (self.path / "owned.manifest").read_bytes()
        except FileNotFoundError:
            return {}
        return {e.path: e for e in decode_manifest([data])}

    def save_owned(self, manifest: bytes) -> None:
        atomic_write(self.path / "owned.manifest", manifest)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One agent run at a time per state directory."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StrataError("another agent run is in progress for this state "
                                  "directory") from None
            yield
        finally:
            os.close(fd)
