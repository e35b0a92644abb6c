"""Signed layers, without a server process: the server's metadata repository, the image
manager's publisher and the agent's verifier (python-tuf underneath), and the policy an
agent applies to a desired state. Every attack is refused with a sentence that says what
is wrong: a forged manifest, a layer nobody signed, replayed or rolled-back metadata,
stale metadata (a freeze, with an injected clock), metadata edited on the server's disk,
metadata signed by the wrong key; and key rotations the agent follows on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from strata.errors import CorruptData
from strata.model.wire import DesiredLayer, DesiredState
from strata.signing import LayerRefused, SigningError
from strata.signing.catalog import (
    ManifestDigest,
    SignedAssignment,
    SignedCatalog,
    SignedLayer,
    SignedOperation,
    assignment_target,
    layer_target,
)
from strata.signing.keys import ROOT_KEY, TARGETS_KEY, generate, load_private, save_private
from strata.signing.metadata import TARGETS_LIFETIME, next_targets, sign
from strata.signing.policy import AppliedLayer, TrustRecord, approve
from strata.signing.publisher import Keys, Publisher, initialize
from strata.signing.repository import MetadataRefused, SigningRepository
from strata.signing.trust import MetadataMissing, pin_root, refresh
from strata.store.crypto import unwrap_secret, wrap_secret

PASS = b"correct horse battery"
ENDPOINT = "0b5e3c1a-0000-4000-8000-000000000001"
OTHER = "0b5e3c1a-0000-4000-8000-000000000002"


class Clock:
    """The server's clock, moved by the test (no sleeps)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class RepositoryApi:
    """The admin API's signing routes, straight onto the repository (what the server's
    routes do, minus HTTP)."""

    def __init__(self, repo: SigningRepository):
        self.repo = repo

    def get(self, path: str) -> dict:
        assert path == "/signing", path
        return self.repo.status()

    def get_bytes(self, path: str) -> bytes:
        data = self.repo.read(path.rsplit("/", 1)[-1])
        if data is None:
            raise MetadataMissing(path)
        return data

    def post(self, path: str, body: dict) -> dict:
        if path == "/signing/online-key":
            key = self.repo.online_key(rotate=bool(body.get("rotate")))
            return {"keyid": key.keyid, "key": key.to_dict()}
        if path == "/signing/init":
            self.repo.initialize(body["root"].encode(), body["targets"].encode())
        elif path == "/signing/targets":
            self.repo.publish_targets(body["targets"].encode())
        elif path == "/signing/root":
            self.repo.publish_root(body["root"].encode(),
                                   body["targets"].encode() if body.get("targets") else None)
        else:
            raise AssertionError(path)
        return {}


@dataclass
class World:
    repo: SigningRepository
    clock: Clock
    api: RepositoryApi
    keys: Keys
    agent_dir: Path

    def publisher(self) -> Publisher:
        return Publisher(self.api, self.keys, now=self.clock.now)

    def fetch(self, name: str) -> bytes:
        data = self.repo.read(name)
        if data is None:
            raise MetadataMissing(name)
        return data

    def agent_refresh(self, directory: Path | None = None) -> SignedCatalog:
        return refresh(directory or self.agent_dir, self.fetch).catalog

    def targets_file(self) -> Path:
        snap = json.loads(self.repo.read(
            f"{json.loads(self.repo.read('timestamp.json'))['signed']['meta']['snapshot.json']['version']}.snapshot.json"))
        return self.repo.meta / f"{snap['signed']['meta']['targets.json']['version']}.targets.json"


@pytest.fixture()
def world(tmp_path: Path) -> World:
    clock = Clock()
    repo = SigningRepository(tmp_path / "server" / "signing", clock=clock)
    api = RepositoryApi(repo)
    keys = Keys(tmp_path / "keys", PASS)
    out = initialize(api, keys, now=clock.now)
    agent_dir = tmp_path / "agent" / "trust"
    assert pin_root(agent_dir, repo.read("root.json"), out["fingerprint"]) == out["fingerprint"]
    return World(repo, clock, api, keys, agent_dir)


