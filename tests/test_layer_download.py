"""The layer download path: chunks travel in the tree's order (not by id), in batches the
server accepts, each batch one zstd stream whose window spans the whole batch."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from strata.agent import update
from strata.agent.state import AgentState
from strata.layers.changes import Action, Change
from strata.layers.plan import Plan
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id
from strata.model.transfer import pack_stream, read_stream
from strata.signing.policy import Approval, TrustRecord

pytestmark = pytest.mark.e2e


def file_entry(path: bytes, *pieces: bytes) -> Entry:
    data = b"".join(pieces)
    return Entry(path=path, type=EntryType.FILE, mode=0o644, size=len(data),
                 content_hash=content_id(data),
                 chunks=[(content_id(p), len(p)) for p in pieces])


class FakeServer:
    """Answers chunk requests as the server does (one pack_stream per request)."""

    def __init__(self, chunks: dict[bytes, bytes]):
        self.chunks = chunks
        self.requests: list[list[bytes]] = []
        self.bytes_received = 0

    def request(self, method: str, path: str, json: dict, **_: object) -> SimpleNamespace:
        ids = [bytes.fromhex(h) for h in json["ids"]]
        self.requests.append(ids)
        body = pack_stream([(c, self.chunks[c]) for c in ids], 1)
        self.bytes_received += len(body)
        return SimpleNamespace(content=body)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, json: dict, **_: object) -> Iterator[io.BytesIO]:
        yield io.BytesIO(self.request(method, path, json).content)


def test_download_follows_the_tree_order_in_batches_the_server_accepts(tmp_path,
                                                                       monkeypatch):
    rng = random.Random(3)
    pieces = {name: [rng.randbytes(3000 + i) for i in range(3)]
              for name in (b"usr/lib/b.so", b"usr/bin/a", b"etc/z.conf", b"usr/lib/a.so")}
    entries = {path: file_entry(path, *p) for path, p in pieces.items()}
    shared = pieces[b"usr/bin/a"][0]
    entries[b"usr/lib/c.so"] = file_entry(b"usr/lib/c.so", shared)  # a chunk seen before
    plan = Plan(changes=[
        Change(Action.ADD, path, entries[path]) for path in
        (b"etc/z.conf", b"usr/bin/a", b"usr/lib/a.so", b"usr/lib/b.so", b"usr/lib/c.so")])
    plan.changes.append(Change(Action.DELETE, b"usr/old", None))
    plan.changes.append(Change(Action.META, b"var/x", entries[b"etc/z.conf"]))

    lengths = plan.chunks_in_order()
    order = list(lengths)
    expected = [content_id(p) for path in (b"etc/z.conf", b"usr/bin/a", b"usr/lib/a.so",
                                           b"usr/lib/b.so") for p in pieces[path]]
    assert order == expected  # path order, file order within a file, each chunk once
    assert lengths == {content_id(p): len(p) for ps in pieces.values() for p in ps}

    server = FakeServer({content_id(p): p for ps in pieces.values() for p in ps})
    monkeypatch.setattr(update, "BATCH_BYTES", 10_000)  # three or so chunks per request
    nothing_signed = Approval(catalog_version=0, manifests={}, after=TrustRecord())  # no manifests
    source = update.LayerSource(server, AgentState(tmp_path / "state"), tmp_path,  # type: ignore[arg-type]
                                approval=nothing_signed)
    try:
        # The endpoint's own copy of etc/z.conf is a seed: it is not downloaded.
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc/z.conf").write_bytes(b"".join(pieces[b"etc/z.conf"]))
        source.add_seeds([entries[b"etc/z.conf"]])
        lacking = source.lacking(order)
        assert lacking == expected[3:]
        source.download(lacking, lengths)
        sent = [c for req in server.requests for c in req]
        assert sent == lacking  # the order survives batching
        assert all(sum(lengths[c] for c in req) <= 10_000 for req in server.requests)
        assert len(server.requests) == 3
        assert source.bytes_downloaded == server.bytes_received
        # Now cached: nothing is downloaded twice.
        assert source.lacking(order) == []
        assert source.chunk(expected[5]) == pieces[b"usr/bin/a"][2]
    finally:
        source.close()


@pytest.mark.parametrize("level", [3, 19])
def test_stream_window_spans_the_batch(level):
    """A chunk repeated 9 MiB later (beyond zstd's default 8 MiB window at level 19, 2 MiB
    at level 3) still compresses to almost nothing the second time. (The 9 MiB between
    are zeros: random ones took level 19 6 s of CPU to say the same; with an 8 MiB window
    this body is 2 MiB.)"""
    rng = random.Random(5)
    block, middle = rng.randbytes(1 << 20), bytes(9 << 20)
    chunks = [(content_id(block), block), (content_id(middle), middle),
              (b"\x01" * 32, block)]
    body = pack_stream(chunks, level)
    assert len(body) < len(block) + 100_000
    assert [(cid, raw[1:]) for cid, _, raw in read_stream(body)] == chunks
