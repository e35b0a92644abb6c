"""The generated OS tree (generated_trees.os_tree) is deterministic, of its budget, laid out
like a Debian /usr, and compresses and dedups like real files: what the tests that
centralize, capture and migrate it rely on."""

from __future__ import annotations

import os
from pathlib import Path

import zstandard

from generated_trees import OS_MAX_FILE, full_state, os_tree
from strata.store.chunker import Chunker, ChunkerParams

MIB = 1 << 20


def test_the_same_seed_and_budget_give_the_same_tree(tmp_path: Path):
    assert os_tree(tmp_path / "a", 3 * MIB) == 3 * MIB
    umask = os.umask(0o002)  # another machine's
    try:
        os_tree(tmp_path / "b", 3 * MIB)
    finally:
        os.umask(umask)
    os_tree(tmp_path / "c", 3 * MIB, seed=1)
    a = full_state(tmp_path / "a")
    assert a == full_state(tmp_path / "b")  # names, bytes, modes, owners, mtimes
    assert a != full_state(tmp_path / "c")
    assert a["etc/os-release"][-1].startswith(b"ID=stratatest\n")


def test_an_os_tree_compresses_and_dedups_like_a_debian_usr(tmp_path: Path):
    budget = 12 * MIB
    os_tree(tmp_path, budget)
    files = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.is_symlink()]
    sizes = sorted(p.stat().st_size for p in files if p.parts[-2] != "etc")
    assert sum(sizes) == budget
    assert sizes[len(sizes) // 2] < 16 << 10 and sizes[-1] > MIB and sizes[-1] <= OS_MAX_FILE
    for d in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib/python3/dist-packages",
              "usr/share/doc", "usr/share/man/man1", "usr/include"):
        assert (tmp_path / d).is_dir(), d
    links = [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert links and all(p.resolve().is_file() and "/" not in os.readlink(p) for p in links)

    # Per kind, what zstd -3 makes of their content-defined chunks, and how many chunk
    # bytes are unique.
    chunker, zstd = Chunker(ChunkerParams()), zstandard.ZstdCompressor(level=3)
    raw: dict[str, int] = {}
    packed: dict[str, int] = {}
    seen: set[bytes] = set()
    unique = 0
    for p in files:
        data = p.read_bytes()
        kind = "elf" if data[:4] == b"\x7fELF" else "gz" if data[:2] == b"\x1f\x8b" \
            else "text" if p.suffix in ("", ".py", ".h", ".conf") else "other"
        for c in map(bytes, chunker.cut(data)):
            raw[kind] = raw.get(kind, 0) + len(c)
            packed[kind] = packed.get(kind, 0) + len(zstd.compress(c))
            if c not in seen:
                seen.add(c)
                unique += len(c)
    ratio = {k: raw[k] / packed[k] for k in raw}
    assert 2.7 < ratio["text"] < 6, ratio
    assert 2.0 < ratio["elf"] < 3.2, ratio
    assert ratio["gz"] < 1.01, ratio
    assert 0.55 < raw["elf"] / budget < 0.85, raw
    assert 0.9 < unique / budget < 1.0, unique / budget
