"""Every byte an endpoint sends is checked before anything is written, and costs bounded
work: hostile manifests, fields out of range, oversized chunks and manifests that ask for
gigabytes, server answers that would name files. Each is a 4xx (or, on the agent, one
line), never a 500 and never after a write; afterwards the server is up and the next
backup and restore are byte-identical (the last test, on a real server)."""

from __future__ import annotations

import random
import socket

import httpx
import pytest
from pydantic import ValidationError

from server_fixtures import Agent, Server, centralized, file_map, wait_for, write_random
from strata.agent.client import MalformedAnswer, parse_answer
from strata.agent.remote_source import RemoteSource
from strata.errors import CorruptData
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.transfer import BundleWriter
from strata.model.wire import CheckinResponse, DesiredLayer, EnrollResponse
from strata.server.app import MAX_LISTED_ERRORS, _short
from strata.server.services.manifests import MAX_MANIFEST_BYTES
from strata.server.stream_cache import StreamCache
from test_isolation import API, CODEC, Device, secret, server  # noqa: F401 -- fixture

assert server


def _entries_commit(dev: Device, entries: list[Entry]) -> httpx.Response:
    manifest = b"".join(encode_manifest(entries))
    dev.upload(manifest)
    return dev.http.post(f"{API}/snapshots", json={
        "manifest": [(content_id(manifest).hex(), len(manifest))],
        "manifest_id": content_id(manifest).hex()})


def _nothing_written(server) -> None:
    assert list(server.ctx.store.snapshot_ids()) == []


def file_entry(path: bytes, data: bytes, size: int | None = None) -> Entry:
    return Entry(path=path, type=EntryType.FILE, size=len(data) if size is None else size,
                 chunks=[(content_id(data), len(data))])


@pytest.mark.parametrize(("entries", "why"), [
    ([file_entry(b"../etc/passwd", b"x")], "'..' component"),
    ([file_entry(b"/etc/passwd", b"x")], "absolute"),
    ([file_entry(b"a\0b", b"x")], "NUL"),
    ([file_entry(b"a", b"x", size=-1)], "negative size"),
    ([file_entry(b"a", b"x", size=5)], "do not add up"),
    ([file_entry(b"b", b"x"), file_entry(b"a", b"x")], "out of order"),
    ([file_entry(b"a", b"x"), file_entry(b"a", b"x")], "repeated"),
    ([Entry(path=b"d", type=EntryType.HARDLINK, link_target=b"../../x")], "'..' component"),
    ([Entry(path=b"d", type=EntryType.DIR, mode=0o170777)], "mode or owner"),
])
def test_manifests_restore_would_refuse_are_refused_at_commit(server, entries, why):
    dev = Device(server, "hostile")
    dev.upload(b"x")
    resp = _entries_commit(dev, entries)
    assert resp.status_code == 422, resp.text
    assert why in resp.json()["detail"]
    _nothing_written(server)


@pytest.mark.parametrize("body", [
    {"stats": {"files": "x"}},
    {"stats": {"bytes_total": 10 ** 30}},
    {"stats": {"junk": "y" * 100_000}},
    {"stats": {f"k{i}": i for i in range(1000)}},
    {"trigger": "t" * (3 << 20)},
    {"paths": ["p" * 10_000]},
    {"tags": ["t"] * 10_000},
    {"seconds": -1},
    {"manifest_id": "../../etc"},
])
def test_fields_out_of_bounds_are_refused_before_any_write(server, body):
    dev = Device(server, "hostile")
    data = secret(1)
    manifest = b"".join(encode_manifest([file_entry(b"a", data)]))
    dev.upload(data, manifest)
    req = {"manifest": [(content_id(manifest).hex(), len(manifest))],
           "manifest_id": content_id(manifest).hex(), **body}
    resp = dev.http.post(f"{API}/snapshots", json=req)
    assert resp.status_code in (413, 422), resp.text
    _nothing_written(server)
    assert dev.http.post(f"{API}/snapshots", json={  # the same commit, sane, goes through
        "manifest": req["manifest"], "manifest_id": content_id(manifest).hex()}
        ).status_code == 200


def test_reports_an_endpoint_keeps_in_the_catalog_are_bounded(server):
    dev = Device(server, "hostile")
    def inventory() -> list:
        return [e["inventory"] for e in server.admin.get("/api/v1/admin/endpoints").json()]
    before = inventory()
    for body in ({"inventory": {"x": "y" * (3 << 20)}}, {"status": {"x": ["z"] * 400_000}}):
        resp = dev.http.post(f"{API}/checkin", json=body)
        assert resp.status_code == 422 and "at most 65536 bytes" in resp.text
        assert len(resp.content) < 1000  # the refused value is not echoed back
    assert inventory() == before


