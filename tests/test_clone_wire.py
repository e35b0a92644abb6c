"""A clone of a known endpoint (its disk copied with the agent's state directory, enrolled
again with `--force`) puts at most 0.2% of its tree on the wire when it centralizes: it
holds what the original held, its manifest is byte for byte the original's (no inode or
ctime in it), and the agent does not ask about the chunks of its last snapshot. A disk
clone enrolled from scratch still sends its manifest: another endpoint's is not its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from generated_trees import build_base, copy_tree
from server_fixtures import (
    MIB,
    Agent,
    Server,
    centralized,
    random_tree,
    running_server,
    strata_json,
    tree_bytes,
)

pytestmark = pytest.mark.e2e

TARGET = 0.002


@pytest.fixture
def server(tmp_path: Path):
    yield from running_server(tmp_path / "server-data")


def test_clone_of_a_known_endpoint_sends_under_two_per_mille(server: Server, tmp_path: Path):
    root = tmp_path / "endpoint-1"
    build_base(root, 1)
    # Application files: many small ones, so the per-chunk cost of the protocol shows.
    random_tree(root, 24 * MIB, seed=5, sizes=(8 << 10, 160 << 10), sub="opt/app/lib")
    size = tree_bytes(root)
    first = Agent(server, root, tmp_path / "state-1")
    first.enroll(server.create_token())
    one = centralized(first.backup())
    assert one["bytes_uploaded"] > 0

    clone_root, clone_state = tmp_path / "clone", tmp_path / "state-clone"
    copy_tree(root, clone_root)  # new inodes and ctimes
    shutil.copytree(first.state, clone_state)
    clone = Agent(server, clone_root, clone_state)
    enrolled = strata_json(*clone.enroll_cmd(server.create_token()), "--force")
    assert enrolled["replaced"] == first.endpoint_id
    r = centralized(clone.backup())
    print(f"\nclone: tree {size:,} B, sent {r['bytes_sent']:,} B "
          f"({r['bytes_sent'] / size:.4%}), read {r['bytes_read']:,} B")
    assert r["files_changed"] == r["files"] == one["files"]  # every file read again
    assert r["bytes_uploaded"] == 0 and r["chunks_proven"] == 0
    assert r["bytes_sent"] <= TARGET * size, r
    assert r["snapshot"] != one["snapshot"]
    assert clone.snapshots()[0]["id"] == r["snapshot"]

    # Enrolled from scratch, the same disk holds nothing yet: its manifest travels.
    fresh = Agent(server, clone_root, tmp_path / "state-fresh")
    fresh.enroll(server.create_token())
    f = centralized(fresh.backup())
    assert f["bytes_uploaded"] > 0 and f["chunks_proven"] > 0
    assert f["bytes_sent"] > r["bytes_sent"]



def test_next_snapshot_sends_its_manifest_as_a_delta(server: Server, tmp_path: Path):
    """Files changed here and there touch most of a manifest's chunks; sent as a delta
    against the last manifest, only the change travels."""
    root = tmp_path / "endpoint"
    build_base(root, 1)
    random_tree(root, 8 * MIB, seed=7, sizes=(1 << 10, 5 << 10), sub="opt/app/lib")
    agent = Agent(server, root, tmp_path / "state")
    agent.enroll(server.create_token())
    first = centralized(agent.backup())
    manifest = (agent.state / "parent.manifest").stat().st_size
    assert manifest > 150_000  # several chunks' worth of entries
    before = server.metric("strata_manifest_deltas_total")
    files = sorted((root / "opt/app/lib").iterdir())
    for f in files[::max(1, len(files) // 12)]:  # a dozen files across the tree
        with f.open("r+b") as fh:
            fh.write(b"changed")
    r = centralized(agent.backup())
    print(f"\nnext snapshot: manifest {manifest:,} B, sent {r['bytes_sent']:,} B, of which "
          f"chunks {r['bytes_uploaded']:,} B")
    assert server.metric("strata_manifest_deltas_total") == before + 1
    assert r["snapshot"] != first["snapshot"]
    # the changed files' chunks, and a few kilobytes for the manifest and the protocol
    assert r["bytes_sent"] - r["bytes_uploaded"] < 32 << 10, r
    got = agent.restore("opt/app/lib", to=tmp_path / "out")
    assert not got["errors"]
    for f in files:
        assert (tmp_path / "out/opt/app/lib" / f.name).read_bytes() == f.read_bytes()
