"""A Strata store in an S3-compatible object store (AWS S3, MinIO, Ceph RGW), behind the
`Backend` contract of backend.py: one PUT per object (multipart for large packs), a ranged
GET per chunk read, HEAD for stat, paginated LIST, batched DELETE.

Objects lie under `s3://BUCKET/PREFIX/` exactly as in a local store directory
(`object_key`), packs fanned out by their first two hex digits. S3 does not need the
fan-out; it is kept so that a store copied object for object between a disk and a bucket
opens on either side, and it costs nothing (one listing walks all of `packs/`).

What a killed process leaves: a PUT is atomic, so an object is whole or absent. A
multipart upload cut short leaves parts that are invisible (no object) but billed; they
are aborted here on any failure, and a bucket lifecycle rule
(AbortIncompleteMultipartUpload) clears those of a process killed outright.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from strata.errors import StrataError
from strata.store.backend import (
    AT_ROOT,
    FANNED_OUT,
    KINDS,
    ObjectInfo,
    ObjectNotFound,
    StoreFull,
    object_key,
)

T = TypeVar("T")

# A single PUT below this size: a retry re-sends the object, which is cheap at the 16 MiB
# of a default pack and saves the three extra requests of a multipart upload.
MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 16 << 20  # S3 wants 5 MiB at least for every part but the last
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
BODY_ATTEMPTS = 3  # botocore retries a request, not a body cut off while it is read

# Errors that mean "no space": Ceph RGW's user or bucket quota, MinIO's full drives.
_QUOTA_CODES = frozenset({"QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"})
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                           "AccountProblem", "403"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


class ObjectStoreError(StrataError, OSError):
    """The object store failed or refused a request (unreachable, access denied, no such
    bucket, still failing after retries). An `OSError` too: the store treats it as any
    failed read or write. A server answers 503, so agents retry later."""

    http_status = 503

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class S3Location:
    """`s3://BUCKET/PREFIX`: the bucket and the key prefix the store's objects lie under
    ("" or "a/b/", always ending in a slash when not empty)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        if not url.startswith("s3://"):
            raise StrataError(f"not an S3 location: {url!r} (expected s3://BUCKET/PREFIX)")
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise StrataError(f"not a bucket name: {bucket!r} (in {url!r})")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts) or any(c in prefix for c in "\\\0"):
            raise StrataError(f"not a usable key prefix: {prefix!r}")
        return cls(bucket, "".join(p + "/" for p in parts))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def is_s3_url(text: str) -> bool:
    return text.startswith("s3://")


@dataclass(frozen=True)
class S3Options:
    """How to reach the object store. Empty fields fall back to botocore's own sources:
    AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    AWS_PROFILE and ~/.aws/config, an instance or container role."""

    endpoint_url: str = ""
    region: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0  # per socket read or write, not per request
    max_attempts: int = 5  # botocore's standard mode: exponential backoff, 20 s at most
    pool_connections: int = 32  # the store's reader threads and the server's workers
    multipart_threshold: int = MULTIPART_THRESHOLD
    part_size: int = PART_SIZE


def make_client(options: S3Options) -> Any:
    """A botocore S3 client: thread-safe, with its own pool of kept-alive connections."""
    region = options.region or os.environ.get("AWS_REGION") or None
    retries: dict[str, Any] = {"mode": "standard"}
    if "AWS_MAX_ATTEMPTS" not in os.environ:  # the environment may tune it (tests do)
        retries["total_max_attempts"] = options.max_attempts
    config = botocore.config.Config(
        retries=retries, connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout, max_pool_connections=options.pool_connections,
        tcp_keepalive=True, user_agent_extra="strata")
    try:
        # A session of our own: boto3's default one is shared and not thread-safe.
        return boto3.session.Session().client(
            "s3", endpoint_url=options.endpoint_url or None, region_name=region, config=config)
    except (botocore.exceptions.BotoCoreError, ValueError) as exc:
        raise ObjectStoreError(f"cannot set up the object store client: {exc}") from None


