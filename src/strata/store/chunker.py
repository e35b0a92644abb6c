"""Content-defined chunking (FastCDC) with the store's fixed parameters."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyfastcdc import FastCDC


@dataclass(frozen=True)
class ChunkerParams:
    min_size: int = 16 * 1024
    avg_size: int = 64 * 1024
    max_size: int = 256 * 1024

    @classmethod
    def from_avg(cls, avg: int) -> ChunkerParams:
        if avg & (avg - 1) or not 1024 <= avg <= 4 << 20:
            raise ValueError("chunk average must be a power of two between 1 KiB and 4 MiB")
        return cls(min_size=avg // 4, avg_size=avg, max_size=avg * 4)


class Chunker:
    """Cuts buffers into chunks; one FastCDC object per thread (they are not thread-safe)."""

    def __init__(self, params: ChunkerParams):
        self.params = params
        self._local = threading.local()

    def _cdc(self) -> FastCDC:
        cdc = getattr(self._local, "cdc", None)
        if cdc is None:
            p = self.params
            # pyfastcdc's effective average is avg + min (cut-point skipping), so ask for
            # avg - min to land on the configured average.
            cdc = self._local.cdc = FastCDC(p.avg_size - p.min_size, min_size=p.min_size,
                                            max_size=p.max_size)
        return cdc

    def cut(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        if len(buf) <= self.params.min_size:
            if buf:
                yield memoryview(buf)
            return
        # pyfastcdc slices what it is given: slices of bytes are copies (made holding the
        # GIL), slices of a memoryview are not.
        for c in self._cdc().cut_buf(memoryview(buf)):
            yield c.data
