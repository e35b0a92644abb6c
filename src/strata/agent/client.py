"""The agent's HTTP client: authentication, retries with backoff, bandwidth limits, and
a count of every byte that crosses the wire in either direction."""

from __future__ import annotations

import ssl
import threading
import time
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from strata.agent.throttle import TokenBucket
from strata.errors import StrataError
from strata.transport import describe_transport_error, is_certificate_error

M = TypeVar("M", bound=BaseModel)
RETRY_STATUS = {429, 502, 503, 504}
MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is waited on for this long


class ServerUnreachable(StrataError):
    exit_code = 3


class ServerRefused(StrataError):
    """The server answered with a client error; retrying will not help."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def _header_bytes(headers: httpx.Headers) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class ServerClient:
    def __init__(self, server: str, credential: str | None = None, *, retries: int = 5,
                 timeout: float = 120.0, upload_rate: float | None = None,
                 download_rate: float | None = None, verify: bool | str | ssl.SSLContext = True):
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout,
                                 verify=verify)
        self.retries = retries
        self.upload = TokenBucket(upload_rate)
        self.download = TokenBucket(download_rate)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retried = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def set_limits(self, upload_rate: float | None, download_rate: float | None) -> None:
        self.upload = TokenBucket(upload_rate)
        self.download = TokenBucket(download_rate)

    def refusal(self, status: int, message: str) -> StrataError:
        """The error for a client-error answer (a subclass says more: see DeviceClient)."""
        return ServerRefused(status, message)

    def request(self, method: str, path: str, *, json: object = None,
                content: bytes | None = None, retries: int | None = None) -> httpx.Response:
        """Send with retries on network errors and 502-504; raise one clear error."""
        delay = 0.5
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            req = self.http.build_request(
                method, path, json=json, content=content,
                headers={"Content-Type": "application/octet-stream"} if content else None)
            body = req.content
            self.upload.consume(len(body))
            try:
                resp = self.http.send(req)
            except httpx.TransportError as exc:
                failure: str = describe_transport_error(self.server, exc)
                if is_certificate_error(exc):
                    # Retrying at once will not make it trusted; the daemon tries again at
                    # its next check-in (someone in between may have left by then).
                    raise ServerUnreachable(failure) from None
            else:
                with self._lock:
                    self.bytes_sent += len(body) + _header_bytes(req.headers) + len(path) + 16
                    self.bytes_received += len(resp.content) + _header_bytes(resp.headers) + 16
                self.download.consume(len(resp.content))
                if resp.status_code not in RETRY_STATUS:
                    if resp.status_code >= 400 and resp.status_code != 409:
                        raise self.refusal(resp.status_code, _message(resp))
                    return resp
                failure = f"server busy ({resp.status_code})"
                delay = max(delay, _retry_after(resp))
            if attempt == retries:
                raise ServerUnreachable(failure)
            with self._lock:
                self.retried += 1
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")


class MalformedAnswer(StrataError):
    """The server's answer does not have the shape the agent expects (or names a file
    with a path): nothing is done with it."""


def parse_answer(resp: httpx.Response, model: type[M]) -> M:
    """The server's JSON answer checked against its schema before any of it is used (ids
    that will name files are checked there too: model/wire.py)."""
    try:
        return model.model_validate(resp.json())
    except (ValueError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            why = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        else:
            why = "not JSON"
        raise MalformedAnswer(f"the server's answer to {resp.request.url.path} is malformed "
                              f"({why}): ignored") from None


def _retry_after(resp: httpx.Response) -> float:
    """The server's Retry-After (seconds), bounded; 0 when absent or unreadable."""
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(resp.headers.get("Retry-After", "0"))))
    except ValueError:
        return 0.0


def _message(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = resp.text[:200]
    return f"server refused ({resp.status_code}): {detail}"
