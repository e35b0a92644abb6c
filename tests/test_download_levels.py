"""Which zstd level a download stream gets: the top one for IT layer content (compressed
once, then served from the stream cache to every endpoint of the layer), a faster one for
an endpoint's own CVD (a restore or a revert: sent once, to that endpoint alone), a fast
one for content that did not compress when it was stored (random, media, archives)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import cost_factors
from strata.model.ids import content_id
from strata.server.holdings import Holdings
from strata.server.services import layer_downloads
from strata.server.services.layer_downloads import INCOMPRESSIBLE_LEVEL, stream_level
from strata.server.services.snapshots import batch_sizes

# The product's levels: the suite's processes compress at a test cost (tests/cost_factors.py).
DOWNLOAD_LEVEL = cost_factors.PRODUCT_LEVELS["DOWNLOAD_LEVEL"]
PRIVATE_LEVEL = cost_factors.PRODUCT_LEVELS["PRIVATE_LEVEL"]

LAYER, CVD = "a" * 64, "b" * 64
in_layer = [content_id(b"layer %d" % i) for i in range(3)]
own = [content_id(b"own %d" % i) for i in range(2)]


class Sizes:
    """The store, as far as levels go: how well a batch compressed when it was stored."""

    def __init__(self, stored_share: float | None):
        self.share = stored_share
        self.compresses = stored_share is not None  # None: a store without compression

    def stored_and_raw(self, ids):
        raw = 65536 * len(set(ids))
        return int(raw * (self.share or 1.0)), raw


def ctx(tmp_path, stored_share=0.4):
    holdings = Holdings(tmp_path / "holdings.sqlite")
    holdings.index_snapshot(LAYER, lambda: in_layer)
    holdings.index_snapshot(CVD, lambda: [*in_layer, *own])
    return SimpleNamespace(holdings=holdings, store=Sizes(stored_share))


@pytest.fixture(autouse=True)
def product_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cost_factors.PRODUCT_LEVELS.items():
        monkeypatch.setattr(layer_downloads, name, value)


def level(world, layers, ids):
    return stream_level(world, layers, ids, batch_sizes(world, ids))


def test_a_batch_of_layer_content_takes_the_top_level(tmp_path):
    assert level(ctx(tmp_path), [LAYER], in_layer) == DOWNLOAD_LEVEL
    assert level(ctx(tmp_path), [LAYER], [in_layer[0], in_layer[0]]) == DOWNLOAD_LEVEL


def test_a_batch_with_any_of_an_endpoints_own_data_takes_the_faster_level(tmp_path):
    assert level(ctx(tmp_path), [LAYER], [*in_layer, own[0]]) == PRIVATE_LEVEL
    assert level(ctx(tmp_path), [], in_layer) == PRIVATE_LEVEL  # a CVD restore only
    assert PRIVATE_LEVEL < DOWNLOAD_LEVEL


def test_a_batch_that_did_not_compress_when_stored_takes_a_fast_level(tmp_path):
    for share in (0.96, 1.0, 1.01):  # raw, or raw plus the encrypted store's overhead
        assert level(ctx(tmp_path, share), [LAYER], in_layer) == INCOMPRESSIBLE_LEVEL
        assert level(ctx(tmp_path, share), [], own) == INCOMPRESSIBLE_LEVEL
    assert level(ctx(tmp_path, 0.9), [LAYER], in_layer) == DOWNLOAD_LEVEL
    assert level(ctx(tmp_path, None), [LAYER], in_layer) == DOWNLOAD_LEVEL  # cannot tell
    assert INCOMPRESSIBLE_LEVEL < PRIVATE_LEVEL