class S3Backend:
    """The store's objects in one bucket, under one key prefix."""

    def __init__(self, location: S3Location, options: S3Options | None = None, *,
                 client: Any = None):
        self.location = location
        self.options = options or S3Options()
        if self.options.part_size < 5 << 20:
            raise ValueError("S3 parts are 5 MiB at least")
        self._client = client if client is not None else make_client(self.options)
        self._bucket = location.bucket
        self._prefix = location.prefix
        self._where = self.options.endpoint_url or self._client.meta.endpoint_url

    @classmethod
    def from_url(cls, url: str, options: S3Options | None = None) -> S3Backend:
        return cls(S3Location.parse(url), options)

    def _key(self, kind: str, name: str) -> str:
        return self._prefix + object_key(kind, name)

    # -- writing ---------------------------------------------------------------
    def save(self, kind: str, name: str, data: bytes) -> None:
        key = self._key(kind, name)
        self._call("write", name, self._client.put_object, Bucket=self._bucket, Key=key,
                   Body=bytes(data))

    def save_file(self, kind: str, name: str, path: Path) -> None:
        """Upload a finished local file, then delete it."""
        key = self._key(kind, name)
        size = os.stat(path).st_size
        if size < self.options.multipart_threshold:
            with open(path, "rb") as f:  # streamed, and rewound by botocore for a retry
                self._call("write", name, self._client.put_object, Bucket=self._bucket,
                           Key=key, Body=f)
        else:
            self._upload_parts(key, name, path, size)
        os.unlink(path)

    def _upload_parts(self, key: str, name: str, path: Path, size: int) -> None:
        started = self._call("write", name, self._client.create_multipart_upload,
                             Bucket=self._bucket, Key=key)
        upload = started["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:
                for number, _ in enumerate(range(0, size, self.options.part_size), start=1):
                    body = f.read(self.options.part_size)
                    done = self._call("write", name, self._client.upload_part,
                                      Bucket=self._bucket, Key=key, UploadId=upload,
                                      PartNumber=number, Body=body)
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
            self._call("write", name, self._client.complete_multipart_upload,
                       Bucket=self._bucket, Key=key, UploadId=upload,
                       MultipartUpload={"Parts": parts})
        except BaseException:
            # Its parts are billed until aborted. Best effort: if this fails too (the
            # store is unreachable), the bucket's lifecycle rule clears them.
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=key,
                                                    UploadId=upload)
            except Exception:  # noqa: BLE001 -- the first failure is the one to report
                pass
            raise

    def remove(self, kind: str, name: str) -> None:
        # S3 answers a DELETE of a missing key with success: nothing to catch.
        self._call("remove", name, self._client.delete_object, Bucket=self._bucket,
                   Key=self._key(kind, name))

    def remove_many(self, kind: str, names: Iterable[str]) -> None:
        keys = [self._key(kind, n) for n in names]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            result = self._call("remove", f"{len(batch)} objects", self._client.delete_objects,
                                Bucket=self._bucket,
                                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            failed = [e for e in result.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise ObjectStoreError(
                    f"the object store did not delete {len(failed)} object(s), e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())

    # -- reading ---------------------------------------------------------------
    def load(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""  # no such thing as an empty HTTP range
        extra = {}
        if length is not None:
            extra["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            extra["Range"] = f"bytes={offset}-"
        key = self._key(kind, name)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                resp = self._call("read", name, self._client.get_object, Bucket=self._bucket,
                                  Key=key, **extra)
            except _RangeBeyondEnd:
                return b""  # the object ends before `offset`
            try:
                data: bytes = resp["Body"].read()
                return data
            except (botocore.exceptions.ResponseStreamingError,
                    botocore.exceptions.IncompleteReadError,
                    botocore.exceptions.ReadTimeoutError) as exc:
                if attempt == BODY_ATTEMPTS:
                    raise self._failure("read", name, exc) from None
            finally:
                resp["Body"].close()
        raise AssertionError("unreachable")

    def stat(self, kind: str, name: str) -> ObjectInfo:
        head = self._call("read", name, self._client.head_object, Bucket=self._bucket,
                          Key=self._key(kind, name))
        return ObjectInfo(int(head["ContentLength"]), head["LastModified"].timestamp())

    def exists(self, kind: str, name: str) -> bool:
        try:
            self.stat(kind, name)
        except ObjectNotFound:
            return False
        return True

    def list(self, kind: str) -> Iterator[str]:
        """Names in key order (which is name order: the fan-out folder is the name's own
        first two characters), a page of up to 1,000 per request."""
        if kind not in KINDS or kind in AT_ROOT:
            raise ValueError(f"objects of kind {kind!r} cannot be listed")
        base = f"{self._prefix}{kind}/"
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list", kind, self._client.list_objects_v2, Bucket=self._bucket,
                              Prefix=base, **extra)
            for item in page.get("Contents", []):
                name = _name_in(kind, item["Key"][len(base):])
                if name is not None:
                    yield name
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def close(self) -> None:
        self._client.close()

    # -- requests and their failures -------------------------------------------------
    def _call(self, doing: str, what: str, method: Callable[..., T], **kwargs: Any) -> T:
        try:
            return method(**kwargs)
        except botocore.exceptions.ClientError as exc:
            raise self._client_error(doing, what, exc, kwargs) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._failure(doing, what, exc) from None

    def _client_error(self, doing: str, what: str, exc: botocore.exceptions.ClientError,
                      kwargs: dict[str, Any]) -> Exception:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = str(error.get("Message", "")) or code
        if code == "NoSuchBucket":
            return ObjectStoreError(f"bucket {self._bucket!r} does not exist at {self._where} "
                                    "(create it first)")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"object {what[:16]} is missing from {self.location}")
        if code == "InvalidRange" or status == 416:
            return _RangeBeyondEnd()
        if code in _QUOTA_CODES or status == 507:
            return StoreFull(f"the object store refuses to {doing} {what[:16]}: {message}")
        if code in _DENIED_CODES:
            return ObjectStoreError(f"access denied to {self.location} at {self._where} "
                                    f"({code}: {message}); check the credentials and the "
                                    "bucket policy")
        return ObjectStoreError(f"the object store failed to {doing} {what[:16]} "
                                f"in {self.location}: {code or status} {message}".rstrip())

    def _failure(self, doing: str, what: str, exc: Exception) -> ObjectStoreError:
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return ObjectStoreError("no credentials for the object store: set "
                                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)")
        if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                            botocore.exceptions.ConnectTimeoutError)):
            return ObjectStoreError(f"cannot reach the object store at {self._where}")
        # The message of a botocore error is one line and names the request.
        reason = " ".join(str(exc).split())
        return ObjectStoreError(f"the object store failed to {doing} {what[:16]} "
                                f"in {self.location}: {reason}")


class _RangeBeyondEnd(Exception):
    """A ranged GET that starts past the end of the object (HTTP 416)."""


def _name_in(kind: str, rest: str) -> str | None:
    """The object name a key below `<kind>/` stands for, or None for a key that is not
    one of ours (a temp file copied along, a folder marker)."""
    if kind in FANNED_OUT:
        fan, _, name = rest.partition("/")
        if fan != name[:2] or "/" in name:
            return None
    else:
        name = rest
        if "/" in name:
            return None
    if not name or name.startswith("."):
        return None
    return name

