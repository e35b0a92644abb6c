"""Snapshot browsing for IT: the admin routes that list a folder of an endpoint's
snapshot and download a file or a folder (tar, zip), with their checks (paths, only that
endpoint's snapshots, bounded work, streaming), and the CLI over them
(`strata endpoint files|export|mount`)."""

from __future__ import annotations

import gc
import io
import os
import random
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from conftest import lib_restore, tree_state
from snapshot_samples import build_sample
from strata.engine.backup import backup
from strata.engine.restore import restore
from strata.model.snapshot_files import MAX_CHUNKS
from strata.server.app import create_app
from strata.server.catalog.models import SnapshotRecord
from strata.server.context import ServerContext, ServerSettings
from strata.server.services import snapshot_files, snapshots

API = "/api/v1/admin"
ODD = os.fsdecode(b"dir\xff")  # a folder name that is not UTF-8


def _enroll(client: TestClient, hostname: str) -> dict:
    tok = client.post(f"{API}/tokens", json={"uses": 1}).json()["token"]
    return client.post("/api/v1/agent/enroll", headers={"Authorization": ""},
                       json={"token": tok, "hostname": hostname, "os": "debian"}).json()


def _centralize(ctx: ServerContext, endpoint_id: str, src: Path) -> str:
    """A snapshot of `src` in the server's store, recorded as the endpoint's (what an
    agent's commit leaves behind)."""
    sid = backup(ctx.store, src).snapshot
    with ctx.write() as db:
        cvd = snapshots.cvd_of(db, endpoint_id)
        assert cvd is not None
        db.add(SnapshotRecord(id=sid, cvd_id=cvd.id, time=datetime.now(UTC)))
        cvd.last_snapshot = sid
    return sid


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[SimpleNamespace]:
    app = create_app(ServerSettings(data_dir=tmp_path / "data"))
    ctx: ServerContext = app.state.ctx
    token = (tmp_path / "data/admin.token").read_text().strip()
    src, other_src = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    build_sample(src, random.Random(11))
    (src / "caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"x")
    (src / ODD).mkdir()
    (src / ODD / "inner.txt").write_bytes(b"inside a folder whose name is not UTF-8")
    other_src.mkdir()
    (other_src / "secret.txt").write_bytes(b"another endpoint's data " * 1000)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        me, other = _enroll(client, "me"), _enroll(client, "other")
        sid = _centralize(ctx, me["endpoint_id"], src)
        other_sid = _centralize(ctx, other["endpoint_id"], other_src)
        yield SimpleNamespace(ctx=ctx, client=client, ep=me["endpoint_id"], sid=sid,
                              other=other["endpoint_id"], other_sid=other_sid, src=src,
                              device={"Authorization": f"Bearer {me['credential']}"},
                              base=f"{API}/endpoints/{me['endpoint_id'][:8]}/snapshots")


def test_list_a_folder_and_page_through_it(world) -> None:
    c = world.client
    root = c.get(f"{world.base}/latest/files").json()
    assert root["snapshot"] == world.sid and root["type"] == "dir" and not root["truncated"]
    names = [e["name"] for e in root["entries"]]
    assert names == ["caf\ufffd", "dir\ufffd", "docs", "empty", "link", "script.sh"]
    odd = root["entries"][0]
    assert odd["raw_name"] == b"caf\xe9".hex()  # the exact bytes, for a name not UTF-8
    link = next(e for e in root["entries"] if e["name"] == "link")
    assert link["type"] == "symlink" and link["link_target"] == "docs/a.txt"
    script = next(e for e in root["entries"] if e["name"] == "script.sh")
    assert script["mode"] == "0750" and script["size"] == 18
    page = c.get(f"{world.base}/{world.sid[:10]}/files",
                 params={"path": "/docs/", "limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and page["truncated"] and page["path"] == "docs"
    assert [e["name"] for e in page["entries"]] == ["dangling", "deep"]
    one = c.get(f"{world.base}/latest/files", params={"path": "docs/a.txt"}).json()
    assert one["type"] == "file" and [e["name"] for e in one["entries"]] == ["a.txt"]
    assert one["entries"][0]["nlink"] == 2


@pytest.mark.parametrize("path", ["..", "docs/..", "docs/../../etc", "./docs", "docs//a.txt",
                                  "docs/\x00", "docs/./a.txt"])
def test_paths_that_are_not_normalized_are_refused(world, path: str) -> None:
    for route in ("files", "download"):
        resp = world.client.get(f"{world.base}/latest/{route}", params={"path": path})
        assert resp.status_code == 422, (route, path, resp.text)
        assert "invalid path" in resp.json()["detail"]


def test_a_name_that_is_not_utf8_is_reached_by_its_bytes(world) -> None:
    c = world.client
    root = c.get(f"{world.base}/latest/files").json()
    raw = next(e["raw_name"] for e in root["entries"] if e["name"] == "dir\ufffd")
    assert bytes.fromhex(raw) == b"dir\xff"
    inside = c.get(f"{world.base}/latest/files", params={"path_hex": raw}).json()
    assert inside["path"] == "dir\ufffd" and [e["name"] for e in inside["entries"]] == [
        "inner.txt"]
    tar = c.get(f"{world.base}/latest/download", params={"path_hex": raw})
    assert tarfile.open(fileobj=io.BytesIO(tar.content)).getnames() == [ODD, ODD + "/inner.txt"]
    one = c.get(f"{world.base}/latest/download",
                params={"path_hex": (b"dir\xff/inner.txt").hex()})
    assert one.content == b"inside a folder whose name is not UTF-8"
    for params in ({"path": "docs", "path_hex": raw}, {"path_hex": "zz"}):
        assert c.get(f"{world.base}/latest/files", params=params).status_code == 422
    assert c.get(f"{world.base}/latest/files",
                 params={"path_hex": (b"dir\xff/../x").hex()}).status_code == 422


def test_only_that_endpoints_snapshots(world) -> None:
    c = world.client
    for route in ("files", "download", "manifest"):
        resp = c.get(f"{world.base}/{world.other_sid[:12]}/{route}")
        assert resp.status_code == 404, resp.text
        assert resp.json()["detail"].startswith("no snapshot")
    assert c.get(f"{world.base}/latest/files", params={"path": "nope"}).status_code == 404
    # Chunks: only those of the snapshot named, even for ids another snapshot holds.
    other_chunk = next(cid for e in world.ctx.store.iter_manifest(
        world.ctx.store.load_snapshot(world.other_sid)) for cid, _ in e.chunks)
    resp = c.post(f"{world.base}/{world.sid}/chunks", json={"ids": [other_chunk.hex()]})
    assert resp.status_code == 403
    resp = c.post(f"{world.base}/{world.sid}/chunks", json={"ids": ["00"] * (MAX_CHUNKS + 1)})
    assert resp.status_code == 422
    # An endpoint's own credential is not an admin's.
    assert c.get(f"{world.base}/latest/files", headers=world.device).status_code == 403


def test_download_a_file_streams_it_chunk_by_chunk(world) -> None:
    c = world.client
    want = (world.src / "docs/deep/big.bin").read_bytes()
    resp = c.get(f"{world.base}/latest/download", params={"path": "docs/deep/big.bin"})
    assert resp.status_code == 200 and resp.content == want
    assert resp.headers["content-length"] == str(len(want))
    assert resp.headers["content-disposition"] == "attachment; filename*=UTF-8''big.bin"
    # The body is made of the file's chunks: never the whole file at once.
    d = snapshot_files.download(world.ctx, world.ep, "latest", "docs/deep/big.bin", None,
                                "test")
    pieces = [len(p) for p in d.body]
    assert sum(pieces) == len(want) and len(pieces) > 3 and max(pieces) <= 256 << 10
    assert c.get(f"{world.base}/latest/download",
                 params={"path": "docs"}).headers["content-type"] == "application/x-tar"
    assert c.get(f"{world.base}/latest/download",
                 params={"path": "docs", "format": "raw"}).status_code == 422
    assert c.get(f"{world.base}/latest/download",
                 params={"path": "docs", "format": "rar"}).status_code == 422
    audit = c.get(f"{API}/audit").json()
    assert any(a["action"] == "snapshot-download" and a["detail"]["path"] == "docs/deep/big.bin"
               for a in audit)


def test_a_folder_as_tar_extracts_to_what_a_restore_gives(world, tmp_path: Path) -> None:
    resp = world.client.get(f"{world.base}/latest/download", params={"path": "docs"})
    assert resp.status_code == 200
    (tmp_path / "docs.tar").write_bytes(resp.content)
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "--xattrs", "-xf", tmp_path / "docs.tar", "-C", tmp_path / "x"],
                   check=True)
    restore(world.ctx.store, world.ctx.store.load_snapshot(world.sid), tmp_path / "r",
            includes=["docs"])
    assert tree_state(tmp_path / "x") == tree_state(tmp_path / "r")
    one = world.client.get(f"{world.base}/latest/download",
                           params={"path": "docs/deep/er/mid.dat", "format": "tar"})
    assert tarfile.open(fileobj=io.BytesIO(one.content)).getnames() == [
        "docs", "docs/deep", "docs/deep/er", "docs/deep/er/mid.dat"]  # a file, with parents
    whole = world.client.get(f"{world.base}/latest/download").content  # the whole snapshot
    names = tarfile.open(fileobj=io.BytesIO(whole)).getnames()
    assert "script.sh" in names and "docs/deep/er/mid.dat" in names


def test_a_folder_as_zip(world) -> None:
    resp = world.client.get(f"{world.base}/latest/download",
                            params={"path": "docs/deep", "format": "zip"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    z = zipfile.ZipFile(io.BytesIO(resp.content))
    assert z.testzip() is None
    assert z.namelist() == ["docs/", "docs/deep/", "docs/deep/big.bin", "docs/deep/er/",
                            "docs/deep/er/mid.dat", "docs/deep/er/zero"]
    assert z.read("docs/deep/big.bin") == (world.src / "docs/deep/big.bin").read_bytes()


def test_downloads_at_once_are_bounded(world) -> None:
    ctx = world.ctx
    held = [snapshot_files.download(ctx, world.ep, "latest", "docs", "tar", "t")
            for _ in range(snapshot_files.MAX_DOWNLOADS)]
    resp = world.client.get(f"{world.base}/latest/download", params={"path": "docs/a.txt"})
    assert resp.status_code == 429 and "try again" in resp.json()["detail"]
    b"".join(held.pop().body)  # one finishes: its slot is free again
    assert world.client.get(f"{world.base}/latest/download",
                            params={"path": "docs/a.txt"}).content == b"hello\n"
    held.clear()  # dropped without a byte read: their slots come back too
    gc.collect()
    for _ in range(snapshot_files.MAX_DOWNLOADS):
        assert world.client.get(f"{world.base}/latest/download",
                                params={"path": "docs/a.txt"}).status_code == 200


def test_manifest_and_chunks_read_a_snapshot_remotely(world) -> None:
    c = world.client
    resp = c.get(f"{world.base}/latest/manifest")
    assert resp.headers["x-strata-snapshot"] == world.sid
    from strata.engine.snapshot_tree import SnapshotTree
    from strata.model.transfer import read_bundle
    from strata.store.pack import decode_payload

    def load(ids: list[bytes]) -> list[bytes]:
        body = c.post(f"{world.base}/{world.sid}/chunks",
                      json={"ids": [i.hex() for i in ids]}).content
        got = {cid: decode_payload(cid, p, n) for cid, n, p in read_bundle(body)}
        return [got[i] for i in ids]

    tree = SnapshotTree(resp.content, load)
    assert tree.read(tree.resolve("docs/deep/er/mid.dat"), 0, 1 << 20) == \
        (world.src / "docs/deep/er/mid.dat").read_bytes()
    assert any(a["action"] == "snapshot-read" for a in c.get(f"{API}/audit").json())


def test_remote_reads_split_a_request_the_server_finds_too_large(world, monkeypatch) -> None:
    """A store of large chunks can exceed what one answer may carry: the CLI's source
    asks again in halves, and the file still reads back whole."""
    from strata.cli.admin_client import AdminClient
    from strata.cli.snapshot_source import AdminSnapshotSource
    from strata.engine.snapshot_tree import SnapshotTree

    monkeypatch.setattr(snapshots, "MAX_STREAM_BYTES", 200_000)  # a few chunks' worth
    admin = AdminClient("http://testserver", None)
    with AdminSnapshotSource(admin, world.ep, "latest", http=world.client) as src:
        snap = src.snapshot()
        tree = SnapshotTree(snap.manifest, src.load_chunks)
        ino = tree.resolve("docs/deep/big.bin")
        assert tree.read(ino, 0, 1 << 20) == (world.src / "docs/deep/big.bin").read_bytes()
    assert tree.cache.stats.requests == 1  # one call of load_chunks, several requests in it


# -- the CLI against a real server -------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from server_fixtures import Agent, running_server

    base = tmp_path_factory.mktemp("fleet")
    for srv in running_server(base / "server"):
        root = base / "root"
        root.mkdir()
        build_sample(root, random.Random(21))
        (root / ODD).mkdir()
        (root / ODD / "inner.txt").write_bytes(b"odd")
        agent = Agent(srv, root, base / "state")
        agent.enroll(srv.create_token())
        out = agent.backup()
        yield SimpleNamespace(server=srv, agent=agent, root=root, base=base,
                              snapshot=out["result"]["snapshot"])


@pytest.mark.e2e
def test_cli_lists_a_folder(fleet) -> None:
    ep = fleet.agent.endpoint_id
    out = fleet.server.admin_cli("endpoint", "files", ep[:8], "docs").stdout
    assert "a.txt" in out and "deep/" in out and "dangling -> ../../nowhere" in out
    import json

    doc = json.loads(fleet.server.admin_cli("endpoint", "files", ep, "docs/deep", "--snapshot",
                                            fleet.snapshot[:8], "--json").stdout)
    assert [e["name"] for e in doc["entries"]] == ["big.bin", "er"]
    odd = fleet.server.admin_cli("endpoint", "files", ep, ODD).stdout
    assert "inner.txt" in odd
    bad = fleet.server.admin_cli("endpoint", "files", ep, "../etc", rc=2)
    assert "invalid path" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
def test_cli_exports_to_a_folder_and_a_tar(fleet) -> None:
    ep, srv, base = fleet.agent.endpoint_id, fleet.server, fleet.base
    srv.admin_cli("endpoint", "export", ep, "--snapshot", "latest", "--to", base / "dir")
    lib_restore(srv.data / "store", fleet.snapshot, base / "restored")
    assert tree_state(base / "dir") == tree_state(base / "restored")
    srv.admin_cli("endpoint", "export", ep, "--snapshot", fleet.snapshot, "--to",
                  base / "docs.tar", "--path", "docs")
    (base / "fromtar").mkdir()
    subprocess.run(["tar", "--xattrs", "-xf", base / "docs.tar", "-C", base / "fromtar"],
                   check=True)
    assert tree_state(base / "fromtar" / "docs") == tree_state(base / "dir" / "docs")
    # Overwriting asks first; without a terminal, only --yes does it.
    again = srv.admin_cli("endpoint", "export", ep, "--snapshot", "latest", "--to",
                          base / "docs.tar", rc=2)
    assert "--yes" in again.stderr
    srv.admin_cli("endpoint", "export", ep, "--snapshot", "latest", "--to", base / "dir",
                  rc=2)
    srv.admin_cli("endpoint", "export", ep, "--snapshot", "latest", "--to", base / "docs.tar",
                  "--path", "docs/deep", "--yes")
    assert "docs/deep/big.bin" in tarfile.open(base / "docs.tar").getnames()
    assert not list(base.glob(".*.part"))


@pytest.mark.e2e
def test_cli_mounts_an_endpoints_snapshot_through_the_server(fleet, tmp_path: Path) -> None:
    from test_mount import Mounted, fuse_usable

    if fuse_usable():
        pytest.skip(fuse_usable())
    srv = fleet.server
    (tmp_path / "mnt").mkdir()
    ep = fleet.agent.endpoint_id
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, message in [((ep, tmp_path / "mnt", "--snapshot", "ffffffff"), "no snapshot"),
                          (("nobody", tmp_path / "mnt"), "no endpoint"),
                          ((ep, tmp_path / "full"), "is not empty"),
                          ((ep, tmp_path / "absent"), "does not exist")]:
        bad = srv.admin_cli("endpoint", "mount", *args, rc=2)
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    m = Mounted("--server", srv.url, "--admin-token-file", srv.token_file,
                fleet.agent.endpoint_id, tmp_path / "mnt", command=("endpoint", "mount"))
    try:
        lib_restore(srv.data / "store", fleet.snapshot, tmp_path / "restored")
        assert tree_state(tmp_path / "mnt") == tree_state(tmp_path / "restored")
        assert os.path.ismount(tmp_path / "mnt")
        rc, out, err = m.stop()
        assert rc == 0, err
        assert "fetched" in out
    finally:
        m.ensure_gone()


@pytest.mark.e2e
def test_export_and_mount_trust_the_server_as_every_admin_command_does(tmp_path: Path) -> None:
    """Over HTTPS with the server's own certificate: refused in one line unless trusted
    (--ca-cert), then the request reaches the server (which knows no such endpoint)."""
    from server_fixtures import Server, strata

    srv = Server(tmp_path / "data", signing=False, tls=True).start()
    try:
        base = ("--server", srv.url, "--admin-token-file", srv.token_file)
        for cmd in (("endpoint", "export", "nobody", "--snapshot", "latest", "--to",
                     tmp_path / "out"),
                    ("endpoint", "export", "nobody", "--snapshot", "latest", "--to",
                     tmp_path / "out.tar")):
            untrusted = strata(*cmd, *base, rc=2)
            assert "not trusted" in untrusted.stderr, untrusted.stderr
            assert len(untrusted.stderr.strip().splitlines()) == 1
            trusted = strata(*cmd, *base, "--ca-cert", srv.data / "tls/cert.pem", rc=2)
            assert "no endpoint 'nobody'" in trusted.stderr, trusted.stderr
    finally:
        srv.stop()
