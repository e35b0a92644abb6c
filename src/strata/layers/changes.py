"""One step of turning an endpoint's tree into its target: the unit a plan lists and the
apply journal carries out."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from strata.model.entry import Entry


class Action(StrEnum):
    ADD = "add"  # the path does not exist on the endpoint: create it
    REPLACE = "replace"  # it exists with other content or type: swap it whole
    META = "meta"  # same content: only mode, owner, mtime or xattrs change
    DELETE = "delete"  # remove it (a directory only once it is empty)


@dataclass(slots=True)
class Change:
    action: Action
    path: bytes  # tree-relative, validated like every manifest path
    entry: Entry | None  # the target entry (None for DELETE)
    old: Entry | None = None  # what the endpoint had (None for ADD)
    reason: str = ""  # which layer asks for it, or why it goes ("base debian:2", ...)
    # Bytes computed on the endpoint (a merged account database), not chunks of a layer.
    # `entry` names them as one chunk (their BLAKE3), so the apply's data source serves
    # them like any other file's and the journal writes them under the same crash-safety.
    content: bytes | None = None
