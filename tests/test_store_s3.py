"""What the S3 backend does beyond the common contract (test_store_backend.py runs that on
S3 too): multipart uploads and their abort, pagination, batched deletes, retries and
timeouts, one plain line for each way an object store fails, a layout that a copy tool
can move between a disk and a bucket, and the working state bound to its one store.

Against moto's S3 server on loopback (tests/s3_fixtures.py); failures that moto cannot
produce (an access denied, a quota, a 503) are injected at botocore's event hooks, so
they go through botocore's own error parsing and retry loop.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import botocore.awsrequest
import pytest

from server_fixtures import assert_one_line_error, free_port, strata
from strata.engine.backup import backup
from strata.engine.check import check
from strata.engine.restore import restore
from strata.errors import StoreWriteFailed, StrataError
from strata.server.store_location import open_server_store
from strata.store.backend import ObjectNotFound, StoreFull
from strata.store.location import init_store_at, open_store_at
from strata.store.repository import Store
from strata.store.s3 import S3Backend, S3Location, S3Options

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def count_calls(backend: S3Backend, operation: str) -> list[dict]:
    """Record the parameters of every `operation` request the backend's client makes."""
    seen: list[dict] = []
    backend._client.meta.events.register(f"before-parameter-build.s3.{operation}",
                                         lambda params, **_: seen.append(dict(params)))
    return seen


def fail_with(backend: S3Backend, operation: str, code: str, status: int,
              when: object = None) -> None:
    """Answer `operation` with an S3 error (when `when(params)` holds), as the server would."""
    events = backend._client.meta.events

    def remember(params: dict, context: dict, **_: object) -> None:
        context["strata_params"] = dict(params)

    def answer(context: dict, **_: object) -> object:
        if when is not None and not when(context["strata_params"]):  # type: ignore[operator]
            return None
        http = botocore.awsrequest.AWSResponse("http://test", status, {}, None)
        return http, {"Error": {"Code": code, "Message": f"injected {code}"},
                      "ResponseMetadata": {"HTTPStatusCode": status}}

    events.register(f"before-parameter-build.s3.{operation}", remember)
    events.register(f"before-call.s3.{operation}", answer)


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The usual AWS variables pointing at moto, as an administrator would set them (and
    no instance-metadata lookups off this machine when something is missing)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**s3.env(), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    return s3


# -- uploads ---------------------------------------------------------------------------------


def test_a_large_pack_is_uploaded_in_parts_and_reads_back_whole(s3, s3_bucket, tmp_path):
    backend = s3.backend(s3_bucket, multipart_threshold=5 * MIB, part_size=5 * MIB)
    parts = count_calls(backend, "UploadPart")
    data = os.urandom(12 * MIB + 123)
    spool = tmp_path / "pack.tmp"
    spool.write_bytes(data)
    backend.save_file("packs", "ab" * 32, spool)
    assert [p["PartNumber"] for p in parts] == [1, 2, 3]
    assert not spool.exists()
    assert backend.stat("packs", "ab" * 32).size == len(data)
    assert backend.load("packs", "ab" * 32) == data
    assert backend.load("packs", "ab" * 32, 5 * MIB - 10, 20) == data[5 * MIB - 10:5 * MIB + 10]


def test_a_failed_multipart_upload_is_aborted_and_leaves_nothing(s3, s3_bucket, tmp_path):
    backend = s3.backend(s3_bucket, multipart_threshold=5 * MIB, part_size=5 * MIB)
    fail_with(backend, "UploadPart", "InternalError", 500, lambda p: p["PartNumber"] == 2)
    spool = tmp_path / "pack.tmp"
    spool.write_bytes(os.urandom(11 * MIB))
    with pytest.raises(OSError, match="InternalError"):
        backend.save_file("packs", "cd" * 32, spool)
    assert not backend.exists("packs", "cd" * 32)
    assert s3.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == [], \
        "the parts already sent are aborted, not left to be billed"
    assert spool.exists(), "the finished file is consumed only once it is uploaded"


def test_a_full_object_store_stops_a_backup_without_a_snapshot(s3, s3_bucket, tmp_path, trees):
    """S3 has no "disk full"; Ceph's quota and MinIO's full drives are its equivalents."""
    backend = s3.backend(s3_bucket)
    src = trees.make_tree(tmp_path / "src", seed=5, files=20, dirs=2)
    with Store.init_on(backend, tmp_path / "state", pack_size=64 << 10) as store:
        fail_with(backend, "PutObject", "QuotaExceeded", 403,
                  lambda p: "/packs/" in p["Key"])
        with pytest.raises(StoreWriteFailed, match="QuotaExceeded"):
            backup(store, src)
        assert store.snapshot_ids() == []
    with pytest.raises(StoreFull):
        backend.save("packs", "ef" * 32, b"x")


# -- reads, listings, deletes ----------------------------------------------------------------


