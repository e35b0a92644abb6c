"""`strata store mount`: a snapshot as a read-only FUSE filesystem, served in the
foreground, equal to a restore of it, fetching only what is read."""

from __future__ import annotations

import errno
import os
import random
import re
import selectors
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import tree_state
from server_fixtures import spawn
from snapshot_samples import build_sample
from strata.engine.snapshot_tree import SnapshotTree

# pyfuse3 is an optional extra (`make venv` takes it when libfuse3-dev is installed): without
# it these tests are skipped, except in CI, which installs it and sets STRATA_REQUIRE_FUSE.
if not os.environ.get("STRATA_REQUIRE_FUSE"):
    pytest.importorskip("pyfuse3", reason="pyfuse3 is not installed "
                        "(apt-get install fuse3 libfuse3-dev pkg-config, then make venv)")
from strata.mount.fuse import MountError, check_fuse, check_mountpoint  # noqa: E402
from strata.store.repository import Store

# Each test runs `strata … mount` as a process of its own.
pytestmark = pytest.mark.e2e
STATS = re.compile(r"fetched (\d+) chunks \((.+?)\) in (\d+) request")


def fuse_usable() -> str:
    try:
        check_fuse()
    except MountError as exc:
        return str(exc)
    return ""


needs_fuse = pytest.mark.skipif(bool(fuse_usable()), reason=fuse_usable() or "FUSE")


class Mounted:
    """A `strata store mount` process, ready once it printed its 'mounted' line."""

    def __init__(self, *args: object, command: tuple[str, ...] = ("store", "mount")) -> None:
        self.mountpoint = Path(str(args[-1]))
        self.proc = spawn(*command, *args)
        line = self._line(60)
        assert line.startswith("mounted "), (line, self.proc.stderr.read()
                                              if self.proc.poll() is not None else "")
        assert os.path.ismount(self.mountpoint)

    def _line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.proc.kill()
            raise AssertionError("the mount did not report ready")
        return self.proc.stdout.readline()

    def stop(self, how: str = "signal") -> tuple[int, str, str]:
        if how == "signal":
            self.proc.send_signal(signal.SIGINT)
        else:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err

    def ensure_gone(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)


@pytest.fixture
def mounts() -> Iterator[list[Mounted]]:
    started: list[Mounted] = []
    yield started
    for m in started:
        m.ensure_gone()


@pytest.fixture
def sample_store(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    src.mkdir()
    build_sample(src, random.Random(3))
    with Store.init(tmp_path / "store", pack_size=256 << 10) as store:
        from strata.engine.backup import backup

        sid = backup(store, src).snapshot
    return tmp_path / "store", sid


@needs_fuse
def test_mounted_snapshot_equals_its_restore(sample_store, tmp_path: Path, mounts) -> None:
    store, sid = sample_store
    from conftest import lib_restore

    lib_restore(store, sid, tmp_path / "restored")
    (tmp_path / "mnt").mkdir()
    m = Mounted(store, sid[:10], tmp_path / "mnt")
    mounts.append(m)
    got, want = tree_state(tmp_path / "mnt"), tree_state(tmp_path / "restored")
    # Contents, modes, owners, mtimes, symlink targets, xattrs, hardlink groups.
    assert got == want
    assert os.readlink(tmp_path / "mnt" / "link") == "docs/a.txt"
    with pytest.raises(OSError) as err:
        open(tmp_path / "mnt" / "docs" / "a.txt", "r+b")
    assert err.value.errno == errno.EROFS
    with pytest.raises(OSError):
        (tmp_path / "mnt" / "new").write_bytes(b"x")
    rc, out, err_text = m.stop()
    assert rc == 0, err_text
    assert not os.path.ismount(tmp_path / "mnt")
    assert "unmounted" in out and "Traceback" not in err_text


@needs_fuse
def test_reading_one_file_of_a_large_snapshot_fetches_only_its_chunks(
        tmp_path: Path, mounts) -> None:
    rng = random.Random(5)
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i:02d}.bin").write_bytes(rng.randbytes(400_000 + i * 997))
    (src / "many").mkdir()
    for i in range(2500):  # a folder the kernel lists in several calls
        (src / "many" / f"n{i:05d}").write_bytes(b"")
    from strata.engine.backup import backup

    with Store.init(tmp_path / "store") as store:
        snap = store.load_snapshot(backup(store, src).snapshot)
        entry = SnapshotTree.of_store(store, snap).entry(
            SnapshotTree.of_store(store, snap).resolve("d2/f10.bin"))
    own_chunks = len({cid for cid, _ in entry.chunks})
    assert own_chunks >= 4
    (tmp_path / "mnt").mkdir()
    m = Mounted(tmp_path / "store", "latest", tmp_path / "mnt")
    mounts.append(m)
    names = sorted(p.name for p in (tmp_path / "mnt").rglob("*"))  # listing reads no chunk
    assert len(names) == 44 + 2501
    assert sorted(os.listdir(tmp_path / "mnt" / "many")) == sorted(os.listdir(src / "many"))
    data = (tmp_path / "mnt" / "d2" / "f10.bin").read_bytes()
    assert data == (src / "d2" / "f10.bin").read_bytes()
    rc, out, _ = m.stop(how="umount")  # unmounted from outside: the process ends by itself
    assert rc == 0
    fetched = STATS.search(out)
    assert fetched, out
    assert int(fetched.group(1)) == own_chunks  # of a 16 MB snapshot, that file's chunks


