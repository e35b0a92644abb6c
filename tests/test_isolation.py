"""Each endpoint reaches only its own data: proof of possession and no dedup oracle.

An attacker holds one enrolled endpoint and knows the ids (BLAKE3) of another endpoint's
chunks, or can guess small files of it. These tests try what the attacker would: commit
a snapshot naming a chunk it never had, ask "missing?" about guesses, read duplicate
counts and 409 lists. In-process (FastAPI's test client) on a real store and catalog.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.possession import encode_proofs, proof
from strata.model.transfer import BundleWriter
from strata.server.app import create_app
from strata.server.catalog.models import Assignment
from strata.server.context import ServerContext, ServerSettings
from strata.server.holdings import COMMON_HOLDERS, Holdings
from strata.server.maintenance import run_maintenance
from strata.server.rate_limit import ConcurrencyLimit, RateLimiter, TooManyRequests
from strata.server.services.layers import save_layer
from strata.store.crypto import PlainCipher
from strata.store.pack import BlobCodec

CODEC = BlobCodec(PlainCipher(), 3)
API = "/api/v1/agent"


@pytest.fixture()
def server(tmp_path: Path, catalogs) -> Iterator[SimpleNamespace]:
    """On both catalogs: with PostgreSQL the holdings are its tables (server/holdings_pg.py),
    shared by every server process, and must refuse what the SQLite file refuses."""
    app = create_app(ServerSettings(data_dir=tmp_path / "data", catalog_url=catalogs.new()))
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as admin:
        admin.headers["Authorization"] = f"Bearer {token}"
        yield SimpleNamespace(app=app, ctx=app.state.ctx, admin=admin)


class Device:
    """One enrolled endpoint speaking the agent API."""

    def __init__(self, server: SimpleNamespace, hostname: str, previous: str = ""):
        tok = server.admin.post("/api/v1/admin/tokens", json={"uses": 1}).json()["token"]
        self.http = TestClient(server.app)
        resp = self.http.post(f"{API}/enroll", json={"token": tok, "hostname": hostname,
                                                     "os": "debian",
                                                     "previous_credential": previous})
        assert resp.status_code == 200, resp.text
        self.id = resp.json()["endpoint_id"]
        self.credential = resp.json()["credential"]
        self.http.headers["Authorization"] = f"Bearer {self.credential}"

    def missing(self, *chunks: bytes) -> dict:
        resp = self.http.post(f"{API}/chunks/missing",
                              json={"ids": [content_id(c).hex() for c in chunks]})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def upload(self, *chunks: bytes) -> dict:
        w = BundleWriter()
        for data in chunks:
            w.add(content_id(data), len(data), CODEC.compress(data))
        resp = self.http.post(f"{API}/chunks", content=w.getvalue(),
                              headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def prove(self, nonce: str, *chunks: bytes, lie: bool = False) -> dict:
        proofs = [(content_id(c), proof(nonce, c + (b"x" if lie else b""))) for c in chunks]
        resp = self.http.post(f"{API}/chunks/prove", content=encode_proofs(nonce, proofs))
        assert resp.status_code == 200, resp.text
        return resp.json()

    def commit(self, files: dict[str, bytes], *, upload_manifest: bool = True):
        """Commit a snapshot of `files` (path -> one chunk of content); the manifest's
        own chunk is uploaded first, as the agent does."""
        entries = [Entry(path=p.encode(), type=EntryType.FILE, size=len(d),
                         chunks=[(content_id(d), len(d))]) for p, d in sorted(files.items())]
        manifest = b"".join(encode_manifest(entries))
        if upload_manifest:
            self.upload(manifest)
        return self.http.post(f"{API}/snapshots", json={
            "manifest": [(content_id(manifest).hex(), len(manifest))],
            "manifest_id": content_id(manifest).hex(), "kind": "centralize"})


def secret(seed: int, size: int = 40_000) -> bytes:
    return random.Random(seed).randbytes(size)


def test_a_chunk_known_only_by_its_hash_cannot_be_committed_or_read_back(server):
    """Theft by hash: A names B's chunk in a commit; refused, and A gets nothing."""
    alice, bob = Device(server, "alice"), Device(server, "bob")
    bobs = secret(1)
    bob.upload(bobs)
    assert bob.commit({"home/bob/salary.txt": bobs}).status_code == 200

    resp = alice.commit({"home/alice/stolen.txt": bobs})
    assert resp.status_code == 409, resp.text
    assert resp.json()["missing"] == [content_id(bobs).hex()]
    assert [s["id"] for s in alice.http.get(f"{API}/snapshots").json()] == []
    # The attempt is audited under the endpoint's name.
    log = server.admin.get("/api/v1/admin/audit").json()
    assert any(e["action"] == "possession-refused" and alice.id in e["actor"] for e in log)
    # With the bytes, A proves possession by sending them: then the commit is accepted.
    alice.upload(bobs)
    assert alice.commit({"home/alice/stolen.txt": bobs}).status_code == 200


