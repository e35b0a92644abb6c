"""A local S3-compatible server for the tests: moto's server mode (tests/moto_server.py) in a
subprocess on a free loopback port (its own process, so it does not share the tests' GIL,
and `strata server` processes can reach it too). Every test takes a bucket of its own.

The `s3` and `s3_bucket` fixtures in conftest.py start it only for tests that ask.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import httpx

from server_fixtures import free_port
from strata.store.s3 import S3Backend, S3Location, S3Options

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "strata-test", "AWS_SECRET_ACCESS_KEY": "strata-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self._session = boto3.session.Session()  # holds the loaded service models

    def start(self, timeout: float = 60) -> MotoServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H",
                 "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited:\n" + self.log.read_text(errors="replace"))
            try:
                httpx.get(self.url + "/moto-api/", timeout=2, verify=False)  # plain HTTP
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not answer in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def env(self) -> dict[str, str]:
        """What a `strata` subprocess needs to reach this server, the usual AWS way."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.url}

    def client(self) -> Any:
        """One client for the whole session (they are thread-safe; making one costs
        botocore a few hundred milliseconds of loading its service models)."""
        if self._client is None:
            self._client = self.new_client()
        return self._client

    def new_client(self) -> Any:
        """A client of its own (event hooks a test registers on it stay with it)."""
        return self._session.client(
            "s3", endpoint_url=self.url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=botocore.config.Config(retries={"mode": "standard"},
                                          max_pool_connections=32))

    def new_bucket(self) -> str:
        name = f"strata-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Free moto's memory: every object, unfinished upload and the bucket."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=name)

    def backend(self, bucket: str, prefix: str = "store/", **options: Any) -> S3Backend:
        """An S3Backend on this server, its client built from explicit test credentials."""
        return S3Backend(S3Location(bucket, prefix), S3Options(endpoint_url=self.url, **options),
                         client=self.new_client())


def without_aws_settings() -> dict[str, str]:
    """This process's environment less any AWS_* a developer's shell may carry."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