@needs_fuse
def test_mount_refusals_are_one_line(sample_store, tmp_path: Path) -> None:
    store, sid = sample_store
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    (tmp_path / "mnt").mkdir()
    for args, message, code in [
        ((store, sid, full), "is not empty", 2),
        ((store, sid, tmp_path / "absent"), "does not exist", 2),
        ((store, "ffffffff", tmp_path / "mnt"), "no snapshot", 2),
        ((tmp_path / "nostore", sid, tmp_path / "mnt"), "no Strata store", 10),
    ]:
        proc = spawn("store", "mount", *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_no_fuse_device_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="FUSE is not available"):
        check_fuse(str(tmp_path / "fuse"))
    (tmp_path / "file").write_text("")
    with pytest.raises(MountError, match="not a folder"):
        check_mountpoint(str(tmp_path / "file"))
    (tmp_path / "mnt").mkdir()
    assert check_mountpoint(f"{tmp_path}/../{tmp_path.name}/mnt/") == str(tmp_path / "mnt")


@needs_fuse
def test_a_large_file_reads_back_whole_through_the_mount(tmp_path: Path, mounts) -> None:
    """24 MiB read in 1 MiB calls: many kernel requests, the read-ahead thread at work,
    a cache smaller than the file (bench/mount.py measures the throughput)."""
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(9).randbytes(24 << 20)
    (src / "big.bin").write_bytes(data)
    from strata.engine.backup import backup

    with Store.init(tmp_path / "store") as store:
        sid = backup(store, src).snapshot
        tree = SnapshotTree.of_store(store, store.load_snapshot(sid))
        chunks = len({c for c, _ in tree.entry(tree.resolve("big.bin")).chunks})
    (tmp_path / "mnt").mkdir()
    m = Mounted("--cache-size", "8MiB", tmp_path / "store", sid, tmp_path / "mnt")
    mounts.append(m)
    with open(tmp_path / "mnt" / "big.bin", "rb") as f:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    rc, out, _ = m.stop()
    assert rc == 0
    fetched = STATS.search(out)
    assert fetched and int(fetched.group(1)) == chunks  # each once, the cache smaller


@needs_fuse
def test_a_dead_mount_is_named_as_such(sample_store, tmp_path: Path, mounts) -> None:
    store, sid = sample_store
    (tmp_path / "mnt").mkdir()
    m = Mounted(store, sid, tmp_path / "mnt")
    mounts.append(m)
    m.proc.kill()  # no chance to unmount: the kernel keeps a mount nobody serves
    m.proc.wait()
    proc = spawn("store", "mount", store, sid, tmp_path / "mnt")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "dead mount" in err and "fusermount3 -u" in err, err


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="reads as another user: needs root")
def test_only_the_mounting_user_reads_unless_allow_other(sample_store, tmp_path: Path,
                                                          mounts) -> None:
    store, sid = sample_store
    # A mountpoint the other user can reach (pytest's own folders are root's, 0700).
    mnt = Path(tempfile.mkdtemp(prefix="strata-mnt-"))
    os.chmod(mnt, 0o755)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat"]
    try:
        for allow, readable in (([], False), (["--allow-other"], True)):
            m = Mounted(*allow, store, sid, mnt)
            mounts.append(m)
            mid = subprocess.run([*nobody, str(mnt / "docs/deep/er/mid.dat")],  # 0644
                                 capture_output=True)
            assert (mid.returncode == 0) is readable, mid.stderr
            script = subprocess.run([*nobody, str(mnt / "script.sh")],  # 0750, root's
                                    capture_output=True)
            assert script.returncode != 0  # the snapshot's own modes still hold
            assert m.stop()[0] == 0
    finally:
        for m in mounts:
            m.ensure_gone()
        mnt.rmdir()


@needs_fuse
def test_a_snapshot_in_an_encrypted_object_store_mounts_too(s3, s3_bucket, tmp_path: Path,
                                                            monkeypatch, mounts) -> None:
    """The mount reads through the store's own interface: S3, encryption and all."""
    from server_fixtures import strata

    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    src, pw = tmp_path / "src", tmp_path / "passphrase"
    src.mkdir()
    build_sample(src, random.Random(4))
    pw.write_text("mount me\n")
    where = f"s3://{s3_bucket}/mounted"
    key = ("--passphrase-file", pw)
    strata("store", "init", where, "--state", tmp_path / "s1", "--encrypt", *key)
    strata("store", "backup", where, src, "--state", tmp_path / "s1", *key)
    strata("store", "restore", where, "latest", tmp_path / "restored", "--state",
           tmp_path / "s2", *key)
    (tmp_path / "mnt").mkdir()
    m = Mounted("--state", tmp_path / "s3", *key, where, "latest", tmp_path / "mnt")
    mounts.append(m)
    assert tree_state(tmp_path / "mnt") == tree_state(tmp_path / "restored")
    assert m.stop()[0] == 0