def test_missing_answers_reveal_nothing_about_other_endpoints_user_data(server):
    """Dedup oracle: A's guesses at B's file read exactly like guesses nobody holds."""
    alice, bob = Device(server, "alice"), Device(server, "bob")
    template = b"salary=%06d\n" + b"employee record, confidential\n" * 20
    bobs = template % 123_456
    bob.upload(bobs)
    assert bob.commit({"home/bob/salary.txt": bobs}).status_code == 200
    guesses = [template % n for n in range(123_400, 123_500)]
    answer = alice.missing(*guesses)
    assert answer["missing"] == [content_id(g).hex() for g in guesses]  # all, B's included
    assert answer["prove"] == [] and answer["nonce"] == ""
    # Uploading the right guess reads like uploading a wrong one: no duplicate count.
    right, wrong = alice.upload(bobs), alice.upload(template % 1)
    for answer, data in ((right, bobs), (wrong, template % 1)):
        assert answer == {"chunks": 1, "stored": 1, "duplicates": 0,
                          "bytes_stored": len(CODEC.compress(data))}
    # ... and a commit's 409 names only what A itself lacks, never fewer for B's chunks.
    resp = alice.commit({"home/a/1": template % 2, "home/a/2": template % 123_456,
                         "home/a/3": template % 3})
    assert resp.status_code == 409
    assert set(resp.json()["missing"]) == {content_id(template % n).hex() for n in (2, 3)}
    # B's own view is unchanged: it holds its chunk.
    assert bob.missing(bobs)["missing"] == []


def test_a_repeated_upload_by_the_same_endpoint_counts_as_a_duplicate(server):
    alice = Device(server, "alice")
    data = secret(5)
    assert alice.upload(data)["stored"] == 1
    assert alice.upload(data)["duplicates"] == 1
    assert alice.missing(data)["missing"] == []


def test_software_chunks_are_proven_by_a_keyed_hash_not_sent(server):
    """An OS file another endpoint committed under usr/ is shared: the next endpoint
    proves it has the bytes (32 bytes) instead of sending them, and cannot without them."""
    first, second = Device(server, "first"), Device(server, "second")
    libc = secret(7, 200_000)
    first.upload(libc)
    assert first.commit({"usr/lib/libc.so.6": libc}).status_code == 200

    answer = second.missing(libc)
    assert answer["missing"] == [] and answer["prove"] == [content_id(libc).hex()]
    # Without proving, the commit is refused (the id alone is not possession).
    assert second.commit({"usr/lib/libc.so.6": libc}).status_code == 409
    # A wrong proof, or one under another endpoint's nonce, is refused.
    assert second.prove(answer["nonce"], libc, lie=True) == {
        "accepted": 0, "refused": [content_id(libc).hex()]}
    theirs = first.missing(secret(8))  # first holds nothing to prove: mint one for it
    other_nonce = server.ctx.possession.mint(first.id)
    assert theirs["nonce"] == ""
    resp = second.http.post(f"{API}/chunks/prove", content=encode_proofs(
        other_nonce, [(content_id(libc), proof(other_nonce, libc))]))
    assert resp.status_code == 422
    assert second.http.post(f"{API}/chunks/prove", content=b"STRPROV1\xff").status_code == 422
    # The right proof: held from now on, and the commit goes through.
    assert second.prove(answer["nonce"], libc) == {"accepted": 1, "refused": []}
    assert second.missing(libc) == {"missing": [], "prove": [], "nonce": ""}
    assert second.commit({"usr/lib/libc.so.6": libc}).status_code == 200


