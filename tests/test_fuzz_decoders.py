"""Property-based fuzzing of what parses bytes from the network: chunk bundles, chunk
streams, manifests, proofs of possession, and the commit and upload routes. Whatever the
input, a decoder either succeeds or raises CorruptData (never another exception, never a
hang), and a route answers 2xx or 4xx, never a 500."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack
import pytest
import zstandard
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from strata.errors import CorruptData
from strata.model.ids import content_id
from strata.model.manifest import FORMAT, decode_manifest
from strata.model.possession import MAGIC as MAGIC_PROOFS
from strata.model.possession import decode_proofs, encode_proofs
from strata.model.transfer import MAGIC, STREAM_MAGIC, BundleParser, read_bundle, read_stream
from strata.server.app import create_app
from strata.server.context import ServerSettings
from strata.server.services.manifests import check_entry

# Thousands of crafted inputs per decoder: part of `make test`, not of the quick unit tier.
pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ids = st.binary(min_size=32, max_size=32)
ints = st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.integers(-5, 5))  # msgpack
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.binary(max_size=40),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)
ROUTES = settings(FUZZ, max_examples=60)


def _record(cid: bytes, raw: int, payload: bytes, plen: int | None = None) -> bytes:
    return cid + struct.pack("<II", raw, len(payload) if plen is None else plen) + payload


bundles = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda recs, tail: MAGIC + b"".join(recs) + tail,
              st.lists(st.builds(_record, ids, st.integers(0, (1 << 32) - 1),
                                 st.binary(max_size=64),
                                 st.one_of(st.none(), st.integers(0, (1 << 32) - 1))),
                       max_size=4),
              st.binary(max_size=12)))


@FUZZ
@given(bundles)
def test_bundle_decoder_only_raises_corrupt_data(data):
    try:
        for cid, raw_length, payload in read_bundle(data):
            assert len(cid) == 32 and raw_length >= 0 and isinstance(payload, bytes)
    except CorruptData:
        pass


def _all_records(decode) -> tuple[list, bool]:
    """The records a decoder gives before it stops, and whether it stopped on an error."""
    got: list = []
    try:
        decode(got)
    except CorruptData:
        return got, True
    return got, False


@FUZZ
@given(bundles, st.lists(st.integers(1, 40), max_size=8))
def test_bundle_parser_in_pieces_agrees_with_the_whole_bundle_decoder(data, cuts):
    """Fed in pieces of any sizes, the upload side's parser gives the same records as the
    decoder of a whole bundle, the same up to where that one stops, and fails where it
    fails, with CorruptData only."""
    def whole(got: list) -> None:
        got.extend(read_bundle(data))

    def pieces(got: list) -> None:
        parser, at = BundleParser(), 0
        for n in [*cuts, len(data)]:
            got.extend(parser.feed(data[at:at + n]))
            at += n
        parser.close()

    assert _all_records(pieces) == _all_records(whole)


@FUZZ
@given(st.one_of(bundles, st.binary(max_size=200)),
       st.sampled_from(["zstd", "raw", "truncated"]))
def test_stream_decoder_only_raises_corrupt_data(inner, how):
    body = zstandard.ZstdCompressor().compress(inner)
    data = STREAM_MAGIC + {"zstd": body, "raw": inner, "truncated": body[:len(body) // 2]}[how]
    try:
        list(read_stream(data))
    except CorruptData:
        pass


def test_stream_decoder_bounds_a_decompression_bomb():
    # Well-framed records (a bomb of zeros alone fails at the magic): read as they arrive,
    # the decoder still stops at the bound, not at the end of the input.
    record = struct.pack("<32sII", b"\0" * 32, 16 << 20, 16 << 20) + b"\0" * (16 << 20)
    cctx = zstandard.ZstdCompressor(level=1).compressobj()
    body = cctx.compress(MAGIC) + b"".join(cctx.compress(record) for _ in range(19))
    bomb = STREAM_MAGIC + body + cctx.flush()
    with pytest.raises(CorruptData, match="too large"):
        list(read_stream(bomb))


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda n, nonce, recs: MAGIC_PROOFS + bytes([n % 256]) + nonce + recs,
                           st.integers(0, 300), st.binary(max_size=140),
                           st.binary(max_size=200))))
def test_proof_decoder_only_raises_corrupt_data(data):
    try:
        nonce, claims = decode_proofs(data)
    except CorruptData:
        return
    assert isinstance(nonce, str) and all(len(c) == 32 and len(p) == 16
                                          for c, p in claims.items())


def test_proofs_round_trip():
    claims = [(bytes([i]) * 32, bytes([i]) * 16) for i in range(3)]
    assert decode_proofs(encode_proofs("ab12", claims)) == ("ab12", dict(claims))


entry_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=4)
entry_records = st.lists(entry_values, min_size=17, max_size=17)


@FUZZ
@given(st.lists(st.one_of(entry_records, values), max_size=5), st.booleans(),
       st.integers(1, 7))
def test_manifest_decoder_and_entry_checks_only_raise_corrupt_data(records, header, cut):
    packer = msgpack.Packer(use_bin_type=True)
    data = (packer.pack({"strata-manifest": FORMAT}) if header else b"") + b"".join(
        packer.pack(r) for r in records)
    pieces = [data[i:i + cut] for i in range(0, len(data), cut)]
    try:
        for entry in decode_manifest(pieces):
            check_entry(entry)
    except CorruptData:
        pass


@FUZZ
@given(st.binary(max_size=400))
@example(b"\x81\x80\x00")  # a map keyed by a map: was a TypeError (a 500 at commit)
def test_manifest_decoder_on_raw_bytes(data):
    try:
        list(decode_manifest([data]))
    except CorruptData:
        pass


# -- the routes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory):
    data: Path = tmp_path_factory.mktemp("fuzz") / "data"
    app = create_app(ServerSettings(data_dir=data))
    token = (data / "admin.token").read_text().strip()
    with TestClient(app, raise_server_exceptions=False) as client:
        tok = client.post("/api/v1/admin/tokens", json={"uses": 1},
                          headers={"Authorization": f"Bearer {token}"}).json()["token"]
        cred = client.post("/api/v1/agent/enroll", json={"token": tok}).json()["credential"]
        client.headers["Authorization"] = f"Bearer {cred}"
        yield client


def _post_json(client: TestClient, body: object):
    """As a hostile client sends it: NaN and Infinity included (Python's parser takes them)."""
    return client.post("/api/v1/agent/snapshots", content=json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})


