"""Who may do what on a real server: enrollment tokens (wrong, used up, expired), missing
and misused credentials, administrator approval, endpoints kept apart from each other,
and malformed, oversized or lying request bodies.

One server is shared by the module; every test makes its own tokens and endpoints.
"""

from __future__ import annotations

import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

import web
from server_fixtures import (
    MIB,
    Agent,
    Server,
    assert_one_line_error,
    centralized,
    device,
    enroll_request,
    enrolled_device,
    run_all,
    running_server,
    strata,
    strata_json,
    wait_for,
    write_random,
)
from strata.model.ids import content_id
from strata.model.manifest import decode_manifest
from strata.model.transfer import BundleWriter
from strata.store.crypto import PlainCipher
from strata.store.pack import BlobCodec

pytestmark = pytest.mark.e2e

CODEC = BlobCodec(PlainCipher(), 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, catalogs):
    """One server per catalog database: every test here runs on SQLite and on PostgreSQL."""
    yield from running_server(tmp_path_factory.mktemp("security") / "server-data",
                              catalog=catalogs.new())


def small_root(path: Path, hostname: str, seed: int) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc/hostname").write_text(hostname + "\n")
    (path / "home/shared.txt").parent.mkdir(parents=True)
    (path / "home/shared.txt").write_text("the same on every endpoint\n" * 100)
    write_random(path / f"home/{hostname}/secret.bin", 300_000, random.Random(seed))
    return path


def bundle(*chunks: tuple[bytes, bytes]) -> bytes:
    """A chunk bundle of (claimed id, actual content) pairs."""
    w = BundleWriter()
    for cid, data in chunks:
        w.add(cid, len(data), CODEC.compress(data))
    return w.getvalue()


# -- enrollment tokens -----------------------------------------------------------------------


def test_enroll_with_a_wrong_token_fails_with_one_clear_line(server, tmp_path):
    agent = Agent(server, small_root(tmp_path / "root", "stranger", 1), tmp_path / "state")
    proc = strata(*agent.enroll_cmd("senr_" + "x" * 40), rc=None)
    assert_one_line_error(proc, "401", "enrollment token")
    assert not (agent.state / "credential.json").exists()


def test_used_up_and_expired_tokens_are_refused(server, tmp_path):
    once = server.create_token(uses=1)
    assert enroll_request(server, once).status_code == 200
    again = enroll_request(server, once)
    assert again.status_code == 401 and "used up" in again.json()["detail"], again.text

    doc = strata_json("token", "create", "--expires", "1s", "--server", server.url,
                      "--admin-token-file", server.token_file)
    time.sleep(2)
    late = enroll_request(server, doc["token"])
    assert late.status_code == 401 and "expired" in late.json()["detail"], late.text
    # The agent CLI says the same thing on one line.
    agent = Agent(server, small_root(tmp_path / "root", "late", 2), tmp_path / "state")
    assert_one_line_error(strata(*agent.enroll_cmd(doc["token"]), rc=None), "401", "expired")


def test_token_uses_hold_under_concurrent_enrollment(server):
    token = server.create_token(uses=3)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: enroll_request(server, token, f"rush-{i}"), range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 3 + [401] * 5
    assert len({a.json()["endpoint_id"] for a in answers if a.status_code == 200}) == 3


# -- credentials -----------------------------------------------------------------------------

AGENT_CALLS = [("POST", "/api/v1/agent/checkin", {}),
               ("POST", "/api/v1/agent/chunks/missing", {"ids": []}),
               ("POST", "/api/v1/agent/snapshots", {"manifest": [], "manifest_id": ""}),
               ("GET", "/api/v1/agent/snapshots", None),
               ("GET", "/api/v1/agent/snapshots/latest/manifest", None)]
ADMIN_CALLS = [("GET", "/api/v1/admin/endpoints", None),
               ("POST", "/api/v1/admin/tokens", {}),
               ("GET", "/api/v1/admin/policies/upload", None),
               ("PUT", "/api/v1/admin/policies/retention", {"last": 1}),
               ("GET", "/api/v1/admin/audit", None)]


def test_calls_without_credentials_get_401_with_a_clear_message(server):
    for method, path, body in AGENT_CALLS + ADMIN_CALLS:
        for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}):
            resp = web.request(method, server.url + path, json=body, headers=headers)
            assert resp.status_code == 401, (method, path, resp.text)
            assert "missing credentials" in resp.json()["detail"], resp.text
            assert resp.headers["www-authenticate"] == "Bearer"
    resp = web.post(server.url + "/api/v1/agent/chunks", content=b"STRXFER1")
    assert resp.status_code == 401
    with device(server, "sdev_not-a-real-credential") as stranger:
        resp = stranger.post("/api/v1/agent/checkin", json={})
        assert resp.status_code == 401 and "enroll" in resp.json()["detail"], resp.text


