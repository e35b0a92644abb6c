"""An endpoint's snapshot read through the admin API: its manifest, its chunks (each
verified against its id here), and streamed downloads. What `strata endpoint mount`
and `strata endpoint export` read from; a `ChunkSource` for the restore engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

from strata.errors import CorruptData, StrataError
from strata.model.entry import Entry
from strata.model.manifest import decode_manifest
from strata.model.snapshot_files import MAX_CHUNKS
from strata.model.transfer import read_bundle
from strata.store.pack import decode_payload
from strata.transport import describe_transport_error

from .admin_client import API, AdminClient, error_detail, path_part, snapshot_path


@dataclass
class RemoteSnapshot:
    id: str
    manifest: bytes
    time: str = ""  # ISO 8601, as the server recorded it


class Refused(StrataError):
    """The server answered with an error status (`status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminSnapshotSource:
    """One snapshot of one endpoint, over one HTTP connection kept open (`http`: another
    client to the same API, for tests)."""

    def __init__(self, admin: AdminClient, endpoint: str, snapshot: str = "latest",
                 http: httpx.Client | None = None) -> None:
        self._admin = admin
        self._endpoint = path_part(endpoint, "endpoint id")
        self._ref = path_part(snapshot or "latest", "snapshot")
        # The same trust as every admin command (--ca-cert, --server-fingerprint).
        self._http = http or httpx.Client(
            base_url=admin.server.rstrip("/"), timeout=120, verify=admin.verify,
            headers={"Authorization": f"Bearer {admin.token}"})
        self.bytes_received = 0

    def __enter__(self) -> AdminSnapshotSource:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._http.close()

    def _url(self, what: str) -> str:
        return f"{API}/endpoints/{self._endpoint}/snapshots/{self._ref}/{what}"

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if not 200 <= resp.status_code < 300:
            resp.read()
            try:
                detail = error_detail(resp.json())
            except ValueError:
                detail = resp.text[:200].strip()
            raise Refused(resp.status_code, f"server refused ({resp.status_code}): "
                                            f"{detail or resp.reason_phrase}")
        return resp

    def _send(self, method: str, url: str, **kw: object) -> httpx.Response:
        try:
            resp = self._http.request(method, url, **kw)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise StrataError(describe_transport_error(self._admin.server, exc)) from None
        self.bytes_received += len(resp.content)
        return self._check(resp)

    def snapshot(self) -> RemoteSnapshot:
        """The manifest; later chunk requests name the snapshot by the id it answered
        with, so a `latest` that moves meanwhile does not mix two snapshots."""
        resp = self._send("GET", self._url("manifest"))
        sid = resp.headers.get("X-Strata-Snapshot", "")
        if len(sid) != 64:
            raise StrataError(f"{self._admin.server} did not name the snapshot: is it a "
                              "Strata server of this version?")
        self._ref = sid
        return RemoteSnapshot(sid, resp.content, resp.headers.get("X-Strata-Snapshot-Time", ""))

    def iter_manifest(self, snap: RemoteSnapshot) -> Iterator[Entry]:
        return decode_manifest([snap.manifest])

    def load_chunks(self, ids: list[bytes]) -> list[bytes | CorruptData]:
        got: dict[bytes, bytes | CorruptData] = {}
        for start in range(0, len(ids), MAX_CHUNKS):
            self._fetch(list(dict.fromkeys(ids[start:start + MAX_CHUNKS])), got)
        return [got.get(c, CorruptData(f"server did not send chunk {c.hex()[:16]}"))
                for c in ids]

    def _fetch(self, part: list[bytes], got: dict[bytes, bytes | CorruptData]) -> None:
        try:
            resp = self._send("POST", self._url("chunks"), json={"ids": [c.hex() for c in part]})
        except Refused as exc:
            # More bytes than one answer may carry (a store of large chunks): in halves.
            if exc.status != 413 or len(part) == 1:
                raise
            half = len(part) // 2
            self._fetch(part[:half], got)
            self._fetch(part[half:], got)
            return
        for cid, raw_length, payload in read_bundle(resp.content):
            try:
                got[cid] = decode_payload(cid, payload, raw_length)  # verified here
            except CorruptData as exc:
                got[cid] = exc

    def download(self, path: str, fmt: str | None, target: Path) -> int:
        """Stream a file or an archive into `target` (written beside it, then renamed
        into place: an interrupted download leaves no half file under that name)."""
        params = snapshot_path(path)
        if fmt:
            params["format"] = fmt
        part = target.with_name(f".{target.name}.part")
        written = 0
        try:
            with self._http.stream("GET", self._url("download"), params=params) as resp:
                self._check(resp)
                with open(part, "wb") as out:
                    for piece in resp.iter_bytes():
                        out.write(piece)
                        written += len(piece)
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(part, target)
        except httpx.TransportError as exc:
            raise StrataError("download failed: "
                              + describe_transport_error(self._admin.server, exc)) from None
        finally:
            part.unlink(missing_ok=True)
        self.bytes_received += written
        return written