def layer(name: str = "corp", version: str = "1", kind: str = "base", serial: int = 1,
          data: bytes = b"manifest v1", **extra: object) -> SignedLayer:
    return SignedLayer(kind=kind, name=name, version=version, serial=serial,
                       manifest=ManifestDigest.of(data), **extra)


def desired(*layers: DesiredLayer, operation: str = "update",
            owned: list[DesiredLayer] | None = None) -> DesiredState:
    return DesiredState(key="k", layers=list(layers), owned=owned, operation=operation)


def dl(name: str = "corp", version: str = "1", kind: str = "base",
       removes: list[str] | None = None) -> DesiredLayer:
    return DesiredLayer(id=1, kind=kind, name=name, version=version, snapshot="ab" * 32,
                        removes=removes or [])


def catalog(*targets: SignedLayer | SignedAssignment, version: int = 9) -> SignedCatalog:
    from tuf.api.metadata import Targets

    t = Targets(version=version)
    for x in targets:
        tf = layer_target(x) if isinstance(x, SignedLayer) else assignment_target(x)
        t.targets[tf.path] = tf
    return SignedCatalog.from_targets(t)


def assigned_all(*refs: str, seq: int = 2) -> SignedAssignment:
    return SignedAssignment(scope="all", base=refs[0] if refs else None,
                            apps=list(refs[1:]) or None, seq=seq)


# -- keys ------------------------------------------------------------------------------------

def test_private_keys_are_encrypted_and_owner_only(world):
    for name in (ROOT_KEY, TARGETS_KEY):
        path = world.keys.directory / name
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert json.loads(path.read_bytes())["kdf"] == "scrypt"  # not the key in the clear
        with pytest.raises(SigningError, match="wrong passphrase"):
            load_private(path, b"not the passphrase")
    online = world.repo.path / "online.key"
    assert os.stat(online).st_mode & 0o777 == 0o600
    assert os.stat(world.repo.path).st_mode & 0o777 == 0o700


def test_init_twice_is_refused_and_keys_are_never_overwritten(world, tmp_path):
    with pytest.raises(SigningError, match="already set up"):
        initialize(world.api, Keys(tmp_path / "other-keys", PASS))
    signer = generate()
    with pytest.raises(SigningError, match="refusing to overwrite"):
        save_private(world.keys.directory / TARGETS_KEY, signer, PASS)


# -- the agent's view through python-tuf -------------------------------------------------------

def test_agent_sees_a_signed_layer_and_assignment(world):
    pub = world.publisher()
    v = pub.publish(add=[layer_target(layer(serial=2)), assignment_target(assigned_all("corp:1"))])
    cat = world.agent_refresh()
    assert cat.version == v and set(cat.layers) == {"corp:1"}
    approval = approve(desired(dl()), cat, ENDPOINT, {}, TrustRecord())
    approval.verify_manifest(dl(), b"manifest v1")  # the genuine bytes pass


def test_forged_manifest_is_refused(world):
    world.publisher().publish(add=[layer_target(layer()),
                                   assignment_target(assigned_all("corp:1"))])
    approval = approve(desired(dl()), world.agent_refresh(), ENDPOINT, {}, TrustRecord())
    for forged in (b"manifest v2", b"manifest v1 plus a backdoor", b""):
        with pytest.raises(LayerRefused, match="does not match its signature"):
            approval.verify_manifest(dl(), forged)


def test_replayed_older_targets_metadata_is_refused(world):
    pub = world.publisher()
    pub.publish(add=[layer_target(layer())])
    old_files = {p.name: p.read_bytes() for p in world.repo.meta.iterdir()}
    pub.publish(add=[layer_target(layer(version="2", serial=3, data=b"manifest v2"))])
    assert "corp:2" in world.agent_refresh().layers
    # The server (or a man in the middle) serves yesterday's metadata again.
    for name, data in old_files.items():
        (world.repo.meta / name).write_bytes(data)
    with pytest.raises(LayerRefused, match="older layer metadata|rollback"):
        world.agent_refresh()


