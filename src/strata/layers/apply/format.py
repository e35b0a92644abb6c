"""What an apply keeps on disk in its work directory: the phase file (how far it got) and
the journal (every operation of the switch, with the metadata to set and to put back).

    phase      {"phase": "switching"} (JSON): no phase file = nothing pending
    journal    msgpack, written once, complete, before the switch starts
    stage/N    operation N's new object until it moves in
    backup/N   what operation N moved out of the tree, until the apply is finished
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from strata.model.entry import Entry
from strata.tree.meta import Meta

PHASE, JOURNAL, STAGE, BACKUP = "phase", "journal", "stage", "backup"
_VERSION = 2  # 1: operations and metadata as positional lists (still read)


class Phase(StrEnum):
    """How far an apply got. Nothing in the tree changes before SWITCHING is on disk."""

    STAGING = "staging"  # writing stage/: discarded by a recovery
    STAGED = "staged"  # stage/ and the journal complete: discarded by a recovery
    SWITCHING = "switching"  # renames under way: a recovery rolls forward
    DONE = "done"  # the new tree is in place: only cleaning up is left
    ROLLING_BACK = "rolling-back"  # a failed switch being undone: a recovery finishes it
    ROLLED_BACK = "rolled-back"  # the old tree is back: only cleaning up is left


class OpKind(StrEnum):
    PUT = "put"  # stage/N moves in (what was there moves to backup/N)
    META = "meta"  # metadata set in place
    DELETE = "delete"  # the path moves to backup/N
    SKIP = "skip"  # nothing to do (already absent, or could not be staged)


class OpAction(StrEnum):
    """The change an operation carries out, as counted in ApplyStats."""

    ADD = "add"
    REPLACE = "replace"
    META = "meta"
    DELETE = "delete"
    MKDIR = "mkdir"  # a missing parent directory the changes lack


@dataclass(slots=True)
class Op:
    kind: OpKind
    path: bytes
    action: OpAction
    is_dir: bool = False  # the target is a directory (its mode and times are set last)
    size: int = 0  # FILE bytes a put brings
    new: Meta | None = None  # target metadata (META ops, directory puts)
    old: Meta | None = None  # metadata found before the switch (META ops)
    n: int = 0  # index: the name under stage/ and backup/
    entry: Entry | None = None  # only while staging (not written to the journal)

    @property
    def name(self) -> bytes:
        return b"%d" % self.n


@dataclass
class Journal:
    ops: list[Op] = field(default_factory=list)
    # Old (atime_ns, mtime_ns) of every existing directory the switch renames things in or
    # out of: renames move them, a rollback puts them back.
    times: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    owner: bool = False  # set owners (the agent runs as root)
    warnings: list[str] = field(default_factory=list)  # from staging

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": _VERSION, "owner": self.owner, "warnings": self.warnings,
            "times": [[p, a, m] for p, (a, m) in self.times.items()],
            "ops": [{"n": op.n, "kind": op.kind.value, "path": op.path,
                     "action": op.action.value, "dir": op.is_dir, "size": op.size,
                     "new": _encode_meta(op.new), "old": _encode_meta(op.old)}
                    for op in self.ops]}, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> Journal:
        """Raises ValueError, TypeError or KeyError for anything but a journal."""
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        version = doc.get("v")
        if version == 1:
            ops = [_op_v1(row) for row in doc["ops"]]
        elif version == _VERSION:
            ops = [Op(OpKind(r["kind"]), _bytes(r["path"]), OpAction(r["action"]),
                      bool(r["dir"]), _int(r["size"]), _decode_meta(r["new"]),
                      _decode_meta(r["old"]), _int(r["n"])) for r in doc["ops"]]
        else:
            raise ValueError(f"journal version {version!r}")
        return cls(ops=ops, times={_bytes(p): (_int(a), _int(m)) for p, a, m in doc["times"]},
                   owner=bool(doc["owner"]), warnings=[str(w) for w in doc["warnings"]])


def encode_phase(phase: Phase) -> bytes:
    return json.dumps({"phase": phase.value}).encode()


def decode_phase(raw: bytes) -> Phase:
    """Raises ValueError, TypeError or KeyError for anything but a known phase."""
    return Phase(json.loads(raw)["phase"])


def _encode_meta(m: Meta | None) -> dict | None:
    if m is None:
        return None
    return {"mode": m.mode, "uid": m.uid, "gid": m.gid, "atime": m.atime_ns,
            "mtime": m.mtime_ns, "xattrs": sorted(m.xattrs.items())}


def _decode_meta(v: Any) -> Meta | None:
    if v is None:
        return None
    return Meta(_int(v["mode"]), _int(v["uid"]), _int(v["gid"]), _int(v["atime"]),
                _int(v["mtime"]), {_bytes(k): _bytes(x) for k, x in v["xattrs"]})


def _meta_v1(v: Any) -> Meta | None:
    if v is None:
        return None
    mode, uid, gid, atime, mtime, xattrs = v
    return Meta(_int(mode), _int(uid), _int(gid), _int(atime), _int(mtime),
                {_bytes(k): _bytes(x) for k, x in xattrs.items()})


def _op_v1(row: list) -> Op:
    n, kind, path, action, is_dir, size, new, old = row
    return Op(OpKind(kind), _bytes(path), OpAction(action), bool(is_dir), _int(size),
              _meta_v1(new), _meta_v1(old), _int(n))


def _int(v: Any) -> int:
    if type(v) is not int:
        raise TypeError(f"expected an integer, found {type(v).__name__}")
    return v


def _bytes(v: Any) -> bytes:
    if not isinstance(v, bytes):
        raise TypeError(f"expected bytes, found {type(v).__name__}")
    return v
