"""Restoring a snapshot that may be hostile: into a directory, a restore creates no device
nodes, setuid/setgid bits or file capabilities unless --full-metadata asks for them; a bad
entry is skipped and reported with its path, and everything else is restored. An agent's
in-place restore (its own system) keeps full metadata.

The hostile snapshot is crafted with the store API, as an endpoint that controls its own
manifest could: a device node, a setuid-root file with a capability, '..' paths, a
hardlink out of the target, fields the kernel refuses.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from pathlib import Path

import pytest

from server_fixtures import Agent, centralized, running_server, strata
from strata.engine.backup import backup, store_manifest
from strata.engine.restore import restore
from strata.errors import StrataError
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.manifest import encode_manifest
from strata.model.snapshot import Snapshot, now_iso
from strata.store.repository import Store
from strata.tree import content

pytestmark = pytest.mark.e2e

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privileged metadata needs root")

F, D, L, H = EntryType.FILE, EntryType.DIR, EntryType.SYMLINK, EntryType.HARDLINK
CAP = b"security.capability"
CAP_SETUID = struct.pack("<IIIII", 0x02000001, 1 << 7, 0, 0, 0)  # VFS_CAP_REVISION_2
T = 1_700_000_000_000_000_000
# Entries a restore must skip, each with the words its error line carries.
BAD = {
    "../escape": "'..' component",
    "home/../../escape2": "'..' component",
    "home/user/link-out": "unsafe path",
    "home/user/huge-uid": "not restored",
    "home/user/short": "the data delivered 0 bytes",
}


def crafted_entries() -> list[tuple[Entry, bytes]]:
    def f(path: str, data: bytes, mode: int = 0o644, **kw: object) -> tuple[Entry, bytes]:
        return Entry(path.encode(), F, mode=mode, size=len(data), mtime_ns=T, **kw), data

    def n(path: str, kind: EntryType, mode: int, **kw: object) -> tuple[Entry, bytes]:
        return Entry(path.encode(), kind, mode=mode, mtime_ns=T, **kw), b""

    return [
        f("../escape", b"outside the target"),
        n("bin", D, 0o755),
        f("bin/su", b"#!/bin/sh\necho root\n", 0o4755, xattrs={CAP: CAP_SETUID}),
        f("bin/sg", b"#!/bin/sh\necho staff\n", 0o2755, gid=50),
        n("dev", D, 0o755),
        n("dev/mem", EntryType.CHARDEV, 0o640, rdev=os.makedev(1, 1)),
        n("dev/sda", EntryType.BLOCKDEV, 0o660, rdev=os.makedev(8, 0)),
        n("home", D, 0o755),
        f("home/../../escape2", b"outside too"),
        n("home/shared", D, 0o2775, gid=100),  # a setgid directory passes its group on
        n("home/user", D, 0o700, uid=1000, gid=1000),
        f("home/user/huge-uid", b"x", uid=1 << 40),
        n("home/user/link-out", H, 0o644, link_target=b"../../../etc/passwd"),
        f("home/user/notes.txt", b"my notes", 0o600, uid=1000, gid=1000,
          xattrs={b"user.tag": b"work"}),
        n("home/user/notes-link", L, 0o777, link_target=b"notes.txt", uid=1000, gid=1000),
        (Entry(b"home/user/short", F, mode=0o644, size=-1, mtime_ns=T), b""),
        f("home/user/zz-last", b"restored after all the bad ones"),
    ]


def commit_crafted(store_dir: Path) -> str:
    Store.init(store_dir).close()
    with Store.open(store_dir) as store:
        entries, referenced = [], set()
        for e, data in crafted_entries():
            if e.type is F and data:
                cid = content_id(data)
                store.store_chunk(cid, data)
                e.chunks, e.content_hash = [(cid, len(data))], cid
                referenced.add(cid)
            entries.append(e)
        raw = b"".join(encode_manifest(entries))
        manifest = store_manifest(store, raw)
        snap = Snapshot(time=now_iso(), host="attacker", paths=["/"],
                        manifest=[(c.hex(), n) for c, n in manifest],
                        manifest_id=content_id(raw).hex())
        return store.commit_snapshot(snap, referenced | {c for c, _ in manifest})


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def assert_good_entries_restored(out: Path) -> None:
    notes = out / "home/user/notes.txt"
    assert notes.read_bytes() == b"my notes"
    st = notes.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == \
        (0o600, 1000, 1000, T)
    assert os.getxattr(notes, b"user.tag") == b"work"
    assert os.readlink(out / "home/user/notes-link") == "notes.txt"
    assert os.lstat(out / "home/user/notes-link").st_mtime_ns == T
    assert stat.S_IMODE((out / "home/shared").stat().st_mode) == 0o2775
    assert (out / "home/user/zz-last").read_bytes() == b"restored after all the bad ones"
    assert (out / "bin/su").read_bytes() == b"#!/bin/sh\necho root\n"
    for bad in BAD:  # skipped, and nothing half-written left behind
        assert not os.path.lexists(out / bad)


def assert_nothing_outside(base: Path, expected: set[str]) -> None:
    assert set(os.listdir(base)) == expected
    assert os.stat("/etc/passwd").st_nlink == 1


@needs_root
def test_store_restore_into_a_directory_withholds_privileges(cli, tmp_path):
    store = tmp_path / "store"
    commit_crafted(store)
    base = tmp_path / "restores"
    out = base / "out"
    doc = cli.json("restore", store, "latest", out, rc=1)
    # One error per bad entry, each naming its path; everything else restored.
    assert len(doc["errors"]) == len(BAD), doc["errors"]
    for path, words in BAD.items():
        line = next(e for e in doc["errors"] if path in e)
        assert words in line, line
    assert_good_entries_restored(out)
    assert_nothing_outside(base, {"out"})
    # What grants privileges is not there ...
    assert not os.path.lexists(out / "dev/mem") and not os.path.lexists(out / "dev/sda")
    su, sg = (out / "bin/su").lstat(), (out / "bin/sg").lstat()
    assert stat.S_IMODE(su.st_mode) == 0o755 and su.st_uid == 0
    assert stat.S_IMODE(sg.st_mode) == 0o755 and sg.st_gid == 50  # owners stay (root)
    assert CAP not in os.listxattr(out / "bin/su")
    # ... and the user is told, path by path.
    assert sorted(doc["withheld"]) == [
        "bin/sg: setuid/setgid bits left out",
        "bin/su: setuid/setgid bits and file capabilities left out",
        "dev/mem: device node not created",
        "dev/sda: device node not created",
    ]
    # The human form: one plain line per skipped entry on stderr, and a summary.
    proc = cli.run("restore", store, "latest", base / "out2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == len(BAD) and all(e.startswith("error: ") for e in errors), errors
    assert f"{len(BAD)} skipped" in proc.stdout
    assert "--full-metadata restores them" in proc.stdout


@needs_root
def test_store_restore_with_full_metadata_restores_them(cli, tmp_path):
    store = tmp_path / "store"
    commit_crafted(store)
    out = tmp_path / "out"
    doc = cli.json("restore", store, "latest", out, "--full-metadata", rc=1)
    assert len(doc["errors"]) == len(BAD) and doc["withheld"] == []
    assert_good_entries_restored(out)
    assert_nothing_outside(tmp_path, {"store", "out"})
    su = (out / "bin/su").lstat()
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_uid == 0
    assert os.getxattr(out / "bin/su", CAP) == CAP_SETUID
    assert stat.S_IMODE((out / "bin/sg").lstat().st_mode) == 0o2755
    mem = os.lstat(out / "dev/mem") if os.path.lexists(out / "dev/mem") else None
    if mem is None:  # root without CAP_MKNOD (a container): said so, not an error
        assert any("dev/mem: device node skipped" in w for w in doc["warnings"])
    else:
        assert stat.S_ISCHR(mem.st_mode) and mem.st_rdev == os.makedev(1, 1)


@needs_root
def test_engine_restore_is_safe_unless_asked(tmp_path):
    """The library's default is the safe one: a caller must ask for full metadata."""
    store_dir = tmp_path / "store"
    sid = commit_crafted(store_dir)
    with Store.open(store_dir) as store:
        snap = store.load_snapshot(sid)
        safe = restore(store, snap, tmp_path / "safe", includes=["bin"])
        full = restore(store, snap, tmp_path / "full", includes=["bin"], full_metadata=True)
    assert safe.errors == full.errors == []
    assert stat.S_IMODE((tmp_path / "safe/bin/su").lstat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "full/bin/su").lstat().st_mode) == 0o4755
    assert len(safe.withheld) == 2 and full.withheld == []