def test_a_dishonest_server_cannot_roll_targets_back_with_its_own_key(world):
    """The server holds the snapshot key: it re-signs a snapshot naming an older targets
    version. python-tuf refuses it (versions never go back)."""
    from tuf.api.metadata import Metadata

    pub = world.publisher()
    pub.publish(add=[layer_target(layer())])
    first = world.repo._latest("targets")
    pub.publish(add=[layer_target(layer(version="2", serial=3, data=b"v2"))])
    world.agent_refresh()
    online = load_private(world.repo.path / "online.key", None)
    snap_path = world.repo.meta / f"{world.repo._latest('snapshot')}.snapshot.json"
    md = Metadata.from_bytes(snap_path.read_bytes())
    md.signed.meta["targets.json"].version = first
    md.signed.version += 1
    md.sign(online)
    (world.repo.meta / f"{md.signed.version}.snapshot.json").write_bytes(md.to_bytes())
    ts = Metadata.from_bytes((world.repo.meta / "timestamp.json").read_bytes())
    ts.signed.snapshot_meta.version = md.signed.version
    ts.signed.version += 1
    ts.sign(online)
    (world.repo.meta / "timestamp.json").write_bytes(ts.to_bytes())
    with pytest.raises(LayerRefused, match="rollback"):
        world.agent_refresh()


def test_stale_metadata_is_refused_freeze_bounded_by_targets_expiry(world):
    """A stolen online key keeps timestamp and snapshot fresh, but cannot renew targets:
    once they expire, the agent accepts nothing new."""
    pub = world.publisher()
    world.clock.now -= TARGETS_LIFETIME + timedelta(days=1)  # signed 31 days ago
    pub.now = world.clock.now
    pub.publish(add=[layer_target(layer())])
    world.clock.now = datetime.now(UTC)  # today: the server re-signs what it can
    assert world.repo.refresh()
    with pytest.raises(LayerRefused, match="stale.*targets"):
        world.agent_refresh()


def test_stale_timestamp_is_refused(world):
    """A server (or network attacker) that stops the clock: yesterday's timestamp."""
    world.clock.now -= timedelta(days=2)
    pub = world.publisher()
    pub.now = world.clock.now
    pub.publish(add=[layer_target(layer())])
    with pytest.raises(LayerRefused, match="stale.*timestamp"):
        world.agent_refresh()


def test_server_renews_timestamp_and_snapshot_before_they_expire(world):
    world.agent_refresh()
    ts0 = json.loads(world.repo.read("timestamp.json"))["signed"]["version"]
    world.clock.now += timedelta(hours=13)
    assert json.loads(world.repo.read("timestamp.json"))["signed"]["version"] == ts0 + 1
    world.clock.now += timedelta(days=4)
    assert world.repo.refresh()  # snapshot past half its life: both re-signed
    assert not world.repo.refresh()  # and then fresh
    world.agent_refresh()


def test_metadata_edited_on_the_server_disk_is_refused(world):
    pub = world.publisher()
    pub.publish(add=[layer_target(layer()), assignment_target(assigned_all("corp:1"))])
    path = world.targets_file()
    doc = json.loads(path.read_bytes())
    target = doc["signed"]["targets"]["layers/corp/1"]
    target["hashes"]["sha256"] = "0" * 64  # point the signed layer at other bytes
    target["custom"]["strata"]["removes"] = ["etc/passwd"]
    path.write_text(json.dumps(doc))
    with pytest.raises(LayerRefused, match="does not verify"):
        world.agent_refresh()
    assert "does not verify" in world.repo.status()["problem"]  # the server notices too


def test_targets_signed_by_the_wrong_key_are_refused(world):
    stranger = generate()
    trusted = world.publisher().trusted()
    data = sign(next_targets(trusted.targets, world.clock.now,
                             add=[layer_target(layer(data=b"evil"))]), stranger)
    with pytest.raises(MetadataRefused, match="not signed by the targets key"):
        world.repo.publish_targets(data)
    # Written over the published file behind the server's back (a compromised server):
    # agents refuse it.
    md = next_targets(trusted.targets, world.clock.now, add=[layer_target(layer(data=b"evil"))])
    md.signed.version = trusted.targets.version
    world.targets_file().write_bytes(sign(md, stranger))
    with pytest.raises(LayerRefused, match="does not verify"):
        world.agent_refresh()


