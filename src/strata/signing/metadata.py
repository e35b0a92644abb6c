"""Building and signing TUF metadata with python-tuf's Metadata API: the first root and
targets (`strata signing init`), each new targets version (a layer signed, an assignment
signed), and root versions that rotate a role's key.

Lifetimes bound what a stolen key or a dishonest server can do without the offline keys:
the online key (snapshot, timestamp) can keep serving old targets at most until the
targets metadata expires (TARGETS_LIFETIME: a freeze lasts at most that long), and a
network attacker without any key can replay old metadata at most until the timestamp
expires (TIMESTAMP_LIFETIME).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from strata.signing import SigningError

ROOT_LIFETIME = timedelta(days=365)
TARGETS_LIFETIME = timedelta(days=30)
SNAPSHOT_LIFETIME = timedelta(days=7)
TIMESTAMP_LIFETIME = timedelta(days=1)
ONLINE_ROLES = ("snapshot", "timestamp")
MAX_METADATA_BYTES = 32 << 20  # a targets file: thousands of layers and scopes


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_root(root_key: Key, targets_key: Key, online_key: Key, now: datetime) -> Metadata[Root]:
    """Version 1 of the root: who signs what. Consistent snapshots, so an agent always
    reads one coherent set of files even while the server publishes a new one."""
    root = Root(version=1, expires=now + ROOT_LIFETIME, consistent_snapshot=True)
    root.add_key(root_key, "root")
    root.add_key(targets_key, "targets")
    for role in ONLINE_ROLES:
        root.add_key(online_key, role)
    return Metadata(root)


def next_root(current: Root, now: datetime, replace: dict[str, Key]) -> Metadata[Root]:
    """The next root version, with the key of each role in `replace` swapped for a new
    one (an empty `replace` only extends the expiry)."""
    root = copy.deepcopy(current)
    root.version += 1
    root.expires = now + ROOT_LIFETIME
    for role, key in replace.items():
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(key, role)
    return Metadata(root)


def new_targets(now: datetime) -> Metadata[Targets]:
    return Metadata(Targets(version=1, expires=now + TARGETS_LIFETIME))


def next_targets(current: Targets, now: datetime, add: Iterable[TargetFile] = (),
                 remove: Iterable[str] = (),
                 lifetime: timedelta = TARGETS_LIFETIME) -> Metadata[Targets]:
    """The next targets version: `add` set (or replaced), `remove` dropped, and a fresh
    expiry (every signing pushes the freeze bound out again)."""
    targets = copy.deepcopy(current)
    targets.version += 1
    targets.expires = now + lifetime
    for path in remove:
        targets.targets.pop(path, None)
    for target in add:
        targets.targets[target.path] = target
    return Metadata(targets)


def sign(md: Metadata, *signers: Signer) -> bytes:
    """Sign with every signer given (a root rotation needs the old and the new root key)
    and serialize."""
    md.signatures.clear()
    for signer in signers:
        try:
            md.sign(signer, append=True)
        except UnsignedMetadataError as exc:
            raise SigningError(f"cannot sign {md.signed.type} metadata: {exc}") from None
    return md.to_bytes(JSONSerializer(compact=False))


def role_keyids(root: Root, role: str) -> list[str]:
    return sorted(root.roles[role].keyids)