def test_device_credential_and_wrong_admin_token_get_403_on_admin_api(server, tmp_path):
    _, dev = enrolled_device(server, "nosy")
    wrong = device(server, "sadm_" + "y" * 40)
    with dev, wrong:
        for client in (dev, wrong):
            for method, path, body in ADMIN_CALLS:
                resp = client.request(method, path, json=body)
                assert resp.status_code == 403, (method, path, resp.text)
                assert "not an admin token" in resp.json()["detail"]
        # The device credential is fine for its own API.
        assert dev.post("/api/v1/agent/checkin", json={}).status_code == 200
    bad_file = tmp_path / "wrong.token"
    bad_file.write_text("sadm_wrong\n")
    proc = strata("endpoint", "list", "--server", server.url, "--admin-token-file", bad_file,
                  rc=None)
    assert_one_line_error(proc, "403", "not an admin token")


def test_revoked_endpoint_is_refused_and_cannot_be_approved(server):
    eid, dev = enrolled_device(server, "lost-laptop")
    with dev:
        assert dev.post("/api/v1/agent/checkin", json={}).status_code == 200
        server.admin_cli("endpoint", "revoke", eid[:8])
        resp = dev.post("/api/v1/agent/checkin", json={})
        assert resp.status_code == 403 and "revoked" in resp.json()["detail"], resp.text
        assert dev.get("/api/v1/agent/snapshots").status_code == 403
        server.admin("POST", f"/endpoints/{eid}/approve", status=409)
        assert dev.post("/api/v1/agent/checkin", json={}).status_code == 403


# -- approval --------------------------------------------------------------------------------


def test_endpoint_waits_for_approval_before_centralizing(server, tmp_path):
    doc = strata_json("token", "create", "--require-approval", "--server", server.url,
                      "--admin-token-file", server.token_file)
    assert doc["require_approval"] is True
    agent = Agent(server, small_root(tmp_path / "root", "newhire", 3), tmp_path / "state")
    enrolled = agent.enroll(doc["token"])
    assert enrolled["state"] == "pending"

    proc = strata(*agent.cmd("run", "--once"), rc=4)  # waiting: the documented exit code
    assert "waiting for an administrator's approval" in proc.stderr, proc.stderr
    pending = strata_json("endpoint", "list", "--pending", "--server", server.url,
                          "--admin-token-file", server.token_file)
    assert [(e["id"], e["state"], e["hostname"]) for e in pending] == \
        [(enrolled["endpoint_id"], "pending", "newhire")]
    assert server.admin("GET", f"/endpoints/{enrolled['endpoint_id']}")["snapshots"] == 0

    approved = server.admin_cli("endpoint", "approve", enrolled["endpoint_id"])
    assert enrolled["endpoint_id"] in approved.stdout
    r = centralized(agent.run_once())
    assert r["kind"] == "centralize" and r["files"] == 3
    assert server.admin("GET", "/endpoints?pending=true") == []
    shown = server.admin("GET", f"/endpoints/{enrolled['endpoint_id']}")
    assert shown["state"] == "active" and shown["last_snapshot"] == r["snapshot"]


# -- endpoints are kept apart ----------------------------------------------------------------


def test_endpoint_cannot_read_another_endpoints_snapshot(server, tmp_path):
    token = server.create_token(uses=2)
    a = Agent(server, small_root(tmp_path / "a", "alice-pc", 10), tmp_path / "state-a")
    b = Agent(server, small_root(tmp_path / "b", "bob-pc", 20), tmp_path / "state-b")
    run_all([a.enroll_cmd(token), b.enroll_cmd(token)])
    ra, rb = (centralized(o) for o in run_all([a.cmd("run", "--once"), b.cmd("run", "--once")]))
    with a.http() as ca, b.http() as cb:
        manifest = ca.get(f"/api/v1/agent/snapshots/{ra['snapshot']}/manifest")
        assert manifest.status_code == 200
        entries = {e.path: e for e in decode_manifest([manifest.content])}
        secret = entries[b"home/alice-pc/secret.bin"].chunks[0][0].hex()
        shared = entries[b"home/shared.txt"].chunks[0][0].hex()

        # B sees only its own snapshots; A's look exactly like ones that do not exist.
        assert [s["id"] for s in cb.get("/api/v1/agent/snapshots").json()] == [rb["snapshot"]]
        for ref in (ra["snapshot"], ra["snapshot"][:8]):
            resp = cb.get(f"/api/v1/agent/snapshots/{ref}/manifest")
            assert resp.status_code == 404, resp.text
            assert "X-Strata-Snapshot" not in resp.headers
            resp = cb.post(f"/api/v1/agent/snapshots/{ref}/chunks", json={"ids": [shared]})
            assert resp.status_code == 404, resp.text
        # Through its own snapshot, B gets its own chunks but not A's.
        own = cb.post(f"/api/v1/agent/snapshots/{rb['snapshot']}/chunks", json={"ids": [shared]})
        assert own.status_code == 200 and len(own.content) > 40
        for ids in ([secret], [shared, secret]):
            resp = cb.post(f"/api/v1/agent/snapshots/{rb['snapshot']}/chunks", json={"ids": ids})
            assert resp.status_code == 403, resp.text
            assert b"alice" not in resp.content
        # A still gets its secret back.
        mine = ca.post(f"/api/v1/agent/snapshots/{ra['snapshot']}/chunks", json={"ids": [secret]})
        assert mine.status_code == 200


