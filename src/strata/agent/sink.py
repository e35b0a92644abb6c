"""The agent's side of the sync protocol, as a ChunkSink for the shared backup engine:
ask the server which chunks it lacks, in batches, prove possession of those it holds
from others (a keyed hash per chunk) and upload only the rest, compressed, in bundles.
Nothing the server acknowledged is ever sent again: after a crash the next run asks
again and the server answers with what is still missing. The server keeps each chunk of
a bundle that reached it whole, so a broken connection costs at most the chunk in flight:
a retry sends only what it still lacks."""

from __future__ import annotations

import threading
from array import array
from bisect import bisect_left
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from strata.agent.client import ServerClient, ServerUnreachable, parse_answer
from strata.agent.resume import BACKOFF_FIRST, BACKOFF_MAX
from strata.engine.filechunks import ChunkStore
from strata.errors import CorruptData
from strata.model.manifest import decode_manifest
from strata.model.possession import MAX_PROOFS, encode_proofs, proof
from strata.model.transfer import BundleWriter
from strata.model.wire import (
    MAX_IDS_PER_QUERY,
    ChunkerSpec,
    MissingResponse,
    ProveResponse,
)
from strata.store.chunker import Chunker, ChunkerParams
from strata.store.crypto import PlainCipher
from strata.store.pack import BlobCodec

BUNDLE_BYTES = 8 << 20  # upload request size: big enough to amortize, small to resume
_QUEUE_CHUNKS = 512  # chunks held back until one "missing?" query covers them all
_QUEUE_BYTES = 16 << 20  # and at most this much of their data


def _kept(data: bytes | memoryview) -> bytes | memoryview:
    """`data` in a form that stays as it is while queued: a view of immutable bytes (a
    small file read whole) as it is; a view of a reused buffer (a large file) copied.
    Copying every chunk cost 1.7 GB of copies made holding the GIL per first backup."""
    if isinstance(data, bytes) or isinstance(data.obj, bytes):
        return data
    return bytes(data)


class HeldChunks:
    """The chunks some manifests name (the endpoint's last snapshot, the layers its desired
    state names), for "does the endpoint hold this already?" without asking the server.
    Built at the first question (a backup that reads no file decodes nothing), as sorted
    8-byte id prefixes: 8 bytes a chunk, so manifests of millions of chunks stay small. A
    prefix that matches another chunk only means that chunk is not asked about; the commit
    then names it as missing and it is sent (commit_with_heal)."""

    def __init__(self, manifests: list[bytes]):
        self._manifests: list[bytes] | None = manifests
        self._prefixes = array("Q")
        self._lock = threading.Lock()

    def _build(self) -> None:
        with self._lock:
            if self._manifests is None:
                return
            found: set[int] = set()
            for manifest in self._manifests:
                try:
                    for e in decode_manifest([manifest]):
                        found.update(int.from_bytes(c[:8], "little") for c, _ in e.chunks)
                except CorruptData:  # a damaged local file: what it names is asked about
                    continue
            self._prefixes = array("Q", sorted(found))
            self._manifests = None

    def __contains__(self, cid: bytes) -> bool:
        if self._manifests is not None:
            self._build()
        key = int.from_bytes(cid[:8], "little")
        i = bisect_left(self._prefixes, key)
        return i < len(self._prefixes) and self._prefixes[i] == key