def test_readers_share_one_backend_from_many_threads(s3, s3_bucket):
    backend = s3.backend(s3_bucket)
    packs = {os.urandom(32).hex(): os.urandom(256 << 10) for _ in range(4)}
    for name, data in packs.items():
        backend.save("packs", name, data)
    jobs = [(name, (i * 7919) % (200 << 10), 4096) for i, name in enumerate(list(packs) * 40)]

    def read(job: tuple[str, int, int]) -> bool:
        name, off, n = job
        return backend.load("packs", name, off, n) == packs[name][off:off + n]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, jobs))
    assert backend.load("packs", name, 300 << 10, 10) == b"", "a range past the end is empty"


def test_listings_page_through_and_deletes_go_a_thousand_at_a_time(s3, s3_bucket):
    backend = s3.backend(s3_bucket)
    lists, deletes = count_calls(backend, "ListObjectsV2"), count_calls(backend, "DeleteObjects")
    backend._client.meta.events.register(  # pages of 7 instead of 1,000
        "before-parameter-build.s3.ListObjectsV2",
        lambda params, **_: params.__setitem__("MaxKeys", 7))
    names = sorted(os.urandom(32).hex() for _ in range(40))
    for name in names:
        backend.save("packs", name, b"p")
    assert list(backend.list("packs")) == names
    assert len(lists) == 6
    backend.remove_many("packs", names)
    assert len(deletes) == 1 and list(backend.list("packs")) == []


def test_keys_that_are_not_store_objects_are_not_listed(s3, s3_bucket):
    backend = s3.backend(s3_bucket, prefix="a/b/")
    client = s3.client()
    name = "ab" * 32
    backend.save("packs", name, b"p")
    backend.save("snapshots", "cd" * 32, b"s")
    for stray in ("a/b/packs/ab/.tmp-upload", "a/b/packs/cd/" + name, "a/b/packs/ab/",
                  "a/b/packs/" + name, "a/b/snapshots/x/y", "a/b/index.sqlite",
                  "a/packs/ab/" + "ab" * 32, "a/b/locks/commit.lock"):
        client.put_object(Bucket=s3_bucket, Key=stray, Body=b"")
    assert list(backend.list("packs")) == [name]
    assert list(backend.list("snapshots")) == ["cd" * 32]
    assert {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="a/b/p")[
        "Contents"]} >= {"a/b/packs/ab/" + name}, "objects lie at PREFIX/<kind>/<fan>/<name>"


# -- failures: bounded in time, one plain line ---------------------------------------------------


@pytest.mark.parametrize("code,status,kind,words", [
    ("AccessDenied", 403, OSError, "access denied to s3://"),
    ("InvalidAccessKeyId", 403, OSError, "check the credentials"),
    ("NoSuchBucket", 404, OSError, "does not exist"),
    ("SlowDown", 503, OSError, "SlowDown"),
    ("XMinioStorageFull", 507, StoreFull, "XMinioStorageFull"),
])
def test_each_object_store_failure_is_one_plain_error(s3, s3_bucket, code, status, kind, words):
    backend = s3.backend(s3_bucket)
    backend.save("snapshots", "ab" * 32, b"s")
    fail_with(backend, "GetObject", code, status)
    with pytest.raises(kind) as caught:
        backend.load("snapshots", "ab" * 32)
    message = str(caught.value)
    assert words in message and "\n" not in message and "Traceback" not in message
    assert isinstance(caught.value, StrataError | StoreFull)


