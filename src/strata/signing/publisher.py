"""The image manager's side of signing, on their workstation: make the keys and the first
metadata (`strata signing init`), sign a layer and an assignment, rotate a key, push the
expiry out. It trusts the server for nothing it signs: the current metadata is read
through python-tuf from the root pinned at init, a layer's manifest is hashed here from
the bytes the agents will get, and what the server reports is checked against what the
admin asked for before it is signed.

Keys directory: `root.key` and `targets.key` (encrypted with one passphrase, 0600; move
root.key offline once init is done: only rotations and root renewals need it), and
`trust/` (the pinned root and the verified metadata).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import msgpack
import zstandard
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import TargetFile

from strata.model.manifest import decode_manifest, encode_entry
from strata.signing import SigningError
from strata.signing.catalog import (
    ManifestDigest,
    SignedAssignment,
    SignedCatalog,
    SignedLayer,
    SignedOperation,
    assignment_path,
    assignment_target,
    layer_target,
)
from strata.signing.keys import ROOT_KEY, TARGETS_KEY, generate, load_private, save_private
from strata.signing.metadata import (
    new_root,
    new_targets,
    next_root,
    next_targets,
    sign,
    utcnow,
)
from strata.signing.trust import Trusted, pin_root, refresh, root_fingerprint

TRUST_DIR = "trust"
MAX_MANIFEST = 1 << 30
ROOT_RENEW_BEFORE = timedelta(days=90)
LAYER_KIND_OF_FIELD = {"base": "base", "apps": "app", "drivers": "driver"}


class AdminApi(Protocol):
    """The server's admin API, paths below /api/v1/admin."""

    def get(self, path: str) -> Any: ...  # noqa: ANN401 (JSON)

    def get_bytes(self, path: str) -> bytes: ...  # raises trust.MetadataMissing on 404

    def post(self, path: str, body: dict) -> Any: ...  # noqa: ANN401


@dataclass
class Keys:
    """The keys directory and the passphrase that opens its keys."""

    directory: Path
    passphrase: bytes

    def signer(self, name: str) -> CryptoSigner:
        return load_private(self.directory / name, self.passphrase)

    @property
    def trust_dir(self) -> Path:
        return self.directory / TRUST_DIR


def initialize(api: AdminApi, keys: Keys, now: datetime | None = None) -> dict:
    """Make the root and targets keys, the first root (naming the server's online key for
    snapshot and timestamp) and an empty targets, upload them, pin the root here."""
    now = now or utcnow()
    if api.get("/signing").get("initialized"):
        raise SigningError("signing is already set up on this server (`strata signing "
                           "status`); keys are changed with `strata signing rotate`")
    for name in (ROOT_KEY, TARGETS_KEY):
        if (keys.directory / name).exists():
            raise SigningError(f"{keys.directory / name} already exists: use an empty "
                               "directory for new keys")
    online = _key(api.post("/signing/online-key", {}))
    root_signer, targets_signer = generate(), generate()
    keys.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_private(keys.directory / ROOT_KEY, root_signer, keys.passphrase)
    save_private(keys.directory / TARGETS_KEY, targets_signer, keys.passphrase)
    try:
        root_bytes = sign(new_root(root_signer.public_key, targets_signer.public_key, online,
                                   now), root_signer)
        targets_bytes = sign(new_targets(now), targets_signer)
        api.post("/signing/init", {"root": root_bytes.decode(), "targets": targets_bytes.decode()})
    except BaseException:
        for name in (ROOT_KEY, TARGETS_KEY):  # the server never trusted them: useless
            (keys.directory / name).unlink(missing_ok=True)
        raise
    fingerprint = pin_root(keys.trust_dir, root_bytes)
    return {"fingerprint": fingerprint, "keys": str(keys.directory),
            "root_key": str(keys.directory / ROOT_KEY),
            "targets_key": str(keys.directory / TARGETS_KEY)}


