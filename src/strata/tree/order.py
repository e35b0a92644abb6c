"""The canonical order of tree paths: a directory, then its subtree, siblings by name bytes.

Scans yield entries in this order and manifests and diffs are sorted by it, so two trees
can be compared with a single merge pass.
"""

from __future__ import annotations


def path_key(p: bytes) -> tuple[bytes, ...]:
    """Sort key putting b"a" < b"a/z" < b"a-b" (plain bytes order would put b"a-b" first)."""
    return tuple(p.split(b"/"))
