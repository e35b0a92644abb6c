"""Which zstd level a download stream gets: the top one for IT layer content (compressed
once, then served from the stream cache to every endpoint of the layer), a faster one for
an endpoint's own CVD (a restore or a revert: sent once, to that endpoint alone)."""

from __future__ import annotations

from types import SimpleNamespace

from strata.model.ids import content_id
from strata.server.holdings import Holdings
from strata.server.services.layer_downloads import DOWNLOAD_LEVEL, PRIVATE_LEVEL, stream_level

LAYER, CVD = "a" * 64, "b" * 64
in_layer = [content_id(b"layer %d" % i) for i in range(3)]
own = [content_id(b"own %d" % i) for i in range(2)]


def ctx(tmp_path):
    holdings = Holdings(tmp_path / "holdings.sqlite")
    holdings.index_snapshot(LAYER, lambda: in_layer)
    holdings.index_snapshot(CVD, lambda: [*in_layer, *own])
    return SimpleNamespace(holdings=holdings)


def test_a_batch_of_layer_content_takes_the_top_level(tmp_path):
    assert stream_level(ctx(tmp_path), [LAYER], in_layer) == DOWNLOAD_LEVEL
    assert stream_level(ctx(tmp_path), [LAYER], [in_layer[0], in_layer[0]]) == DOWNLOAD_LEVEL


def test_a_batch_with_any_of_an_endpoints_own_data_takes_the_faster_level(tmp_path):
    assert stream_level(ctx(tmp_path), [LAYER], [*in_layer, own[0]]) == PRIVATE_LEVEL
    assert stream_level(ctx(tmp_path), [], in_layer) == PRIVATE_LEVEL  # a CVD restore only
    assert PRIVATE_LEVEL < DOWNLOAD_LEVEL