def test_a_refused_body_lists_its_first_problems_and_repeats_short_values_only(server):
    dev = Device(server, "hostile")
    resp = dev.http.post(f"{API}/snapshots", json={"manifest": [["x", "y"]] * 5000,
                                                   "manifest_id": "ab"})
    assert resp.status_code == 422
    problems = resp.json()["detail"]  # 10,001 of them: the first ones are listed
    assert len(problems) == MAX_LISTED_ERRORS
    assert problems[0]["loc"] == ["body", "manifest", 0, 0] and problems[0]["input"] == "x"
    # Python's JSON parser takes a NaN: it comes back as text, not as a 500
    resp = dev.http.post(f"{API}/snapshots", headers={"Content-Type": "application/json"},
                         content=b'{"manifest": [["ab", NaN]], "manifest_id": "ab"}')
    assert resp.status_code == 422
    assert {"loc": ["body", "manifest", 0, 1], "input": "nan"}.items() <= \
        resp.json()["detail"][1].items()


@pytest.mark.parametrize(("value", "short"), [
    ("x" * 100, True), ("x" * 300, False), (b"x" * 300, False), (None, True), (1e308, True),
    (True, True), pytest.param(1 << 20000, False, id="an-int-of-6021-digits"),
    ([1] * 30, True), ([1] * 10**6, False), ({"a": [1, 2, {"b": "c"}]}, True),
    ({"a": "y" * (3 << 20)}, False), ({str(i): i for i in range(10**5)}, False),
    ([[[["z" * 60]] * 2] * 2], False),
])
def test_only_short_values_are_repeated(value, short):
    assert _short(value) is short


def test_admin_bounds_are_4xx(server):
    admin = server.admin
    for expires in ("99999999999999d", "9" * 5000 + "d", "3661d"):
        resp = admin.post("/api/v1/admin/tokens", json={"uses": 1, "expires": expires})
        assert resp.status_code == 422, resp.text
    assert admin.post("/api/v1/admin/tokens", json={"expires": "3660d"}).status_code == 200
    for path in ("audit", "transactions"):
        for limit in ("-1", "0", "1001", "x"):
            resp = admin.get(f"/api/v1/admin/{path}", params={"limit": limit})
            assert resp.status_code == 422, (path, limit, resp.text)
        assert admin.get(f"/api/v1/admin/{path}", params={"limit": 1000}).status_code == 200


def test_a_chunk_larger_than_the_chunker_makes_is_refused(server):
    dev = Device(server, "hostile")
    big = b"\0" * (server.ctx.store.config.chunker.max_size + 1)
    bundle = BundleWriter()
    bundle.add(content_id(big), len(big), CODEC.compress(big))
    resp = dev.http.post(f"{API}/chunks", content=bundle.getvalue())
    assert resp.status_code == 422 and "largest chunk" in resp.json()["detail"]
    assert dev.missing(big)["missing"] == [content_id(big).hex()]


def test_a_chunk_repeated_in_a_bundle_is_decoded_once(server, monkeypatch):
    from strata.server.services import sync
    calls = []
    real = sync.decode_payload
    monkeypatch.setattr(sync, "decode_payload",
                        lambda cid, payload, n: calls.append(cid) or real(cid, payload, n))
    dev = Device(server, "hostile")
    data = b"\0" * server.ctx.store.config.chunker.max_size
    bundle = BundleWriter()
    for _ in range(200):
        bundle.add(content_id(data), len(data), CODEC.compress(data))
    resp = dev.http.post(f"{API}/chunks", content=bundle.getvalue())
    assert resp.status_code == 200 and resp.json()["chunks"] == 1
    assert calls == [content_id(data)]


def test_a_manifest_naming_one_chunk_many_times_is_refused_before_it_is_read(server):
    """The memory blow-up: a 3 KB commit asking the server to read and join gigabytes."""
    dev = Device(server, "hostile")
    big = secret(2, server.ctx.store.config.chunker.max_size)
    dev.upload(big)
    times = MAX_MANIFEST_BYTES // len(big) + 1
    reads = []
    real = server.ctx.store.load_chunk
    server.ctx.store.load_chunk = lambda cid: reads.append(cid) or real(cid)
    resp = dev.http.post(f"{API}/snapshots", json={
        "manifest": [(content_id(big).hex(), len(big))] * times,
        "manifest_id": content_id(big).hex()})
    assert resp.status_code == 413 and "at most 512 MiB" in resp.json()["detail"]
    assert reads == []
    # Repeats under the bound are read once (and refused: not a manifest).
    resp = dev.http.post(f"{API}/snapshots", json={
        "manifest": [(content_id(big).hex(), len(big))] * 32,
        "manifest_id": content_id(big).hex()})
    assert resp.status_code == 422 and len(reads) == 1
    resp = dev.http.post(f"{API}/snapshots", json={
        "manifest": [(content_id(big).hex(), len(big))] * 10_001,
        "manifest_id": content_id(big).hex()})
    assert resp.status_code == 422
    _nothing_written(server)