def test_configuration_and_user_data_are_never_shared_by_path(server):
    first, second = Device(server, "first"), Device(server, "second")
    files = {"etc/wpa_supplicant.conf": b"psk=hunter2\n" * 10, "home/u/notes": secret(9),
             "var/lib/db/table": secret(10), "usr/bin/tool": secret(11)}
    first.upload(*files.values())
    assert first.commit(files).status_code == 200
    answer = second.missing(*files.values())
    assert answer["prove"] == [content_id(files["usr/bin/tool"]).hex()]
    assert len(answer["missing"]) == 3


def test_a_chunk_held_by_enough_endpoints_is_shared(server):
    """Common documents in home folders: once COMMON_HOLDERS endpoints hold them, they
    are no one endpoint's secret, and the next endpoint proves instead of sending."""
    doc = secret(12)
    devices = [Device(server, f"ep{i}") for i in range(COMMON_HOLDERS + 1)]
    for dev in devices[:COMMON_HOLDERS]:  # fewer holders: it reads as missing, so it is sent
        assert dev.missing(doc) == {"missing": [content_id(doc).hex()], "prove": [],
                                    "nonce": ""}
        dev.upload(doc)
    assert devices[-1].missing(doc)["prove"] == [content_id(doc).hex()]


def test_queries_are_rate_limited_per_endpoint(server):
    ctx: ServerContext = server.ctx
    ctx.id_queries = RateLimiter(rate=1.0, burst=150, clock=lambda: 0.0)
    alice, bob = Device(server, "alice"), Device(server, "bob")
    guesses = [secret(100 + i, 64) for i in range(100)]
    alice.missing(*guesses)
    resp = alice.http.post(f"{API}/chunks/missing",
                           json={"ids": [content_id(g).hex() for g in guesses]})
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 50
    assert "too many chunk queries" in resp.json()["detail"]
    assert len(bob.missing(*guesses)["missing"]) == 100  # another endpoint's own budget
    for _ in range(3):  # refused again and again: audited once
        assert alice.http.post(f"{API}/chunks/missing", json={
            "ids": [content_id(g).hex() for g in guesses]}).status_code == 429
    log = server.admin.get("/api/v1/admin/audit").json()
    assert [e["actor"] for e in log if e["action"] == "rate-limited"] == [
        f"endpoint:{alice.id}"]


def test_uploads_in_flight_are_capped_per_endpoint():
    slots = ConcurrencyLimit(2)
    with slots.slot("a", "uploads"), slots.slot("a", "uploads"):
        with pytest.raises(TooManyRequests, match="at most 2 uploads"):
            with slots.slot("a", "uploads"):
                pass
        with slots.slot("b", "uploads"):  # others are not held up
            pass
    with slots.slot("a", "uploads"):  # released again
        pass


def test_a_commit_naming_another_endpoints_chunk_as_its_manifest_reads_as_missing(server):
    """The manifest's own chunks are checked before they are read: how a commit fails
    must not tell whether a guessed chunk exists."""
    alice, bob = Device(server, "alice"), Device(server, "bob")
    bobs = secret(20)
    bob.upload(bobs)
    assert bob.commit({"home/bob/x": bobs}).status_code == 200
    for guess in (bobs, secret(21)):
        resp = alice.http.post(f"{API}/snapshots", json={
            "manifest": [(content_id(guess).hex(), len(guess))],
            "manifest_id": content_id(guess).hex()})
        assert resp.status_code == 409 and resp.json()["missing"] == [content_id(guess).hex()]


def test_holdings_follow_retention_and_prune(server):
    """When B's retention drops its snapshot and prune the chunk, nobody holds it any
    more: A uploading the same bytes later stores them afresh, and B must send them again."""
    alice, bob = Device(server, "alice"), Device(server, "bob")
    bobs = secret(30)
    bob.upload(bobs)
    assert bob.commit({"home/bob/x": bobs}).status_code == 200
    server.ctx.end_upload(bob.id)
    store = server.ctx.store
    for sid in store.snapshot_ids():  # what retention does to an expired snapshot
        store.remove_snapshot(sid)
    summary = run_maintenance(server.ctx)
    assert summary["prune"]["holdings_forgotten"] >= 1, summary
    assert store.missing_chunks([content_id(bobs)]) == [content_id(bobs)]
    assert bob.missing(bobs)["missing"] == [content_id(bobs).hex()]
    assert alice.upload(bobs)["stored"] == 1


