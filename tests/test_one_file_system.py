"""Backups stay on one file system when asked (`store backup -x`; the agent's default for
`--root /`, or `agent enroll --one-file-system`): a tmpfs, an NFS share or a USB disk
mounted inside the tree is not uploaded; its mount point stays, empty, and is reported.
`/mnt/` and `/media/` are in the default upload exclusions.

With root, real tmpfs mounts are used; the walk itself is also tested by standing in
another device id at its seam (`strata.tree.scan.device_of`), which needs no privilege.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_fixtures import Agent, centralized, running_server, strata
from strata.agent.drift import tree_changed
from strata.agent.state import Credential
from strata.engine.backup import backup
from strata.server.policies import DEFAULTS
from strata.store.repository import Store
from strata.tree import scan
from strata.tree.scan import scan_tree


def make_tree(root: Path) -> Path:
    (root / "home/ann").mkdir(parents=True)
    (root / "home/ann/doc.txt").write_text("mine\n")
    mount = root / "home/ann/share"
    mount.mkdir()
    return mount


def paths(root: Path, **kw: object) -> list[str]:
    return [e.path.decode() for e, _ in scan_tree(root, **kw)]  # type: ignore[arg-type]


def test_the_walk_does_not_enter_another_device(tmp_path, monkeypatch):
    mount = make_tree(tmp_path)
    (mount / "remote.bin").write_bytes(b"on the share")
    (mount / "deeper").mkdir()
    other = os.stat(mount).st_ino
    real = scan.device_of
    monkeypatch.setattr(scan, "device_of", lambda st: 4242 if st.st_ino == other
                        else real(st))
    assert "home/ann/share/remote.bin" in paths(tmp_path)  # crossing is the default
    mounts: list[str] = []
    assert paths(tmp_path, one_file_system=True, mounts=mounts) == [
        "home", "home/ann", "home/ann/doc.txt", "home/ann/share"]
    assert mounts == ["home/ann/share"]


def test_the_agent_stays_on_the_root_file_system_for_root_slash():
    cred = Credential(server="s", endpoint_id="e", credential="c", root="/")
    assert cred.stays_on_root_fs
    assert not Credential(server="s", endpoint_id="e", credential="c",
                          root="/srv/vm-root").stays_on_root_fs
    assert Credential(server="s", endpoint_id="e", credential="c", root="/srv/vm-root",
                      one_file_system=True).stays_on_root_fs
    assert not Credential(server="s", endpoint_id="e", credential="c", root="/",
                          one_file_system=False).stays_on_root_fs


def test_mnt_and_media_are_excluded_by_default():
    linux = DEFAULTS["upload"]["exclusions"]["linux"]
    assert "/mnt/" in linux and "/media/" in linux


# -- real mounts ---------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path) -> Iterator[Path]:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "strata-test", where],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
e2e = pytest.mark.e2e


@e2e
@needs_root
def test_store_backup_x_leaves_a_mounted_tmpfs_out(tmp_path, cli):
    src = tmp_path / "src"
    mount = make_tree(src)
    with tmpfs(mount):
        (mount / "scratch.bin").write_bytes(b"x" * 100_000)
        with Store.init(tmp_path / "st") as store:
            crossed = backup(store, src)
            stayed = backup(store, src, one_file_system=True)
            names = [e.path for e in store.iter_manifest(store.load_snapshot(stayed.snapshot))]
        assert crossed.mounts_skipped == [] and crossed.bytes_total >= 100_000
        assert stayed.mounts_skipped == ["home/ann/share"]
        assert b"home/ann/share" in names and b"home/ann/share/scratch.bin" not in names
        assert stayed.bytes_total == len("mine\n")
        out = cli.run("backup", str(tmp_path / "st"), str(src), "-x")
        assert out.returncode == 0, out.stderr
        assert "not crossed into another file system: home/ann/share" in out.stdout


@e2e
@needs_root
def test_agent_enrolled_with_one_file_system_does_not_upload_a_mount(tmp_path):
    for server in running_server(tmp_path / "server"):
        root = tmp_path / "endpoint"
        mount = make_tree(root)
        with tmpfs(mount):
            (mount / "ramdisk.bin").write_bytes(b"r" * 200_000)
            agent = Agent(server, root, tmp_path / "state")
            enrolled = json.loads(strata(*agent.enroll_cmd(server.create_token()),
                                         "--one-file-system", "--json").stdout)
            assert enrolled["state"] == "active"
            r = centralized(agent.run_once())
            assert r["mounts_skipped"] == ["home/ann/share"]
            assert r["bytes_total"] == len("mine\n")
            out = tmp_path / "browse"
            agent.restore("home", to=out)
            assert (out / "home/ann/share").is_dir()
            assert list((out / "home/ann/share").iterdir()) == []
            # What changes on the mount is not a change of the endpoint's tree.
            _, manifest = agent_parent(agent)
            (mount / "ramdisk.bin").write_bytes(b"changed")
            assert not tree_changed(root, [], manifest, one_file_system=True)
            assert tree_changed(root, [], manifest)


def agent_parent(agent: Agent) -> tuple[str, bytes]:
    from strata.agent.state import AgentState

    sid, manifest = AgentState(agent.state).parent()
    assert sid is not None and manifest is not None
    return sid, manifest