@pytest.fixture()
def server(tmp_path: Path):
    yield from running_server(tmp_path / "server")


@needs_root
def test_agent_restore_to_a_directory_is_safe_in_place_is_full(server, tmp_path):
    root = tmp_path / "endpoint"
    (root / "usr/bin").mkdir(parents=True)
    tool = root / "usr/bin/ping"
    tool.write_bytes(b"#!/bin/sh\necho ping\n")
    os.chown(tool, 0, 0)
    os.setxattr(tool, CAP, CAP_SETUID)
    os.chmod(tool, 0o4755)  # after the xattr: setting it keeps the mode
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/doc.txt").write_text("mine\n")
    agent = Agent(server, root, tmp_path / "state")
    agent.enroll(server.create_token())
    centralized(agent.run_once())

    out = tmp_path / "browse"
    doc = agent.restore("usr", "home", to=out)
    assert doc["errors"] == [] and doc["withheld"] == [
        "usr/bin/ping: setuid/setgid bits and file capabilities left out"]
    assert stat.S_IMODE((out / "usr/bin/ping").lstat().st_mode) == 0o755
    assert CAP not in os.listxattr(out / "usr/bin/ping")
    assert (out / "home/ann/doc.txt").read_text() == "mine\n"

    doc = json.loads(strata(*agent.cmd("restore", "usr", "--to", tmp_path / "full",
                                       "--full-metadata", "--json")).stdout)
    assert doc["withheld"] == []
    assert stat.S_IMODE((tmp_path / "full/usr/bin/ping").lstat().st_mode) == 0o4755

    # In place: the endpoint's own system comes back exactly, privileges included.
    tool.unlink()
    doc = agent.restore("usr/bin/ping")
    assert doc["errors"] == [] and doc["withheld"] == []
    st = tool.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o4755 and st.st_uid == 0
    assert os.getxattr(tool, CAP) == CAP_SETUID


def test_a_full_target_stops_the_restore_with_one_error(tmp_path, monkeypatch):
    """Skipping entry after entry would only repeat the same error: a full (or read-only)
    target ends the restore, saying where it stopped."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * 1000)
    calls = []

    def full(fd: int, data: bytes, offset: int | None = None) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    real = content.write_all
    monkeypatch.setattr(content, "write_all", full)
    with Store.init(tmp_path / "store") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        with pytest.raises(StrataError, match=r"No space left on device \(stopped at f2; 2 "
                                              r"files restored\)"):
            restore(store, snap, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["f0", "f1"]  # no half-written f2