class Publisher:
    """Signs new targets versions on top of the verified current one."""

    def __init__(self, api: AdminApi, keys: Keys, now: datetime | None = None):
        self.api = api
        self.keys = keys
        self.now = now
        self._trusted: Trusted | None = None
        self._targets_signer: CryptoSigner | None = None

    def trusted(self) -> Trusted:
        if self._trusted is None:
            if not (self.keys.trust_dir / "pinned-root.json").exists():
                raise SigningError(f"{self.keys.directory} has no pinned root ({TRUST_DIR}/"
                                   "pinned-root.json): use the keys directory `strata "
                                   "signing init` made")
            self._trusted = refresh(self.keys.trust_dir, self._fetch)
        return self._trusted

    def unlock(self) -> None:
        """Open the targets key now, so a wrong passphrase stops a command before it
        changes anything on the server."""
        if self._targets_signer is None:
            self._targets_signer = self.keys.signer(TARGETS_KEY)

    def _fetch(self, name: str) -> bytes:
        return self.api.get_bytes(f"/signing/metadata/{name}")

    def _clock(self) -> datetime:
        return self.now or utcnow()

    def publish(self, add: Iterable[TargetFile] = (), remove: Iterable[str] = ()) -> int:
        """Sign and upload the next targets version; its version number."""
        self.unlock()
        assert self._targets_signer is not None
        current = self.trusted()
        md = next_targets(current.targets, self._clock(), add, remove)
        data = sign(md, self._targets_signer)
        self.api.post("/signing/targets", {"targets": data.decode()})
        self._trusted = None  # the next read verifies what the server now serves
        return md.signed.version

    # -- layers ----------------------------------------------------------------------------
    def sign_layer(self, ref: str, expect: dict | None = None,
                   uploaded_manifest: bytes | None = None) -> SignedLayer:
        """Sign a captured layer: its manifest as the server will serve it (hashed here) and
        its facts. `expect` holds the facts the admin asked for, `uploaded_manifest` the
        tree this CLI uploaded: the stored layer may only drop entries of it (the layer
        rules), never add or alter one."""
        facts = self.api.get(f"/signing/layers/{_path(ref)}")
        for key, value in (expect or {}).items():
            if facts.get(key) != value:
                raise SigningError(f"the server stored layer {ref} with {key} "
                                   f"{facts.get(key)!r}, not {value!r}: not signing it")
        data = _decompress(self.api.get_bytes(f"/signing/layers/{_path(ref)}/manifest"))
        if uploaded_manifest is not None:
            _check_subset(ref, data, uploaded_manifest)
        trusted = self.trusted()
        digest = ManifestDigest.of(data)
        existing = trusted.catalog.layers.get(f"{facts['name']}:{facts['version']}")
        layer = SignedLayer(kind=facts["kind"], name=facts["name"], version=facts["version"],
                            os=facts["os"], match=facts["match"], removes=facts["removes"],
                            serial=existing.serial if existing else
                            trusted.catalog.next_serial(), manifest=digest)
        if existing is not None:
            if existing == layer:
                return existing  # signed already: nothing to do
            raise SigningError(f"layer {layer.ref} is already signed with other content: a "
                               "NAME:VERSION is signed once (capture a new version)")
        self.publish(add=[layer_target(layer)])
        return layer

    # -- assignments -------------------------------------------------------------------------
    def check_refs(self, *, base: str | None = None, apps: list[str] | None = None,
                   drivers: list[str] | None = None) -> None:
        """Every layer an assignment names must be signed, as the kind it is used as."""
        catalog = self.trusted().catalog
        for field, refs in (("base", [base] if base else []), ("apps", apps or []),
                            ("drivers", drivers or [])):
            for ref in refs:
                layer = catalog.layers.get(ref)
                if layer is None:
                    raise SigningError(f"layer {ref} is not signed: sign it first (`strata "
                                       f"layer sign {ref} --keys DIR`)")
                if layer.kind != LAYER_KIND_OF_FIELD[field]:
                    raise SigningError(f"layer {ref} is signed as a {layer.kind} layer, not "
                                       f"{LAYER_KIND_OF_FIELD[field]}")

    def sign_assignments(self, scopes: list[tuple[str, str, list[str] | None]], *,
                         base: str | None = None, apps: list[str] | None = None,
                         drivers: list[str] | None = None,
                         operation: SignedOperation | None = None) -> int:
        """Record an assignment for each (scope, name, members): the fields given replace
        the scope's earlier ones, the others stay; a one-off operation is dropped unless
        this assignment is one."""
        self.check_refs(base=base, apps=apps, drivers=drivers)
        catalog = self.trusted().catalog
        seq = catalog.next_serial()
        add = [_scope_target(catalog, scope, name, members, base=base, apps=apps,
                             drivers=drivers, operation=operation, seq=seq)
               for scope, name, members in scopes]
        return self.publish(add=add)

    def sign_operation(self, endpoint_id: str, kind: str, *, snapshot: str | None = None,
                       base: str | None = None, apps: list[str] | None = None) -> int:
        """Sign the one-off operation the server now holds for an endpoint, after checking
        it is the one the admin ordered (`snapshot`: the id or prefix they gave; `base`,
        `apps`: a provision's layers)."""
        return self.sign_operations([endpoint_id], kind, snapshot=snapshot, base=base,
                                    apps=apps)

    def sign_operations(self, endpoint_ids: list[str], kind: str, *,
                        snapshot: str | None = None, base: str | None = None,
                        apps: list[str] | None = None) -> int:
        """`sign_operation` for each endpoint of a task (a revert or provisioning of a
        collection), checked one by one and published as one metadata version."""
        catalog = self.trusted().catalog
        seq = catalog.next_serial()
        add = []
        for endpoint_id in endpoint_ids:
            view = self.api.get(f"/signing/assignment/{_path(endpoint_id)}")
            op = view.get("operation") or {}
            if op.get("kind") != kind:
                raise SigningError(f"the server holds no {kind} for endpoint "
                                   f"{endpoint_id[:8]}")
            if snapshot and not str(op.get("snapshot", "")).startswith(snapshot.lower()):
                raise SigningError(f"the server's {kind} names snapshot "
                                   f"{str(op.get('snapshot'))[:8]}, not {snapshot}")
            if kind == "provision" and (view.get("base") != base or view.get("apps") != apps):
                raise SigningError("the server's provisioning differs from the layers given")
            signed_op = SignedOperation(kind=kind, snapshot=op.get("snapshot"),
                                        keep_user_apps=bool(op.get("keep_user_apps")),
                                        removes=op.get("removes", []),
                                        manifest=op.get("manifest"))
            self.check_refs(base=view.get("base"), apps=view.get("apps"))
            add.append(_scope_target(catalog, "endpoint", view["endpoint"],
                                     [view["endpoint"]], base=view.get("base"),
                                     apps=view.get("apps"), drivers=None,
                                     operation=signed_op, seq=seq))
        return self.publish(add=add)

    # -- keys and expiry ---------------------------------------------------------------------
    def rotate(self, role: str) -> dict:
        """A new key for `role` (root, targets or online), published in the next root."""
        trusted = self.trusted()
        root_signer = self.keys.signer(ROOT_KEY)
        now = self._clock()
        if role == "online":
            key = _key(self.api.post("/signing/online-key", {"rotate": True}))
            root_bytes = sign(next_root(trusted.root, now, {"snapshot": key,
                                                            "timestamp": key}), root_signer)
            self.api.post("/signing/root", {"root": root_bytes.decode()})
            return {"role": role, "key": key.keyid}
        if role not in ("root", "targets"):
            raise SigningError("rotate --role root, targets or online")
        new = generate()
        new_path = self.keys.directory / f"{role}.key.new"
        save_private(new_path, new, self.keys.passphrase, replace=True)
        try:
            md = next_root(trusted.root, now, {role: new.public_key})
            body = {"root": (sign(md, root_signer, new) if role == "root"
                             else sign(md, root_signer)).decode()}
            if role == "targets":
                body["targets"] = sign(next_targets(trusted.targets, now), new).decode()
            self.api.post("/signing/root", body)
        except BaseException:
            new_path.unlink(missing_ok=True)
            raise
        os.replace(new_path, self.keys.directory / f"{role}.key")
        self._trusted = None
        self._targets_signer = None
        return {"role": role, "key": new.public_key.keyid,
                "fingerprint": root_fingerprint(md.signed)}

    def renew(self) -> dict:
        """Push the expiry out: a new targets version always, and a new root version when
        the root expires within ROOT_RENEW_BEFORE (if root.key is here)."""
        trusted = self.trusted()
        out: dict = {"targets_version": self.publish()}
        if trusted.root.expires - self._clock() < ROOT_RENEW_BEFORE:
            if not (self.keys.directory / ROOT_KEY).exists():
                out["root"] = f"expires {trusted.root.expires:%Y-%m-%d}: renew it with " \
                              f"{ROOT_KEY} (not in {self.keys.directory})"
            else:
                md = next_root(self.trusted().root, self._clock(), {})
                self.api.post("/signing/root", {"root": sign(md, self.keys.signer(ROOT_KEY))
                                                .decode()})
                out["root_version"] = md.signed.version
        return out


