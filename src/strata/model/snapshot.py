"""Snapshot records: an immutable point-in-time description of one tree."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from strata.errors import CorruptData
from strata.model.ids import ID_LEN, content_id


@dataclass
class Snapshot:
    time: str  # ISO 8601, UTC
    host: str
    paths: list[str]
    manifest: list[tuple[str, int]]  # manifest chunk ids (hex) and lengths
    manifest_id: str  # BLAKE3 of the whole serialized manifest
    tags: list[str] = field(default_factory=list)
    parent: str | None = None
    trigger: str = "user"  # user, scheduled, pre-update, pre-restore
    stats: dict[str, Any] = field(default_factory=dict)
    id: str = ""  # derived from the record's bytes; not serialized

    @property
    def short_id(self) -> str:
        return self.id[:8]

    @property
    def datetime(self) -> datetime:
        return datetime.fromisoformat(self.time)

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc.pop("id")
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def compute_id(self) -> str:
        return content_id(self.to_bytes()).hex()

    @classmethod
    def from_bytes(cls, data: bytes, sid: str) -> Snapshot:
        try:
            doc = json.loads(data)
            snap = cls(**doc)
            snap.manifest = [(str(h), int(n)) for h, n in snap.manifest]
            for h, _ in snap.manifest:
                if len(bytes.fromhex(h)) != ID_LEN:
                    raise ValueError("manifest chunk id")
        except (ValueError, TypeError) as exc:
            raise CorruptData(f"snapshot {sid[:8]} is malformed ({exc})") from None
        snap.id = sid
        return snap

    def manifest_chunk_ids(self) -> list[bytes]:
        return [bytes.fromhex(h) for h, _ in self.manifest]


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
