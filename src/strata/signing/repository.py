"""The server's copy of the signed metadata, in `DATA/signing/` (0700).

The server stores and serves what the image manager signed (root, targets) after
checking it: the signatures against the current root, versions that only go forward,
an expiry in the future, and targets that describe layers and assignments in Strata's
shape. It holds one key, the online key (`online.key`, 0600), for the two roles that
only attest freshness: snapshot and timestamp. It re-signs them before they expire.
With that key alone nothing can be added to what agents accept (see metadata.py for the
freeze bound).

Files (consistent snapshots, so an agent reads one coherent set while a new one is being
published): `metadata/N.root.json` (every version: agents walk the chain to rotate),
`N.targets.json`, `N.snapshot.json` (the newest KEEP_VERSIONS), `timestamp.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from securesystemslib.signer import CryptoSigner, Key
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Timestamp
from tuf.repository import Repository

from strata.signing import SigningError
from strata.signing.catalog import MalformedMetadata, SignedCatalog
from strata.signing.keys import fingerprint, generate, load_private, save_private
from strata.signing.metadata import (
    MAX_METADATA_BYTES,
    ONLINE_ROLES,
    SNAPSHOT_LIFETIME,
    TIMESTAMP_LIFETIME,
    role_keyids,
    utcnow,
)
from strata.store.backend import atomic_write

FILENAME = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?(root|timestamp|snapshot|targets)\.json$")
KEEP_VERSIONS = 20  # older snapshot and targets files go (an agent asks for the newest)
ONLINE_KEY = "online.key"
NEXT_ONLINE_KEY = "online.key.next"  # made for a rotation, in use once a root names it

class MetadataRefused(SigningError):
    """Uploaded metadata the server will not publish."""

    http_status = 422


class SigningRepository:
    """Stores, checks and serves the metadata; signs snapshot and timestamp."""

    def __init__(self, path: Path, clock: Callable[[], datetime] = utcnow):
        self.path = Path(path)
        self.meta = self.path / "metadata"
        self.clock = clock
        self._lock = threading.Lock()
        self._catalog: tuple[tuple[int, int], SignedCatalog] | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.meta / "timestamp.json").exists()

    def _latest(self, role: str) -> int:
        """The newest version of `role` written (0: none)."""
        best = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.meta):
                m = FILENAME.match(name)
                if m and m.group(2) == role and m.group(1):
                    best = max(best, int(m.group(1)))
        return best

    def _load(self, filename: str) -> Metadata:
        return Metadata.from_bytes((self.meta / filename).read_bytes())

    def root(self) -> Root:
        return self._load(f"{self._latest('root')}.root.json").signed

    def read(self, filename: str) -> bytes | None:
        """A metadata file as agents ask for it (`root.json` is the newest root), or None
        when there is no such file. Refreshes the timestamp first if it is getting old."""
        m = FILENAME.match(filename)
        if m is None or not self.initialized:
            return None
        version, role = m.group(1), m.group(2)
        if role == "timestamp":
            if version:
                return None
            self.refresh()
        elif not version:
            if role != "root":
                return None  # consistent snapshots: always by version
            filename = f"{self._latest('root')}.root.json"
        try:
            return (self.meta / filename).read_bytes()
        except FileNotFoundError:
            return None

    # -- the online key --------------------------------------------------------------------
    def online_key(self, *, rotate: bool = False) -> Key:
        """The online key's public part, made on first use. `rotate` makes (or returns)
        the next one, which replaces it once a root naming it is published."""
        with self._locked():
            return self._key(NEXT_ONLINE_KEY if rotate else ONLINE_KEY)

    def _key(self, name: str) -> Key:
        """(Under the lock.) The public part of an online key file, made if missing."""
        path = self.path / name
        if not path.exists():
            save_private(path, generate(), None)
        return load_private(path, None).public_key

    def _online_signer(self) -> CryptoSigner:
        return load_private(self.path / ONLINE_KEY, None)

    # -- publishing --------------------------------------------------------------------------
    def initialize(self, root_bytes: bytes, targets_bytes: bytes) -> None:
        """The first root and targets from `strata signing init`."""
        with self._locked():
            if self.initialized:
                raise MetadataRefused("signing is already set up on this server: rotate "
                                      "keys with `strata signing rotate`")
            root = _parse(root_bytes, "root")
            if root.signed.version != 1:
                raise MetadataRefused("the first root must be version 1")
            _verify(root.signed, "root", root)
            self._check_root(root.signed, allow_next_online=False)
            targets = self._check_targets(targets_bytes, root.signed, newer_than=0)
            self.meta.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.meta / "1.root.json", root_bytes)
            atomic_write(self.meta / f"{targets.signed.version}.targets.json", targets_bytes)
            self._sign_online(force=True)

    def publish_targets(self, targets_bytes: bytes) -> int:
        """A new targets version signed by the image manager; its version number."""
        with self._locked():
            self._require_initialized()
            targets = self._check_targets(targets_bytes, self.root(),
                                          newer_than=self._latest("targets"))
            version = targets.signed.version
            atomic_write(self.meta / f"{version}.targets.json", targets_bytes)
            self._sign_online(force=False)
            self._prune()
            return version

    def publish_root(self, root_bytes: bytes, targets_bytes: bytes | None = None) -> int:
        """The next root (a key rotation or a new expiry), signed by the current root's
        keys and its own; with new targets when the targets key changed."""
        with self._locked():
            self._require_initialized()
            current = self.root()
            new = _parse(root_bytes, "root")
            if new.signed.version != current.version + 1:
                raise MetadataRefused(f"root version {new.signed.version} does not follow "
                                      f"{current.version}")
            _verify(current, "root", new, what="the current root's key")
            _verify(new.signed, "root", new, what="the new root's own key")
            next_online = self._check_root(new.signed, allow_next_online=True)
            targets = None
            if targets_bytes is not None:
                targets = self._check_targets(targets_bytes, new.signed,
                                              newer_than=self._latest("targets"))
            elif role_keyids(new.signed, "targets") != role_keyids(current, "targets"):
                raise MetadataRefused("the targets key changes: send targets metadata "
                                      "signed with the new key along with the root")
            else:  # the current targets must stay valid under the new root
                _verify(new.signed, "targets", self._load(self._current_targets_file()))
            atomic_write(self.meta / f"{new.signed.version}.root.json", root_bytes)
            if next_online:
                os.replace(self.path / NEXT_ONLINE_KEY, self.path / ONLINE_KEY)
            if targets is not None:
                atomic_write(self.meta / f"{targets.signed.version}.targets.json",
                             targets_bytes)  # type: ignore[arg-type]
            self._sign_online(force=True)
            return new.signed.version

    def refresh(self) -> bool:
        """Re-sign snapshot and timestamp when less than half their life is left."""
        if not self.initialized:
            return False
        now = self.clock()
        with self._locked():
            snapshot = self._load(f"{self._latest('snapshot')}.snapshot.json").signed
            timestamp = self._load("timestamp.json").signed
            if snapshot.expires - now < SNAPSHOT_LIFETIME / 2:
                self._sign_online(force=True)
                return True
            if timestamp.expires - now < TIMESTAMP_LIFETIME / 2:
                self._online().do_timestamp(force=True)
                return True
        return False

    # -- reading back ----------------------------------------------------------------------
    def catalog(self) -> SignedCatalog:
        """The layers and assignments of the published targets, checked against the root
        (a file edited on disk is reported, not believed)."""
        name = self._current_targets_file()
        st = (self.meta / name).stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._catalog
        if cached is not None and cached[0] == stamp and cached[1].version == int(
                name.split(".")[0]):
            return cached[1]
        md = self._load(name)
        _verify(self.root(), "targets", md, what="the targets key")
        catalog = SignedCatalog.from_targets(md.signed)
        self._catalog = (stamp, catalog)
        return catalog

    def status(self) -> dict:
        if not self.initialized:
            return {"initialized": False}
        root = self.root()
        doc: dict = {"initialized": True, "root_version": root.version,
                     "root_expires": root.expires.isoformat(),
                     "fingerprint": ",".join(role_keyids(root, "root")),
                     "targets_keys": role_keyids(root, "targets"),
                     "online_key": role_keyids(root, "timestamp")}
        for role, filename in (("snapshot", f"{self._latest('snapshot')}.snapshot.json"),
                               ("timestamp", "timestamp.json")):
            signed = self._load(filename).signed
            doc[f"{role}_version"] = signed.version
            doc[f"{role}_expires"] = signed.expires.isoformat()
        try:
            catalog = self.catalog()
        except (SigningError, ValueError) as exc:
            doc["problem"] = f"the targets metadata on disk does not verify: {exc}"
            return doc
        doc.update(targets_version=catalog.version, targets_expires=catalog.expires.isoformat(),
                   layers=sorted(catalog.layers), assignments=sorted(catalog.assignments))
        return doc

    # -- checks ----------------------------------------------------------------------------
    def _require_initialized(self) -> None:
        if not self.initialized:
            raise MetadataRefused("signing is not set up on this server: run "
                                  "`strata signing init --keys DIR` first")

    def _check_root(self, root: Root, *, allow_next_online: bool) -> bool:
        """The online roles must be this server's online key (or, in a rotation, the next
        one); True when the next one is named."""
        if not root.consistent_snapshot:
            raise MetadataRefused("the root must use consistent snapshots")
        if root.is_expired(self.clock()):
            raise MetadataRefused(f"the root expired on {root.expires:%Y-%m-%d}")
        current = fingerprint(self._key(ONLINE_KEY))
        wanted = {current}
        if allow_next_online and (self.path / NEXT_ONLINE_KEY).exists():
            wanted.add(fingerprint(self._key(NEXT_ONLINE_KEY)))
        named = {tuple(role_keyids(root, role)) for role in ONLINE_ROLES}
        if len(named) != 1 or len(next(iter(named))) != 1 or next(iter(named))[0] not in wanted:
            raise MetadataRefused("snapshot and timestamp must be signed by this server's "
                                  "online key alone (ask the server for it)")
        return next(iter(named))[0] != current

    def _check_targets(self, data: bytes, root: Root, *, newer_than: int) -> Metadata:
        targets = _parse(data, "targets")
        _verify(root, "targets", targets, what="the targets key")
        if targets.signed.version <= newer_than:
            raise MetadataRefused(f"targets version {targets.signed.version} is not newer "
                                  f"than {newer_than}: refusing to go back")
        if targets.signed.is_expired(self.clock()):
            raise MetadataRefused(f"the targets metadata expired on "
                                  f"{targets.signed.expires:%Y-%m-%d}")
        if targets.signed.delegations is not None:
            raise MetadataRefused("delegated targets roles are not used by Strata")
        try:
            SignedCatalog.from_targets(targets.signed)
        except MalformedMetadata as exc:
            raise MetadataRefused(str(exc)) from None
        return targets

    def _current_targets_file(self) -> str:
        snapshot = self._load(f"{self._latest('snapshot')}.snapshot.json").signed
        return f"{snapshot.meta['targets.json'].version}.targets.json"

    # -- snapshot and timestamp (python-tuf's Repository does the bookkeeping) -------------
    def _online(self) -> OnlineRoles:
        return OnlineRoles(self)

    def _sign_online(self, *, force: bool) -> None:
        online = self._online()
        online.do_snapshot(force=force)
        online.do_timestamp(force=force)

    def _prune(self) -> None:
        for role in ("snapshot", "targets"):
            keep_from = self._latest(role) - KEEP_VERSIONS
            for name in os.listdir(self.meta):
                m = FILENAME.match(name)
                if m and m.group(2) == role and m.group(1) and int(m.group(1)) < keep_from:
                    (self.meta / name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time, across threads and server processes."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)


def _parse(data: bytes, role: str) -> Metadata:
    if len(data) > MAX_METADATA_BYTES:
        raise MetadataRefused(f"{role} metadata over {MAX_METADATA_BYTES} bytes")
    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises several kinds for bad input
        raise MetadataRefused(f"not TUF {role} metadata: {exc}") from None
    if md.signed.type != role:
        raise MetadataRefused(f"expected {role} metadata, got {md.signed.type}")
    return md


def _verify(delegator: Root, role: str, md: Metadata, *, what: str = "") -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        raise MetadataRefused(f"the {role} metadata is not signed by "
                              f"{what or 'the keys the root names'}") from None


class OnlineRoles(Repository):
    """python-tuf's Repository filled in for this server: it does the bookkeeping of
    snapshot and timestamp; they are read from disk and closed by signing with the
    online key."""

    def __init__(self, repo: SigningRepository):
        self.repo = repo

    def open(self, role: str) -> Metadata:
        repo = self.repo
        if role == "timestamp":
            path = repo.meta / "timestamp.json"
            return repo._load(path.name) if path.exists() else Metadata(Timestamp())
        if role == "snapshot":
            n = repo._latest("snapshot")
            return repo._load(f"{n}.snapshot.json") if n else Metadata(Snapshot(meta={}))
        return repo._load(f"{repo._latest(role)}.{role}.json")

    def close(self, role: str, md: Metadata) -> None:
        repo = self.repo
        if role == "snapshot":
            md.signed.version = repo._latest("snapshot") + 1
            md.signed.expires = repo.clock() + SNAPSHOT_LIFETIME
            name = f"{md.signed.version}.snapshot.json"
        elif role == "timestamp":
            path = repo.meta / "timestamp.json"
            md.signed.version = repo._load(path.name).signed.version + 1 if path.exists() \
                else 1
            md.signed.expires = repo.clock() + TIMESTAMP_LIFETIME
            name = "timestamp.json"
        else:
            raise AssertionError(f"the server never signs {role}")
        md.sign(repo._online_signer())
        atomic_write(repo.meta / name, md.to_bytes())

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": MetaFile(version=self.repo._latest("targets"))}

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(version=self.repo._latest("snapshot"))