class RemoteSink(ChunkStore):
    def __init__(self, client: ServerClient, spec: ChunkerSpec, api: str = "/api/v1/agent",
                 held: HeldChunks | None = None):
        self.client = client
        self._held = held  # chunks the endpoint holds already: never asked about
        self.api = api  # the admin API takes uploads too (layers captured from a directory)
        self.chunker = Chunker(ChunkerParams(spec.min_size, spec.avg_size, spec.max_size))
        self.codec = BlobCodec(PlainCipher(), spec.zstd_level)
        self._lock = threading.Lock()
        self._known: set[bytes] = set()  # asked about during this run (held or queued)
        self._queue: list[tuple[bytes, bytes | memoryview]] = []  # (id, raw) awaiting a query
        self._queued_bytes = 0
        self._bundle = BundleWriter()
        # Uploads run beside the scan: at most two bundles wait, so memory stays bounded
        # while the network and the disk both keep busy.
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._upload_slots = threading.Semaphore(2)
        self._uploads: list[Future[Any]] = []
        # Proofs go beside the scan too (the server reads and hashes each proven chunk):
        # at most two batches wait, each holding its chunks' bytes until proven.
        self._prover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prove")
        self._prove_slots = threading.Semaphore(2)
        self._proofs: list[Future[Any]] = []
        self.chunks_uploaded = 0
        self.raw_uploaded = 0  # raw bytes of chunks the server lacked
        self.payload_uploaded = 0  # their compressed size
        self.chunks_proven = 0  # shown to the server by a keyed hash instead of sent

    def _ask(self, ids: list[bytes], retries: int | None = None
             ) -> tuple[set[bytes], dict[bytes, str]]:
        """The chunks the server lacks in this endpoint's view, and those to prove (each
        with the nonce to prove it under)."""
        lacking: set[bytes] = set()
        prove: dict[bytes, str] = {}
        for i in range(0, len(ids), MAX_IDS_PER_QUERY):
            part = ids[i:i + MAX_IDS_PER_QUERY]
            resp = self.client.request("POST", f"{self.api}/chunks/missing",
                                       json={"ids": [c.hex() for c in part]}, retries=retries)
            answer = parse_answer(resp, MissingResponse)
            lacking.update(bytes.fromhex(h) for h in answer.missing)
            prove.update((bytes.fromhex(h), answer.nonce) for h in answer.prove)
        return lacking, prove

    def _prove(self, chunks: list[tuple[bytes, str, bytes | memoryview]]) -> set[bytes]:
        """Prove possession of these (id, nonce, raw bytes) with keyed hashes instead of
        sending them; return those the server refused (to be uploaded instead)."""
        refused: set[bytes] = set()
        for i in range(0, len(chunks), MAX_PROOFS):
            part = chunks[i:i + MAX_PROOFS]
            by_nonce: dict[str, list[tuple[bytes, bytes | memoryview]]] = {}
            for cid, nonce, data in part:
                by_nonce.setdefault(nonce, []).append((cid, data))
            for nonce, items in by_nonce.items():
                body = encode_proofs(nonce, [(c, proof(nonce, d)) for c, d in items])
                resp = self.client.request("POST", f"{self.api}/chunks/prove", content=body)
                answer = parse_answer(resp, ProveResponse)
                refused.update(bytes.fromhex(h) for h in answer.refused)
                self.chunks_proven += answer.accepted
        return refused

    def put_claimed(self, cid: bytes, blob: bytes, raw_length: int) -> int:
        full = None
        with self._lock:
            self._bundle.add(cid, raw_length, blob)
            self.chunks_uploaded += 1
            self.raw_uploaded += raw_length
            self.payload_uploaded += len(blob)
            if self._bundle.size >= BUNDLE_BYTES:
                full, self._bundle = self._bundle, BundleWriter()
        if full is not None:
            self._send(full)
        return len(blob)

    def store_chunk(self, cid: bytes, data: bytes | memoryview) -> int:
        """Queue a chunk; it is compressed and sent only if the server lacks it."""
        return self.store_chunks([cid], [data])[0]

    def store_chunks(self, ids: list[bytes], chunks: list[bytes | memoryview]) -> list[int]:
        """Queue a read's chunks under one lock; copies of those that view a buffer the
        reader will reuse are made before it, so readers do not wait on each other."""
        held = self._held
        fresh = [(cid, _kept(data)) for cid, data in zip(ids, chunks, strict=True)
                 if cid not in self._known and (held is None or cid not in held)]
        # (`_known` is re-checked under the lock)
        queue = None
        with self._lock:
            for cid, raw in fresh:
                if cid not in self._known:
                    self._known.add(cid)
                    self._queue.append((cid, raw))
                    self._queued_bytes += len(raw)
            if len(self._queue) >= _QUEUE_CHUNKS or self._queued_bytes >= _QUEUE_BYTES:
                queue, self._queue, self._queued_bytes = self._queue, [], 0
        if queue:
            self._resolve(queue)
        return [0] * len(ids)  # what the server lacked is counted as it is sent

    def _resolve(self, queue: list[tuple[bytes, bytes | memoryview]]) -> None:
        lacking, prove = self._ask([cid for cid, _ in queue])
        for cid, data in queue:
            if cid in lacking:
                self.put_claimed(cid, self.codec.compress(data), len(data))
        if prove:
            items = [(cid, prove[cid], data) for cid, data in queue if cid in prove]
            self._prove_slots.acquire()
            fut = self._prover.submit(self._prove_or_send, items)
            fut.add_done_callback(lambda _f: self._prove_slots.release())
            with self._lock:
                self._proofs.append(fut)

    def _prove_or_send(self, items: list[tuple[bytes, str, bytes | memoryview]]) -> None:
        refused = self._prove(items)
        for cid, _, data in items:
            if cid in refused:
                self.put_claimed(cid, self.codec.compress(data), len(data))

    def _send(self, bundle: BundleWriter) -> None:
        self._upload_slots.acquire()
        fut = self._uploader.submit(self._upload, bundle)
        fut.add_done_callback(lambda _f: self._upload_slots.release())
        with self._lock:
            self._uploads.append(fut)

    def _upload(self, bundle: BundleWriter) -> None:
        """Send a bundle. The server keeps every chunk that reached it whole, even from a
        connection that broke midway: before sending again, ask which of the bundle's
        chunks it still lacks and send only those. Backs off as the client does (0.5 s,
        1 s, 2 s, ...) and gives up after as many tries (ServerUnreachable: the next run
        asks again, and is told the same)."""
        client = self.client
        delay, failures = BACKOFF_FIRST, 0
        while bundle.count:
            try:
                client.request("POST", f"{self.api}/chunks", content=bundle.getvalue(),
                               retries=0)
                return
            except ServerUnreachable as exc:
                failures += 1
                if failures > client.retries:
                    raise
                with client._lock:
                    client.retried += 1
                client.sleep(max(delay, exc.retry_after))  # a busy server says how long
                delay = min(delay * 2, BACKOFF_MAX)
            try:
                lacking, prove = self._ask(bundle.ids, retries=0)
            except ServerUnreachable:
                continue  # still away: the next try sends the whole bundle, or asks again
            # A chunk it now asks to be proven is sent all the same: it was lacking.
            bundle = bundle.subset(lacking | set(prove))

    def flush(self) -> None:
        with self._lock:
            queue, self._queue, self._queued_bytes = self._queue, [], 0
        if queue:
            self._resolve(queue)
        with self._lock:
            proofs, self._proofs = self._proofs, []
        for fut in proofs:
            fut.result()  # refused proofs are in a bundle by now
        with self._lock:
            bundle, self._bundle = self._bundle, BundleWriter()
        if bundle.count:
            self._send(bundle)
        with self._lock:
            uploads, self._uploads = self._uploads, []
        for fut in uploads:
            fut.result()  # every bundle acknowledged (or its error raised) before we go on

    def close(self) -> None:
        self._prover.shutdown(wait=True, cancel_futures=True)
        self._uploader.shutdown(wait=True, cancel_futures=True)

    def forget(self, ids: set[bytes]) -> None:
        """The server lost these since we asked (a prune), or the endpoint does not hold
        them after all: ask again next time."""
        with self._lock:
            self._known.difference_update(ids)
            self._held = None