# -- malformed, oversized and lying bodies ---------------------------------------------------


def test_malformed_and_oversized_bodies_are_refused_and_nothing_is_stored(server):
    _, dev = enrolled_device(server, "fuzzer")
    with dev:
        # Not JSON, wrong JSON, ids that are not 32-byte hex
        resp = dev.post("/api/v1/agent/chunks/missing", content=b"{not json",
                        headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, resp.text
        assert dev.post("/api/v1/agent/checkin", json={"inventory": "x"}).status_code == 422
        for ids in (["zz" * 32], ["abcd"], [123], "ab" * 32):
            resp = dev.post("/api/v1/agent/chunks/missing", json={"ids": ids})
            assert resp.status_code == 422, (ids, resp.text)
        resp = dev.post("/api/v1/agent/chunks/missing", json={"ids": ["ab" * 32] * 10_001})
        assert resp.status_code == 422
        resp = dev.post("/api/v1/agent/snapshots",
                        json={"manifest": [["not-hex", 10]], "manifest_id": "00" * 32})
        assert resp.status_code == 422, resp.text

        # Garbage and truncated bundles
        for body in (b"", b"garbage garbage garbage", bundle((b"\1" * 32, b"x" * 100))[:-10]):
            resp = dev.post("/api/v1/agent/chunks", content=body)
            assert resp.status_code == 422, (body[:20], resp.text)

        # Over 64 MiB: streamed (no length given), then a Content-Length that says so. The
        # body is a well-formed bundle (one small chunk over and over): garbage would be
        # refused at its first bytes.
        good = b"a perfectly good chunk\n" * 200
        record = bundle((content_id(good), good))[8:]
        def stream():
            yield b"STRXFER1"
            for _ in range(65):
                yield record * (MIB // len(record) + 1)
        resp = dev.post("/api/v1/agent/chunks", content=stream())
        assert resp.status_code == 413, resp.text
        assert b"413" in _declared_length_response(server, dev.headers["authorization"],
                                                   100 * MIB)

        # A bundle whose second chunk is not what its id says: refused at that chunk.
        fresh = b"another good chunk\n" * 200
        lie_id = content_id(b"what the id promises")
        resp = dev.post("/api/v1/agent/chunks", content=bundle(
            (content_id(fresh), fresh), (lie_id, b"what the bytes really are")))
        assert resp.status_code == 422 and "does not match" in resp.json()["detail"], resp.text
        ids = [content_id(fresh).hex(), lie_id.hex()]
        assert dev.post("/api/v1/agent/chunks/missing", json={"ids": ids}).json()["missing"] \
            == [lie_id.hex()]  # the good one before it was kept
        # A raw length that lies about the zstd frame is caught too.
        w = BundleWriter()
        w.add(content_id(good), 10, CODEC.compress(good))
        assert dev.post("/api/v1/agent/chunks", content=w.getvalue()).status_code == 422

        # Commits may name only chunks the server holds (409 lists the missing ones) ...
        lacking = content_id(b"never uploaded").hex()
        resp = dev.post("/api/v1/agent/snapshots",
                        json={"manifest": [[lacking, 14]], "manifest_id": lacking})
        assert resp.status_code == 409, resp.text
        assert resp.json()["missing"] == [lacking]
        # ... and the chunks they name must be a manifest, matching its id.
        assert dev.post("/api/v1/agent/chunks", content=bundle(
            (content_id(good), good))).json()["stored"] == 0  # kept from the 413 above
        for manifest_id in (content_id(good).hex(), "00" * 32):
            resp = dev.post("/api/v1/agent/snapshots", json={
                "manifest": [[content_id(good).hex(), len(good)]], "manifest_id": manifest_id})
            assert resp.status_code == 422, resp.text
        assert dev.get("/api/v1/agent/snapshots").json() == []

    assert server.alive()
    assert server.metric("strata_rejected_uploads_total") >= 2


def _random_chunks(n: int, seed: int, size: int = 30_000) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def _missing(dev: httpx.Client, chunks: list[bytes]) -> list[bytes]:
    resp = dev.post("/api/v1/agent/chunks/missing",
                    json={"ids": [content_id(c).hex() for c in chunks]})
    assert resp.status_code == 200, resp.text
    return [bytes.fromhex(h) for h in resp.json()["missing"]]


def test_an_upload_cut_mid_bundle_keeps_exactly_the_chunks_that_arrived_whole(server):
    """A client sends half a bundle (the cut falls inside a chunk's bytes) and closes
    the connection: the chunks before the cut are stored and the endpoint's, the one cut
    in two is not, and "missing?" names only it and those after it."""
    _, dev = enrolled_device(server, "cut-upload")
    chunks = _random_chunks(8, seed=41)
    body = bundle(*((content_id(c), c) for c in chunks))
    record = len(body[8:]) // len(chunks)  # random data: every record is the same size
    cut = 8 + 5 * record + record // 2  # the sixth chunk is half sent
    kept_before = server.metric("strata_upload_chunks_kept_total")
    with dev:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall((f"POST /api/v1/agent/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Authorization: {dev.headers['authorization']}\r\n"
                       f"Content-Type: application/octet-stream\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:cut])
        assert wait_for(lambda: server.metric("strata_upload_chunks_kept_total")
                        >= kept_before + 5, 30)
        assert server.metric("strata_upload_chunks_kept_total") == kept_before + 5
        assert _missing(dev, chunks) == [content_id(c) for c in chunks[5:]]
        # The rest, sent again alone, completes the set; nothing before counts as new.
        resp = dev.post("/api/v1/agent/chunks", content=bundle(
            *((content_id(c), c) for c in chunks[5:])))
        assert resp.json()["stored"] == 3, resp.text
        assert _missing(dev, chunks) == []


def test_a_lying_chunk_after_good_ones_is_refused_in_one_line_and_the_good_ones_kept(server):
    _, dev = enrolled_device(server, "liar")
    good, after = _random_chunks(3, seed=42), _random_chunks(2, seed=43)
    lie = content_id(b"what the id promises")
    rejected_before = server.metric("strata_rejected_uploads_total")
    with dev:
        resp = dev.post("/api/v1/agent/chunks", content=bundle(
            *((content_id(c), c) for c in good), (lie, b"what the bytes really are"),
            *((content_id(c), c) for c in after)))
        assert resp.status_code == 422, resp.text
        detail = resp.json()["detail"]
        assert "\n" not in detail and len(detail) < 200, detail
        assert f"chunk {lie.hex()[:16]}" in detail and "3 chunks before it were kept" in detail
        assert _missing(dev, good + after) == [content_id(c) for c in after]
        ids = [lie.hex()]
        assert dev.post("/api/v1/agent/chunks/missing", json={"ids": ids}).json()["missing"] \
            == ids
    assert server.metric("strata_rejected_uploads_total") == rejected_before + 1


def test_oversized_json_bodies_are_refused_before_parsing(server):
    def huge_json():
        yield b'{"token": "'
        for _ in range(65):
            yield b"a" * MIB
        yield b'"}'
    resp = web.post(server.url + "/api/v1/agent/enroll", content=huge_json(), timeout=120,
                    headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, (resp.status_code, resp.text[:200])


def test_admin_endpoint_references_are_literal_prefixes(server):
    eid, _ = enrolled_device(server, "wildcards")
    server.admin("GET", f"/endpoints/{eid[:8]}", status=200)
    server.admin("GET", f"/endpoints/{quote(eid[:7] + '_', safe='')}", status=404)


def _declared_length_response(server: Server, authorization: str, length: int) -> bytes:
    """Send only the headers of an upload that claims `length` bytes; the server's answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall((f"POST /api/v1/agent/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: {authorization}\r\n"
                   f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
                   "\r\nSTRXFER1").encode())
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_admin_api_rejects_malformed_policies_and_tokens(server):
    for kind, doc in (("upload", {"interval_seconds": 5}),
                      ("upload", {"exclusions": ["/tmp/"]}),
                      ("retention", {"forever": 1}),
                      ("retention", {"last": 0}),
                      ("bandwidth", {"rules": [{"subnet": "not-a-subnet"}]}),
                      ("bandwidth", {"rules": [{"upload_kbps": -5}]})):
        resp = server.admin("PUT", f"/policies/{kind}", doc, status=422)
        assert resp["detail"].startswith(f"invalid {kind} policy"), resp
    server.admin("PUT", "/policies/nonsense", {}, status=404)
    server.admin("POST", "/tokens", {"expires": "soon"}, status=422)
    server.admin("POST", "/tokens", {"uses": 0}, status=422)
    assert json.dumps(server.admin("GET", "/policies/retention")) == \
        json.dumps({"hourly": 24, "daily": 31, "monthly": 12})