def test_upload_going_back_or_expired_is_refused(world):
    trusted = world.publisher().trusted()
    signer = world.keys.signer(TARGETS_KEY)
    md = next_targets(trusted.targets, world.clock.now)
    md.signed.version = trusted.targets.version  # not newer
    with pytest.raises(MetadataRefused, match="not newer"):
        world.repo.publish_targets(sign(md, signer))
    md = next_targets(trusted.targets, world.clock.now - TARGETS_LIFETIME * 2)
    with pytest.raises(MetadataRefused, match="expired"):
        world.repo.publish_targets(sign(md, signer))
    md = next_targets(trusted.targets, world.clock.now)
    md.signed.targets["layers/x/1"] = layer_target(layer("y"))  # path says x, doc says y
    with pytest.raises(MetadataRefused, match="describes layer y:1"):
        world.repo.publish_targets(sign(md, signer))


def test_root_rotation_is_followed_by_the_agent(world, tmp_path):
    pub = world.publisher()
    pub.publish(add=[layer_target(layer())])
    world.agent_refresh()
    old_targets = world.keys.signer(TARGETS_KEY)
    out = pub.rotate("targets")
    assert world.keys.signer(TARGETS_KEY).public_key.keyid == out["key"]
    pub.rotate("root")
    pub.rotate("online")
    pub.publish(add=[layer_target(layer(version="2", serial=8, data=b"v2"))])
    cat = world.agent_refresh()  # pinned on root v1, walks to v4 by itself
    assert {"corp:1", "corp:2"} <= set(cat.layers)
    # A fresh agent pinned on today's root agrees.
    fresh = tmp_path / "fresh"
    pin_root(fresh, world.repo.read("root.json"))
    assert set(world.agent_refresh(fresh).layers) == set(cat.layers)
    # The retired targets key no longer signs anything the server or agents accept.
    md = next_targets(pub.trusted().targets, world.clock.now,
                      add=[layer_target(layer("evil", data=b"x"))])
    with pytest.raises(MetadataRefused, match="not signed by the targets key"):
        world.repo.publish_targets(sign(md, old_targets))


def test_root_rotation_not_signed_by_the_current_root_is_refused(world):
    from strata.signing.metadata import next_root

    trusted = world.publisher().trusted()
    thief = generate()  # someone with the online key or admin access, not the root key
    md = next_root(trusted.root, world.clock.now, {"root": thief.public_key,
                                                   "targets": thief.public_key})
    with pytest.raises(MetadataRefused, match="current root's key"):
        world.repo.publish_root(sign(md, thief))


def test_pinning_checks_the_fingerprint(world, tmp_path):
    with pytest.raises(LayerRefused, match="fingerprint"):
        pin_root(tmp_path / "a", world.repo.read("root.json"), "ab" * 32)
    with pytest.raises(LayerRefused, match="not valid root metadata"):
        pin_root(tmp_path / "b", world.repo.read(f"{world.repo._latest('targets')}.targets.json"))


def test_agent_without_pinned_root_refuses(world, tmp_path):
    with pytest.raises(LayerRefused, match="no pinned signing root"):
        world.agent_refresh(tmp_path / "never-pinned")


# -- the policy: what a verified catalog lets the server do --------------------------------

def test_unsigned_layer_is_refused():
    cat = catalog(layer(), assigned_all("corp:1"))
    with pytest.raises(LayerRefused, match="not signed"):
        approve(desired(dl(version="2")), cat, ENDPOINT, {}, TrustRecord())


def test_layer_differing_from_its_signed_description_is_refused():
    cat = catalog(layer(kind="app", removes=["usr/bin/old"]),
                  SignedAssignment(scope="all", apps=["corp:1"], seq=2))
    approve(desired(dl(kind="app", removes=["usr/bin/old"])), cat, ENDPOINT, {}, TrustRecord())
    with pytest.raises(LayerRefused, match="removed paths"):
        approve(desired(dl(kind="app", removes=["home/alice"])), cat, ENDPOINT, {},
                TrustRecord())
    with pytest.raises(LayerRefused, match="kind"):
        approve(desired(dl(kind="base", removes=["usr/bin/old"])), cat, ENDPOINT, {},
                TrustRecord())


