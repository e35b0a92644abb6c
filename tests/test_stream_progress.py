"""A download batch is handed on while the server compresses it (zstd 19 takes most of a
minute over 64 MiB): the first pieces reach the agent long before the last is made, every
request for the same batch meanwhile reads the same compression, the stream is kept once
made, and the agent's progress (with its ETA) moves chunk by chunk within a batch instead
of sitting at 0% until the batch ends (issue 12: `make demo` sat silent there)."""

from __future__ import annotations

import io
import random
import threading
from collections.abc import Iterator

import pytest

from strata.agent.state import AgentState
from strata.agent.update import LayerSource
from strata.model.ids import content_id
from strata.model.transfer import (
    STREAM_PIECE,
    iter_stream,
    pack_stream,
    pack_stream_pieces,
)
from strata.server.stream_cache import StreamBroken, StreamCache

IDS = [bytes([i]) * 32 for i in range(3)]


def random_chunks(n: int, size: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    datas = [rng.randbytes(size // 2) * 2 for _ in range(n)]  # compressible by half
    return [(content_id(d), d) for d in datas]


def test_a_stream_comes_in_pieces_that_read_as_the_whole():
    chunks = random_chunks(40, 100_000)  # 4 MB: four pieces and the end
    pieces = list(pack_stream_pieces(chunks, 3))
    assert len(pieces) >= 4000_000 // STREAM_PIECE
    whole = b"".join(pieces)
    assert whole == pack_stream(chunks, 3)
    got = [(cid, payload[1:]) for cid, _, payload in iter_stream(io.BytesIO(whole))]
    assert got == chunks
    assert len(whole) < 0.6 * sum(len(d) for _, d in chunks)  # one frame: still compresses


class Gated:
    """Pieces handed out one by one, each when the test lets it go."""

    def __init__(self, pieces: list[bytes]):
        self.pieces, self.calls = pieces, 0
        self.gates = [threading.Event() for _ in pieces]

    def __call__(self) -> Iterator[bytes]:
        self.calls += 1
        return self._run()

    def _run(self) -> Iterator[bytes]:
        for gate, piece in zip(self.gates, self.pieces, strict=True):
            assert gate.wait(30)
            yield piece


def test_pieces_are_handed_on_before_the_stream_is_made_and_shared(tmp_path):
    cache = StreamCache(tmp_path)
    make = Gated([b"one", b"two", b"three"])
    first = cache.stream(19, IDS, make)
    make.gates[0].set()
    assert next(first) == b"one"  # the rest is not made yet
    second = cache.stream(19, IDS, make)  # the same batch meanwhile: no second compression
    make.gates[1].set()
    assert next(first) == b"two"
    make.gates[2].set()
    assert b"".join(first) == b"three"
    assert b"".join(second) == b"onetwothree" and make.calls == 1
    assert cache.lookup(cache.key(19, IDS)) == b"onetwothree"  # kept once made
    assert b"".join(cache.stream(19, IDS, make)) == b"onetwothree" and make.calls == 1


def test_the_compression_finishes_and_is_kept_when_everyone_hangs_up(tmp_path):
    cache = StreamCache(tmp_path)
    make = Gated([b"a", b"b"])
    reader = cache.stream(19, IDS, make)
    make.gates[0].set()
    assert next(reader) == b"a"
    reader.close()  # the agent hung up
    make.gates[1].set()
    for _ in range(300):
        if cache._load(cache.key(19, IDS)) is not None:
            break
        threading.Event().wait(0.01)
    assert cache.lookup(cache.key(19, IDS)) == b"ab"


def test_a_failure_before_the_first_piece_is_the_requests_own_error(tmp_path):
    cache = StreamCache(tmp_path)

    def unreadable() -> Iterator[bytes]:
        raise OSError("chunk 3f2a… cannot be read")
    with pytest.raises(OSError, match="cannot be read"):
        cache.stream(19, IDS, unreadable)
    make = Gated([b"x"])
    make.gates[0].set()
    assert b"".join(cache.stream(19, IDS, make)) == b"x"  # the next one tries anew


def test_a_failure_midway_breaks_every_reader_and_is_not_kept(tmp_path):
    cache = StreamCache(tmp_path)

    def breaks() -> Iterator[bytes]:
        def run() -> Iterator[bytes]:
            yield b"half"
            raise ValueError("out of memory")
        return run()
    reader = cache.stream(19, IDS, breaks)
    assert next(reader) == b"half"
    with pytest.raises(StreamBroken, match="out of memory"):
        next(reader)
    assert cache._load(cache.key(19, IDS)) is None


class StreamingFake:
    """Serves layer batches as the server does; records each progress call."""

    def __init__(self, chunks: dict[bytes, bytes]):
        self.chunks, self.retries, self.retried, self.bytes_received = chunks, 0, 0, 0
        self._lock = threading.Lock()

    def sleep(self, _: float) -> None:
        raise AssertionError("no retry expected")

    def stream(self, method: str, path: str, json: dict, **_: object):
        import contextlib

        ids = [bytes.fromhex(h) for h in json["ids"]]
        body = io.BytesIO(pack_stream([(c, self.chunks[c]) for c in ids], 1))

        @contextlib.contextmanager
        def opened() -> Iterator[io.BytesIO]:
            yield body
        return opened()


def test_the_agents_progress_moves_within_a_batch(tmp_path):
    chunks = dict(random_chunks(30, 50_000, seed=2))
    state = AgentState(tmp_path / "state")
    source = LayerSource(StreamingFake(chunks), state, tmp_path, approval=None)  # type: ignore[arg-type]
    seen: list[tuple[int, int]] = []
    batches: list[tuple[int, int]] = []
    try:
        source.download(list(chunks), {c: len(d) for c, d in chunks.items()},
                        lambda done, total: batches.append((done, total)),
                        lambda done, total: seen.append((done, total)))
    finally:
        source.close()
    total = sum(len(d) for d in chunks.values())
    assert len(seen) > 20, seen  # one batch: it used to be one call, at the end
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert batches == [(total, total)]  # what is reported to the server: per batch
