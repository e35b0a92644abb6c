"""Layer signing set up in-process, over a FastAPI test client: for the tests of routes
that need signing (assignments, migrations, reverts) but are not about the agents' side."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from strata.signing.publisher import Keys, initialize


class _AdminApi:
    """The admin API strata.signing.publisher talks to, over the test client."""

    def __init__(self, client: TestClient):
        self.client = client

    def get(self, path: str) -> dict:
        return self.client.get("/api/v1/admin" + path).json()

    def post(self, path: str, body: dict) -> dict:
        resp = self.client.post("/api/v1/admin" + path, json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def get_bytes(self, path: str) -> bytes:
        return self.client.get("/api/v1/admin" + path).content


def init_signing_in_process(client: TestClient, keys: Path) -> None:
    """`strata signing init` against the test client, keys in `keys`."""
    initialize(_AdminApi(client), Keys(keys, b"test pass"))