def test_signed_layer_not_assigned_to_this_endpoint_is_refused():
    cat = catalog(layer(), layer("finance-app", kind="app"),
                  SignedAssignment(scope="endpoint", name=OTHER, members=[OTHER],
                                   apps=["finance-app:1"], seq=3),
                  SignedAssignment(scope="collection", name="finance", members=[OTHER],
                                   base="corp:1", seq=4))
    for want in (dl(), dl("finance-app", kind="app")):
        with pytest.raises(LayerRefused, match="not assigned to this endpoint"):
            approve(desired(want), cat, ENDPOINT, {}, TrustRecord())
    approve(desired(dl(), dl("finance-app", kind="app")), cat, OTHER, {}, TrustRecord())


def test_driver_layer_by_signed_hardware_match():
    cat = catalog(layer("dell", kind="driver", match={"vendor": "Dell*"}))
    want = desired(dl("dell", kind="driver"))
    approve(want, cat, ENDPOINT, {"vendor": "Dell Inc.", "model": "x"}, TrustRecord())
    with pytest.raises(LayerRefused, match="not assigned"):
        approve(want, cat, ENDPOINT, {"vendor": "Lenovo", "model": "x"}, TrustRecord())


@pytest.mark.parametrize(("applied_seq", "listing_seq", "refused"), [
    (5, 5, True),  # the old assignment that named v1, still lying around: refused
    (5, 3, True),  # an even older one
    (5, 6, False),  # IT signed an assignment back to v1 after v2 was applied
])
def test_rollback_to_an_older_version(applied_seq, listing_seq, refused):
    cat = catalog(layer(serial=2), layer(version="2", serial=4, data=b"v2"),
                  assigned_all("corp:1", seq=listing_seq))
    record = TrustRecord(layers={"corp": AppliedLayer(version="2", serial=4, seq=applied_seq)})
    if refused:
        with pytest.raises(LayerRefused, match="older than corp:2.*rollback"):
            approve(desired(dl()), cat, ENDPOINT, {}, record)
    else:
        after = approve(desired(dl()), cat, ENDPOINT, {}, record).after
        assert after.layers["corp"] == AppliedLayer(version="1", serial=2, seq=listing_seq)


def test_rollback_of_a_driver_chosen_by_hardware_is_refused():
    cat = catalog(layer("dell", "1", kind="driver", serial=2, match={"vendor": "Dell*"}),
                  layer("dell", "2", kind="driver", serial=3, match={"vendor": "Dell*"},
                        data=b"v2"))
    record = TrustRecord(layers={"dell": AppliedLayer(version="2", serial=3, seq=0)})
    with pytest.raises(LayerRefused, match="older"):
        approve(desired(dl("dell", "1", kind="driver")), cat, ENDPOINT, {"vendor": "Dell"},
                record)


REVERT_SNAPSHOT = "cd" * 32


def revert_doc(seq: int = 7, manifest: bytes = b"snapshot manifest") -> SignedAssignment:
    return SignedAssignment(scope="endpoint", name=ENDPOINT, members=[ENDPOINT],
                            base="corp:1", seq=seq, operation=SignedOperation(
                                kind="revert", snapshot=REVERT_SNAPSHOT,
                                manifest=ManifestDigest.of(manifest)))


def revert_state() -> DesiredState:
    snap = DesiredLayer(id=None, kind="snapshot", name="snapshot", version="cdcdcdcd",
                        snapshot=REVERT_SNAPSHOT)
    return desired(snap, operation="revert", owned=[dl()])


def test_signed_revert_is_accepted_once_and_its_snapshot_checked():
    cat = catalog(layer(serial=2), layer(version="2", serial=4, data=b"v2"), revert_doc())
    record = TrustRecord(layers={"corp": AppliedLayer(version="2", serial=4, seq=5)})
    approval = approve(revert_state(), cat, ENDPOINT, {}, record)
    snap = revert_state().layers[0]
    approval.verify_manifest(snap, b"snapshot manifest")
    with pytest.raises(LayerRefused, match="does not match its signature"):
        approval.verify_manifest(snap, b"a snapshot the server made up")
    assert approval.after.operation_seq == 7
    with pytest.raises(LayerRefused, match="replay"):
        approve(revert_state(), cat, ENDPOINT, {}, approval.after)