def _key(doc: dict) -> SSlibKey:
    try:
        return SSlibKey.from_dict(doc["keyid"], dict(doc["key"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SigningError(f"the server sent no usable online key ({exc})") from None


def _scope_target(catalog: SignedCatalog, scope: str, name: str, members: list[str] | None, *,
                  base: str | None, apps: list[str] | None, drivers: list[str] | None,
                  operation: SignedOperation | None, seq: int) -> TargetFile:
    """One scope's signed assignment: the fields given replace the scope's earlier ones,
    the others stay; a one-off operation is dropped unless this assignment is one."""
    prev = catalog.assignments.get(assignment_path(scope, name))
    return assignment_target(SignedAssignment(
        scope=scope, name=name, members=sorted(members) if members is not None else None,
        base=base if base is not None else (prev.base if prev else None),
        apps=apps if apps is not None else (prev.apps if prev else None),
        drivers=drivers if drivers is not None else (prev.drivers if prev else None),
        operation=operation, seq=seq))


def _path(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe=":")


def _decompress(packed: bytes) -> bytes:
    try:
        return zstandard.ZstdDecompressor().stream_reader(packed).read(MAX_MANIFEST)
    except zstandard.ZstdError as exc:
        raise SigningError(f"the server sent a manifest that does not decompress ({exc})") \
            from None


def _check_subset(ref: str, stored: bytes, uploaded: bytes) -> None:
    mine = {msgpack.packb(encode_entry(e)) for e in decode_manifest([uploaded])}
    for e in decode_manifest([stored]):
        if msgpack.packb(encode_entry(e)) not in mine:
            raise SigningError(f"the server's layer {ref} has an entry this capture did not "
                               f"upload ({e.path!r}): not signing it")