def test_a_flaky_endpoint_is_retried_and_a_missing_object_is_not(s3, s3_bucket):
    backend = s3.backend(s3_bucket)
    backend.save("snapshots", "ab" * 32, b"record")
    answered: list[int] = []

    class Body:
        def stream(self, **_: object) -> object:
            return iter([b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"])

    def flaky(request: object, **_: object) -> object:
        answered.append(1)
        if len(answered) <= 2:  # the first two answers are "slow down"
            return botocore.awsrequest.AWSResponse("http://test", 503, {}, Body())
        return None

    backend._client.meta.events.register("before-send.s3.GetObject", flaky)
    assert backend.load("snapshots", "ab" * 32) == b"record"
    assert len(answered) == 3, "botocore's standard mode retried twice"
    answered.clear()
    answered.extend([1, 1])  # no more injected failures
    with pytest.raises(ObjectNotFound):
        backend.load("snapshots", "cd" * 32)
    assert len(answered) == 3, "a 404 is an answer, not a failure to retry"


def test_a_silent_endpoint_times_out_instead_of_hanging(s3_env):
    """A server that accepts connections and never answers (a hung proxy)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        backend = S3Backend(S3Location("bucket", "p/"), S3Options(
            endpoint_url=url, read_timeout=0.5, connect_timeout=0.5, max_attempts=2))
        started = time.monotonic()
        with pytest.raises(OSError, match="object store") as caught:
            backend.load("config", "config")
        assert time.monotonic() - started < 15
        assert "\n" not in str(caught.value)


def test_server_on_an_unreachable_or_missing_object_store_says_so_in_one_line(
        s3_env, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    closed = f"http://127.0.0.1:{free_port()}"
    for args, words in [
            (["--store", f"s3://{s3_bucket}/p", "--s3-endpoint-url", closed],
             ["cannot reach the object store at " + closed]),
            (["--store", "s3://strata-no-such-bucket/p"], ["does not exist"]),
            (["--store", "s3://a/p"], ["not a bucket name"]),
            (["--s3-region", "eu-west-1"], ["go with --store s3://"])]:
        proc = strata("server", "--data", tmp_path / "data", "--listen",
                      f"127.0.0.1:{free_port()}", *args, rc=None, timeout=120)
        assert_one_line_error(proc, *words)


# -- one layout everywhere; one store per working state --------------------------------------


def test_a_store_copied_object_for_object_opens_on_either_side(s3, s3_bucket, tmp_path, trees):
    """What `aws s3 sync` or rclone would do to move a store between a disk and a bucket."""
    src = trees.make_tree(tmp_path / "src", seed=8, files=30, dirs=3)
    want = trees.tree_state(src)
    backend = s3.backend(s3_bucket, prefix="from-disk/")
    with Store.init(tmp_path / "local", pack_size=64 << 10, passphrase="pw") as store:
        sid = backup(store, src).snapshot
    client = s3.client()
    for path in sorted((tmp_path / "local").rglob("*")):
        if path.is_file():  # the index, locks and spool go along: the bucket ignores them
            key = "from-disk/" + path.relative_to(tmp_path / "local").as_posix()
            client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    with Store.open_on(backend, tmp_path / "state", "pw") as store:
        assert check(store, read_data=True).ok
        assert restore(store, store.resolve_snapshot(sid), tmp_path / "r1").errors == []
    trees.assert_same_state(trees.tree_state(tmp_path / "r1"), want)

    back = tmp_path / "back"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket,
                                                                   Prefix="from-disk/"):
        for obj in page["Contents"]:
            dest = back / obj["Key"][len("from-disk/"):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(client.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read())
    (back / "index.sqlite").unlink()  # derived data: rebuilt from the pack trailers
    for leftover in back.glob("index.sqlite-*"):
        leftover.unlink()
    with Store.open(back, "pw") as store:
        assert check(store, read_data=True).ok


def test_a_working_state_serves_one_store(s3_env, s3_bucket, tmp_path):
    one, other = f"s3://{s3_bucket}/one", f"s3://{s3_bucket}/other"
    init_store_at(one, tmp_path / "state").close()
    init_store_at(other, tmp_path / "state2").close()
    with pytest.raises(StrataError, match="working state of the store"):
        open_store_at(other, tmp_path / "state")
    with pytest.raises(StrataError, match="needs --state"):
        open_store_at(one, None)
    open_store_at(one, tmp_path / "state").close()


def test_a_fresh_working_state_learns_the_packs_already_there(s3_env, s3_bucket, tmp_path, trees):
    """A second state (a restored server data directory, an admin's check) must know what
    the store holds, or writers would upload every chunk again and restores find none."""
    src = trees.make_tree(tmp_path / "src", seed=9, files=30, dirs=3)
    where = f"s3://{s3_bucket}/s"
    with init_store_at(where, tmp_path / "state", pack_size=64 << 10) as store:
        first = backup(store, src)
    with open_store_at(where, tmp_path / "fresh") as store:
        again = backup(store, src, parent=False)
        assert again.chunks_new == 0 and again.bytes_stored == 0, again
        assert first.snapshot in store.snapshot_ids()


def test_store_commands_work_on_an_object_store(s3_env, s3_bucket, tmp_path, trees):
    src = trees.make_tree(tmp_path / "src", seed=10, files=25, dirs=3)
    where, state = f"s3://{s3_bucket}/cli", tmp_path / "state"
    strata("store", "init", where, "--state", state)
    strata("store", "backup", where, src, "--state", state)
    proc = strata("store", "check", where, "--read-data", "--state", state)
    assert "no errors" in proc.stdout
    strata("store", "restore", where, "latest", tmp_path / "out", "--state", tmp_path / "s2")
    trees.assert_same_state(trees.tree_state(tmp_path / "out"), trees.tree_state(src))
    assert_one_line_error(strata("store", "snapshots", where, rc=None), "needs --state")
    assert_one_line_error(strata("store", "snapshots", f"s3://{s3_bucket}/none", "--state",
                                 tmp_path / "s3", rc=None), "no Strata store at", rc=10)


def test_server_data_directory_keeps_to_its_store(s3_env, s3_bucket, tmp_path):
    data = tmp_path / "data"
    Store.init(data / "store").close()  # a server that ran on its local store
    proc = strata("server", "--data", data, "--store", f"s3://{s3_bucket}/srv", rc=None)
    assert_one_line_error(proc, "holds this data directory's local store")
    assert "Contents" not in s3_env.client().list_objects_v2(Bucket=s3_bucket)

    other = tmp_path / "other"
    open_server_store(other, f"s3://{s3_bucket}/srv").close()  # a server that ran on S3
    with pytest.raises(StrataError, match=f"start the server with --store s3://{s3_bucket}"):
        open_server_store(other)  # restarted without --store: no new, empty local store
    assert not (other / "store").exists()
    with pytest.raises(StrataError, match="working state of the store"):
        open_server_store(other, f"s3://{s3_bucket}/elsewhere")
    open_server_store(other, f"s3://{s3_bucket}/srv").close()