def test_the_layer_capture_path_has_the_same_bound(server):
    big = secret(3, server.ctx.store.config.chunker.max_size)
    server.ctx.store.store_chunks([content_id(big)], [big])
    server.ctx.store.flush()
    resp = server.admin.post("/api/v1/admin/layers", json={
        "kind": "base", "name": "bomb", "version": "1",
        "manifest": [(content_id(big).hex(), len(big))] * (MAX_MANIFEST_BYTES // len(big) + 1),
        "manifest_id": content_id(big).hex()})
    assert resp.status_code == 413, resp.text
    assert server.admin.get("/api/v1/admin/layers").json() == []


def test_the_stream_cache_ignores_the_order_of_ids(tmp_path):
    ids = [bytes([i]) * 32 for i in range(5)]
    calls = []
    cache = StreamCache(tmp_path)
    first = cache.get_or_make(19, ids, lambda: calls.append(1) or b"stream")
    again = cache.get_or_make(19, ids[::-1] + ids[:2], lambda: calls.append(1) or b"other")
    assert first == again == b"stream" and calls == [1]


def test_a_server_chosen_layer_snapshot_never_names_a_path():
    for sid in ("../../../../tmp/evil", "A" * 64, "0" * 63, "0" * 64 + "/", ""):
        with pytest.raises(ValidationError, match="64-digit lowercase hex"):
            DesiredLayer(id=1, kind="base", name="os", version="1", snapshot=sid)
    good = "0" * 64
    assert DesiredLayer(id=1, kind="base", name="os", version="1", snapshot=good).snapshot


def test_a_server_chosen_endpoint_id_or_snapshot_header_never_names_a_path():
    with pytest.raises(ValidationError):
        EnrollResponse(endpoint_id="../../trust/root", credential="c", state="active")
    assert EnrollResponse(endpoint_id="0b1e5c1a-7f0e-4c1d-9d0b-4a5e2f6b7c8d",
                          credential="c", state="active")

    class Answering:
        def request(self, method: str, path: str, **_: object) -> httpx.Response:
            return httpx.Response(200, content=b"m",
                                  headers={"X-Strata-Snapshot": "../../admin/x"})
    with pytest.raises(CorruptData, match="other than an id"):
        RemoteSource(Answering()).snapshot("latest")  # type: ignore[arg-type]


def test_the_agent_refuses_a_malformed_answer_with_one_line():
    answer = {"endpoint_id": "e", "state": "active", "policy": {},
              "chunker": {"min_size": 1, "avg_size": 2, "max_size": 3, "zstd_level": 3},
              "server_time": "2026-01-01T00:00:00Z",
              "desired": {"key": "k", "layers": [{"id": 1, "kind": "base", "name": "os",
                                                  "version": "1",
                                                  "snapshot": "../../../etc/cron.d/x"}]}}
    resp = httpx.Response(200, json=answer,
                          request=httpx.Request("POST", "http://s/api/v1/agent/checkin"))
    with pytest.raises(MalformedAnswer) as err:
        parse_answer(resp, CheckinResponse)
    assert "\n" not in str(err.value) and "desired.layers.0.snapshot" in str(err.value)


# -- on a real server: disconnects, and the server afterwards ---------------------------------


@pytest.mark.e2e
def test_attacks_leave_the_server_up_and_backups_byte_identical(tmp_path):
    server = Server(tmp_path / "data").start()
    try:
        root = tmp_path / "root"
        write_random(root / "home/u/data.bin", 700_000, random.Random(3))
        (root / "usr/lib").mkdir(parents=True)
        (root / "usr/lib/libx.so").write_bytes(secret(4, 300_000))
        agent = Agent(server, root, tmp_path / "state")
        agent.enroll(server.create_token())
        first = centralized(agent.backup())
        with agent.http() as dev:
            # A client that goes away mid-upload, a few times.
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                    s.sendall((f"POST {API}/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               f"Authorization: {dev.headers['authorization']}\r\n"
                               "Content-Length: 1000000\r\n\r\nSTRXFER1").encode())
                    s.sendall(b"\0" * 5000)
            # Hostile commits and oversized asks.
            huge = [(content_id(b"x").hex(), 1)] * 10_001
            assert dev.post(f"{API}/snapshots", json={
                "manifest": huge, "manifest_id": "0" * 64}).status_code == 422
            assert dev.post(f"{API}/snapshots", json={
                "manifest": [(first["snapshot"], 1)], "manifest_id": first["snapshot"],
                "stats": {"files": 10 ** 30}}).status_code == 422
            resp = dev.post(f"{API}/chunks/missing", json={"ids": ["ab" * 32] * 10_000})
            assert resp.status_code == 200
        wait_for(lambda: server.log.read_text(errors="replace").count("went away") >= 3, 30)
        log = server.log.read_text(errors="replace")
        assert log.count("went away") == 3 and "Traceback" not in log, log[-3000:]
        assert server.alive()

        (root / "home/u/new.txt").write_text("written after the attacks\n")
        second = centralized(agent.backup())
        assert second["kind"] == "incremental"
        out = tmp_path / "restored"
        assert not agent.restore("home", "usr", snapshot=second["snapshot"], to=out)["errors"]
        assert file_map(out) == file_map(root)
    finally:
        server.stop()
        server.kill()