def _held_manifest(client: TestClient, records: list) -> tuple[str, int]:
    """Upload `records` as a manifest chunk (a header first) and return its (id, length)."""
    packer = msgpack.Packer(use_bin_type=True)
    data = packer.pack({"strata-manifest": FORMAT}) + b"".join(packer.pack(r) for r in records)
    data = data[:200_000] or b"\x90"
    from strata.model.transfer import BundleWriter
    from strata.store.crypto import PlainCipher
    from strata.store.pack import BlobCodec
    w = BundleWriter()
    w.add(content_id(data), len(data), BlobCodec(PlainCipher(), 1).compress(data))
    resp = client.post("/api/v1/agent/chunks", content=w.getvalue())
    assert resp.status_code == 200, resp.text
    return content_id(data).hex(), len(data)


@ROUTES
@given(st.lists(st.one_of(entry_records, values), max_size=4),
       st.dictionaries(st.sampled_from(["stats", "paths", "tags", "trigger", "kind",
                                        "seconds", "retries", "bytes_on_wire"]),
                       json_values, max_size=3),
       st.booleans())
def test_commit_route_answers_4xx_never_500(device, records, extra, right_id):
    hid, n = _held_manifest(device, records)
    body = {"manifest": [[hid, n]], "manifest_id": hid if right_id else "0" * 64, **extra}
    resp = _post_json(device, body)
    assert resp.status_code < 500, (body, resp.text)


@ROUTES
@given(json_values)
def test_commit_route_on_arbitrary_json(device, body):
    resp = _post_json(device, body)
    assert 400 <= resp.status_code < 500, (body, resp.text)


@ROUTES
@given(bundles)
def test_upload_route_answers_4xx_never_500(device, data):
    resp = device.post("/api/v1/agent/chunks", content=data)
    assert resp.status_code in (200, 413, 422), resp.text


@ROUTES
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda nonce, recs: encode_proofs(nonce, recs),
                           st.text(alphabet="0123456789abcdef", max_size=100),
                           st.lists(st.tuples(ids, st.binary(min_size=16, max_size=16)),
                                    max_size=5))))
def test_prove_route_answers_4xx_never_500(device, data):
    resp = device.post("/api/v1/agent/chunks/prove", content=data)
    assert resp.status_code in (200, 422), resp.text
