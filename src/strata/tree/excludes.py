"""Decide which paths of a tree a backup leaves out, from a list of shell-style patterns.

Patterns (matched with fnmatch rules, case-sensitively, on the bytes of tree-relative
paths such as b"home/ann/.cache"; patterns are encoded with os.fsencode):

* No '/' in the pattern (``*.tmp``, ``__pycache__``): matches the basename of a path
  at any depth.
* Leading '/' (``/var/cache``, ``/home/*/.cache``): anchored at the tree root, matched
  against the whole relative path.
* Any other '/' (``.git/objects``): matches the whole relative path or any suffix of it
  that starts at a component boundary (``x/.git/objects`` matches too).
* A trailing '/' (``build/``, ``/tmp/``) restricts the pattern to directories.

As with fnmatch, ``*`` and ``?`` also match '/' (``/home/*/.cache`` matches
``home/a/b/.cache``). An excluded directory stands for its whole subtree: the scanner does
not descend into it, so `excluded` only judges the path it is given, not its ancestors.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable


def _translate(pat: bytes) -> bytes:
    # fnmatch only translates str; latin-1 maps every byte to one code point and back.
    return fnmatch.translate(pat.decode("latin-1")).encode("latin-1")


def _compile(parts: list[bytes]) -> re.Pattern[bytes] | None:
    if not parts:
        return None
    return re.compile(b"|".join(b"(?:" + p + b")" for p in parts))


class ExcludeMatcher:
    """Compiled exclude patterns; `excluded(relpath, is_dir)` answers for one path."""

    def __init__(self, patterns: Iterable[str]):
        self.patterns = list(patterns)
        base: dict[bool, list[bytes]] = {False: [], True: []}
        path: dict[bool, list[bytes]] = {False: [], True: []}
        for raw in self.patterns:
            pat = os.fsencode(raw)
            dir_only = pat.endswith(b"/")
            pat = pat.rstrip(b"/")
            if not pat:
                raise ValueError(f"empty exclude pattern: {raw!r}")
            if pat.startswith(b"/"):
                path[dir_only].append(_translate(pat.lstrip(b"/")))
            elif b"/" in pat:
                path[dir_only].append(b"(?s:(?:.*/)?)" + _translate(pat))
            else:
                base[dir_only].append(_translate(pat))
        # One alternation per (kind, applies-to-dirs) so a path costs at most two matches.
        self._base_file = _compile(base[False])
        self._base_dir = _compile(base[False] + base[True])
        self._path_file = _compile(path[False])
        self._path_dir = _compile(path[False] + path[True])

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, relpath: bytes, is_dir: bool) -> bool:
        """True when `relpath` (tree-relative, '/'-separated) matches a pattern."""
        base_re = self._base_dir if is_dir else self._base_file
        if base_re is not None and base_re.match(relpath.rpartition(b"/")[2]):
            return True
        path_re = self._path_dir if is_dir else self._path_file
        return path_re is not None and path_re.match(relpath) is not None