def test_unsigned_or_altered_operation_is_refused():
    cat = catalog(layer(serial=2), assigned_all("corp:1"))
    with pytest.raises(LayerRefused, match="revert of this endpoint is not signed"):
        approve(revert_state(), cat, ENDPOINT, {}, TrustRecord())
    cat = catalog(layer(serial=2), revert_doc())
    other = revert_state()
    other.layers[0].snapshot = "ef" * 32
    with pytest.raises(LayerRefused, match="differs from the one signed"):
        approve(other, cat, ENDPOINT, {}, TrustRecord())
    with pytest.raises(LayerRefused, match="keep user apps"):
        approve(revert_state().model_copy(update={"keep_user_apps": True}), cat, ENDPOINT,
                {}, TrustRecord())


def test_malformed_targets_are_refused():
    from tuf.api.metadata import TargetFile, Targets

    t = Targets(version=2)
    t.targets["layers/corp/1"] = TargetFile(length=1, hashes={"sha256": "00" * 32},
                                            path="layers/corp/1",
                                            unrecognized_fields={"custom": {"strata": {
                                                "kind": "rootkit", "name": "corp",
                                                "version": "1", "serial": 1}}})
    with pytest.raises(SigningError, match="kind must be one of"):
        SignedCatalog.from_targets(t)
    t.targets = {"elsewhere/x": TargetFile(length=1, hashes={"sha256": "00" * 32},
                                           path="elsewhere/x")}
    with pytest.raises(SigningError, match="unknown target"):
        SignedCatalog.from_targets(t)


def test_pinning_another_root_forgets_what_the_old_one_vouched_for(world, tmp_path):
    """An agent moved to another server (or IT starting over): serials and versions
    recorded under the old root mean nothing under the new one, and are dropped; pinning
    the same root again keeps them."""
    from strata.agent.signing import RECORD, TRUST_DIR, load_record, pin, save_record
    from strata.agent.state import AgentState

    state = AgentState(tmp_path / "agent-state")
    pin(state, world.repo.read("root.json"))
    refresh(state.path / TRUST_DIR, world.fetch)
    record = TrustRecord(layers={"corp": AppliedLayer(version="9", serial=9, seq=9)})
    save_record(state, record)
    pin(state, world.repo.read("root.json"))
    assert load_record(state) == record
    other = SigningRepository(tmp_path / "other", clock=world.clock)
    initialize(RepositoryApi(other), Keys(tmp_path / "other-keys", PASS))
    pin(state, other.read("root.json"))
    assert load_record(state) == TrustRecord() and not (state.path / RECORD).exists()
    assert not (state.path / TRUST_DIR / "metadata").exists()


def test_new_key_files_take_the_full_scrypt_cost():
    """The suite derives keys at a test cost (tests/cost_factors.py); the product's own, as a
    fresh interpreter has it, is scrypt N=2^15, r=8."""
    code = ("import json; from strata.store import crypto; "
            "print(json.dumps(crypto.wrap_secret(b'k' * 32, 'pass', b'purpose')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    doc = json.loads(out.stdout)
    assert (doc["kdf"], doc["n"], doc["r"], doc["p"]) == ("scrypt", 1 << 15, 8, 1)
    assert unwrap_secret(doc, "pass", b"purpose") == b"k" * 32


@pytest.mark.parametrize("n, r, p", [(1 << 22, 8, 1), (1 << 20, 32, 1), (3, 8, 1),
                                     (1 << 10, 1 << 20, 1), (1 << 10, 8, 0), (1 << 10, 8, 17),
                                     (1 << 10, 0, 1)])
def test_a_key_file_asking_an_absurd_scrypt_cost_is_refused_not_computed(n, r, p):
    doc = wrap_secret(b"k" * 32, "pass", b"purpose")
    doc.update(n=n, r=r, p=p)
    with pytest.raises(CorruptData, match="out of bounds"):
        unwrap_secret(doc, "pass", b"purpose")