def test_an_upgraded_server_counts_an_endpoints_head_snapshot_as_held(server):
    """Snapshots committed before holdings existed: their endpoint still holds their
    chunks (its next incremental commit is not refused), others still do not."""
    alice, bob = Device(server, "alice"), Device(server, "bob")
    data = secret(40)
    alice.upload(data)
    assert alice.commit({"home/alice/x": data}).status_code == 200
    ctx: ServerContext = server.ctx
    ctx.holdings.close()  # the server before holdings: none recorded (either catalog)
    (Path(ctx.settings.data_dir) / "holdings.sqlite").unlink(missing_ok=True)
    for extra in ("-wal", "-shm"):
        (Path(ctx.settings.data_dir) / f"holdings.sqlite{extra}").unlink(missing_ok=True)
    ctx.holdings = Holdings(Path(ctx.settings.data_dir) / "holdings.sqlite")
    assert alice.missing(data)["missing"] == []
    assert alice.commit({"home/alice/x": data, "home/alice/y": data}).status_code == 200
    assert bob.missing(data)["missing"] == [content_id(data).hex()]


def test_chunks_of_an_assigned_layer_are_held_without_sending_or_proving(server):
    """An endpoint may download its assigned layers, so it holds their chunks: its first
    snapshot after the update sends none of them; another endpoint must prove them."""
    ctx: ServerContext = server.ctx
    assigned, other = Device(server, "assigned"), Device(server, "other")
    lib = secret(50, 100_000)
    ctx.store.store_chunks([content_id(lib)], [lib])
    ctx.store.flush()
    entry = Entry(path=b"usr/lib/libcorp.so", type=EntryType.FILE, size=len(lib),
                  chunks=[(content_id(lib), len(lib))])
    with ctx.write() as db:
        layer = save_layer(ctx, db, kind="base", name="corp", version="1", entries=[entry],
                           family="linux")
        db.add(Assignment(endpoint_id=assigned.id, base_id=layer.id))
    ctx.invalidate()
    decoded = []
    real = ctx.snapshot_chunks
    ctx.snapshot_chunks = lambda sid: decoded.append(sid) or real(sid)  # type: ignore[method-assign]
    assert assigned.missing(lib) == {"missing": [], "prove": [], "nonce": ""}
    assert assigned.missing(secret(51)) and decoded == []  # indexed when saved, not decoded
    ctx.holdings = Holdings(Path(ctx.settings.data_dir) / "fresh-holdings.sqlite")
    for _ in range(3):  # a layer from before holdings existed: decoded once, then indexed
        assert assigned.missing(lib)["missing"] == []
    assert decoded == [layer.snapshot]
    assert assigned.commit({"usr/lib/libcorp.so": lib}).status_code == 200
    assert ctx.holdings.view(assigned.id, [content_id(lib)])[0] == set()  # no row per endpoint
    assert other.missing(lib)["prove"] == [content_id(lib).hex()]  # IT content: shared
    assert other.commit({"usr/lib/libcorp.so": lib}).status_code == 409


def test_the_bytes_proofs_make_the_server_read_are_paced_per_endpoint(server):
    first, second = Device(server, "first"), Device(server, "second")
    libs = [secret(60 + i, 30_000) for i in range(3)]
    first.upload(*libs)
    assert first.commit({f"usr/lib/l{i}": d for i, d in enumerate(libs)}).status_code == 200
    server.ctx.proof_bytes = RateLimiter(rate=1.0, burst=70_000, clock=lambda: 0.0)
    answer = second.missing(*libs)
    assert second.prove(answer["nonce"], *libs[:2])["accepted"] == 2  # 60 KB: in budget
    resp = second.http.post(f"{API}/chunks/prove", content=encode_proofs(
        answer["nonce"], [(content_id(libs[2]), proof(answer["nonce"], libs[2]))]))
    assert resp.status_code == 429 and "bytes to prove" in resp.json()["detail"]


def test_the_holdings_sweep_is_bounded_and_resumes(tmp_path, monkeypatch):
    holdings = Holdings(tmp_path / "h.sqlite")
    chunks = [bytes([i]) * 32 for i in range(1, 13)]
    holdings.record("e", chunks)
    alive = set(chunks[::2])

    def present(batch: list[bytes]) -> set[bytes]:
        return alive & set(batch)
    monkeypatch.setattr("strata.server.holdings._SWEEP_BATCH", 5)
    dropped = [holdings.sweep(present, budget=5) for _ in range(3)]
    assert sum(dropped) == 6 and all(n <= 3 for n in dropped)  # a bounded share each pass
    assert holdings.view("e", chunks)[0] == alive


def test_a_deleted_endpoint_holds_nothing_and_counts_for_nothing(server):
    doc = secret(70)
    devices = [Device(server, f"ep{i}") for i in range(COMMON_HOLDERS + 1)]
    for dev in devices[:COMMON_HOLDERS]:
        dev.upload(doc)
    assert devices[-1].missing(doc)["prove"] == [content_id(doc).hex()]
    resp = server.admin.delete(f"/api/v1/admin/endpoints/{devices[0].id}")
    assert resp.status_code == 200, resp.text
    # Held by one endpoint fewer: private again to the others.
    assert devices[-1].missing(doc)["missing"] == [content_id(doc).hex()]


def test_the_number_of_holders_that_makes_a_chunk_shared_is_a_setting(tmp_path):
    app = create_app(ServerSettings(data_dir=tmp_path / "data", common_holders=2))
    token = (tmp_path / "data/admin.token").read_text().strip()
    with TestClient(app) as admin:
        admin.headers["Authorization"] = f"Bearer {token}"
        server = SimpleNamespace(app=app, ctx=app.state.ctx, admin=admin)
        one, two, three = (Device(server, n) for n in ("one", "two", "three"))
        doc = secret(80)
        one.upload(doc)
        assert two.missing(doc)["missing"] == [content_id(doc).hex()]
        two.upload(doc)
        assert three.missing(doc)["prove"] == [content_id(doc).hex()]


def test_request_size_bounds_reveal_nothing_about_other_endpoints_chunks(server, monkeypatch):
    """A bound checked over chunks the endpoint may not see would be an oracle: 413 when a
    guess exists, not when it does not. Both bounds count only what the endpoint may read."""
    ctx: ServerContext = server.ctx
    first, bob, alice = Device(server, "first"), Device(server, "bob"), Device(server, "alice")
    lib, bobs, nobody = secret(90, 30_000), secret(91, 30_000), secret(92, 30_000)
    first.upload(lib)
    assert first.commit({"usr/lib/libz.so": lib}).status_code == 200
    bob.upload(bobs)
    monkeypatch.setattr("strata.server.services.sync.MAX_PROOF_BYTES", 40_000)
    monkeypatch.setattr("strata.server.services.layer_downloads.MAX_STREAM_BYTES", 40_000)
    nonce = alice.missing(lib)["nonce"]
    answers = [alice.http.post(f"{API}/chunks/prove", content=encode_proofs(nonce, [
        (content_id(c), proof(nonce, c)) for c in (lib, guess)])) for guess in (bobs, nobody)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["refused"] == [content_id(bobs).hex()]
    assert answers[1].json()["refused"] == [content_id(nobody).hex()]

    entry = Entry(path=b"usr/lib/libz.so", type=EntryType.FILE, size=len(lib),
                  chunks=[(content_id(lib), len(lib))])
    with ctx.write() as db:
        layer = save_layer(ctx, db, kind="base", name="z", version="1", entries=[entry],
                           family="linux")
        db.add(Assignment(endpoint_id=alice.id, base_id=layer.id))
    ctx.invalidate()
    for guess in (bobs, nobody):
        resp = alice.http.post(f"{API}/layers/chunks", json={
            "ids": [content_id(lib).hex(), content_id(guess).hex()]})
        assert resp.status_code == 403, resp.text


def test_a_machine_enrolling_again_keeps_what_it_held(server):
    """`agent enroll --force` makes a new endpoint; shown the old credential, the server
    lets it hold what the old one did, so it sends none of its data again. A wrong or
    revoked credential counts for nothing."""
    old = Device(server, "laptop")
    data = secret(100)
    old.upload(data)
    assert old.commit({"home/u/thesis.pdf": data}).status_code == 200
    again = Device(server, "laptop", previous=old.credential)
    assert again.missing(data)["missing"] == []
    assert again.commit({"home/u/thesis.pdf": data}).status_code == 200
    assert Device(server, "thief", previous="sdev_" + "x" * 40).missing(data)["missing"] \
        == [content_id(data).hex()]
    resp = server.admin.post(f"/api/v1/admin/endpoints/{old.id}/revoke")
    assert resp.status_code == 200, resp.text
    assert Device(server, "thief", previous=old.credential).missing(data)["missing"] == \
        [content_id(data).hex()]
