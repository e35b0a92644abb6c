"""The agent's HTTP client: authentication, retries with backoff, bandwidth limits, and
a count of every byte that crosses the wire in either direction."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from strata.agent.throttle import TokenBucket
from strata.errors import StrataError
from strata.model.wire import BandwidthLimits
from strata.transport import describe_transport_error, is_certificate_error, system_trust

M = TypeVar("M", bound=BaseModel)
RETRY_STATUS = {429, 502, 503, 504}
OCTETS = "application/octet-stream"
RCVBUF_SECONDS = 0.02  # a capped download's socket receive buffer, in seconds of the cap
MAX_RETRY_AFTER = 60.0  # seconds: a server asking for longer is waited on for this long


class ServerUnreachable(StrataError):
    exit_code = 3

    def __init__(self, message: str, *, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after  # a busy server's Retry-After (seconds), else 0


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
                 download_rate: float | None = None, verify: bool | str | ssl.SSLContext = True,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.server = server.rstrip("/")
        if verify is True:
            verify = system_trust()
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout,
                                 verify=verify)
        self._verify, self._timeout = verify, timeout
        self._capped: dict[int, httpx.Client] = {}  # receive buffer -> client (downloads)
        self.retries = retries
        self.upload = TokenBucket(upload_rate, clock=clock, sleep=sleep)
        self.download = TokenBucket(download_rate, clock=clock, sleep=sleep)
        self.clock = clock
        self._bandwidth: BandwidthLimits | None = None  # the policy's, once followed
        self._local_upload = upload_rate
        self._local_time: Callable[[], dt.time] = _local_time_of_day
        self._caps_checked = -math.inf
        self.bytes_sent = 0
        self.bytes_received = 0
        self.retried = 0
        self.sleep = sleep  # injected: tests run a backoff without waiting it out
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()
        for client in self._capped.values():
            client.close()

    def _downloads(self) -> httpx.Client:
        """The client a download is read with. Under a cap, one whose connections have a
        small receive buffer (RCVBUF_SECONDS of the cap): the kernel otherwise takes in a
        megabyte or more at line speed (receive-buffer autotuning) before the agent has
        read any of it, and that burst crosses the link whatever the bucket does."""
        rate = self.download.rate
        if not rate:
            return self.http
        size = int(min(1 << 20, max(4096, rate * RCVBUF_SECONDS)))
        with self._lock:
            if size not in self._capped:
                option = (socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                self._capped[size] = httpx.Client(
                    timeout=self._timeout, transport=httpx.HTTPTransport(
                        verify=self._verify, socket_options=[option]))
            return self._capped[size]

    def follow(self, bandwidth: BandwidthLimits | None, local_upload: float | None = None,
               local_time: Callable[[], dt.time] | None = None) -> None:
        """Cap every transfer by the bandwidth policy (`local_upload`, the agent's own
        upload cap, too: the lower wins). The policy's time windows are read on the
        endpoint's clock at each request, and each second of a long body."""
        self._bandwidth, self._local_upload = bandwidth, local_upload
        if local_time is not None:
            self._local_time = local_time
        self._caps_checked = -math.inf
        self._check_caps()

    def _check_caps(self) -> None:
        now = self.clock()
        if now - self._caps_checked < 1.0:
            return
        self._caps_checked = now
        up, down = (self._bandwidth.caps_at(self._local_time()) if self._bandwidth
                    else (None, None))
        ups = [r for r in (up, self._local_upload) if r]
        self.upload.set_rate(min(ups) if ups else None)
        self.download.set_rate(down)

    def refusal(self, status: int, message: str) -> StrataError:
        """The error for a client-error answer (a subclass says more: see DeviceClient)."""
        return ServerRefused(status, message)

    def request(self, method: str, path: str, *, json: object = None,
                content: bytes | None = None, retries: int | None = None) -> httpx.Response:
        """Send with retries on network errors and 502-504; raise one clear error."""
        return self._send(method, path, json=json, content=content, retries=retries)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, *, json: object = None,
               retries: int | None = None) -> Iterator[BodyReader]:
        """Send like `request`, then read the answer's body as it arrives (BodyReader), so
        that what came before a broken connection can be kept (agent/resume.py). A
        connection lost while reading is a ServerUnreachable; it is not retried here: only
        the caller knows what is still missing."""
        resp = self._send(method, path, json=json, retries=retries, stream=True)
        try:
            yield BodyReader(self, resp)
        finally:
            resp.close()

    def _send(self, method: str, path: str, *, json: object = None,
              content: bytes | None = None, retries: int | None = None,
              stream: bool = False) -> httpx.Response:
        delay = 0.5
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            self._check_caps()
            if content and self.upload.rate:
                # The body goes out in small pieces, each paid for as it leaves.
                req = self.http.build_request(method, path, content=self._paced(content),
                                              headers={"Content-Type": OCTETS,
                                                       "Content-Length": str(len(content))})
                body = content
            else:
                req = self.http.build_request(
                    method, path, json=json, content=content,
                    headers={"Content-Type": OCTETS} if content else None)
                body = req.content
                self.upload.consume(len(body))
            resp_busy = False
            try:
                resp = (self._downloads() if stream else self.http).send(req, stream=stream)
                streamed = stream and resp.status_code < 400 and resp.status_code != 409
                if stream and not streamed:
                    resp.read()  # an error's detail, not a download: read it whole
            except httpx.TransportError as exc:
                failure: str = describe_transport_error(self.server, exc)
                if is_certificate_error(exc):
                    # Retrying at once will not make it trusted; the daemon tries again at
                    # its next check-in (someone in between may have left by then).
                    raise ServerUnreachable(failure) from None
            else:
                with self._lock:
                    self.bytes_sent += len(body) + _header_bytes(req.headers) + len(path) + 16
                    self.bytes_received += _header_bytes(resp.headers) + 16 + (
                        0 if streamed else len(resp.content))
                if not streamed:
                    self.download.consume(len(resp.content))
                if resp.status_code not in RETRY_STATUS:
                    if resp.status_code >= 400 and resp.status_code != 409:
                        raise self.refusal(resp.status_code, _message(resp))
                    return resp
                resp.close()
                failure = f"server busy ({resp.status_code})"
                delay = max(delay, _retry_after(resp))
                resp_busy = True
            if attempt == retries:
                raise ServerUnreachable(failure, retry_after=delay if resp_busy else 0.0)
            with self._lock:
                self.retried += 1
            self.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _paced(self, body: bytes) -> Iterator[bytes]:
        view, step = memoryview(body), self.upload.piece  # one size: the cap may change
        for start in range(0, len(body), step):
            piece = view[start:start + step]
            self.upload.consume(len(piece))
            yield bytes(piece)
            self._check_caps()


def _local_time_of_day() -> dt.time:
    return dt.datetime.now().time()


class BodyReader:
    """An answer's body read piece by piece (a file-like `read`): every piece is counted
    and passes the download cap as it arrives, so the cap holds on the byte stream itself
    rather than on whole answers; a connection that breaks midway is a ServerUnreachable."""

    def __init__(self, client: ServerClient, resp: httpx.Response):
        self.client = client
        self.resp = resp
        self._pieces = resp.iter_bytes(client.download.piece)
        self._buffer = b""

    def read(self, n: int = -1, /) -> bytes:
        if not self._buffer:
            try:
                self._buffer = next(self._pieces, b"")
            except httpx.TransportError as exc:
                raise ServerUnreachable(describe_transport_error(self.client.server, exc)
                                        ) from None
            if self._buffer:
                with self.client._lock:
                    self.client.bytes_received += len(self._buffer)
                self.client.download.consume(len(self._buffer))
                self.client._check_caps()
        if n < 0:
            n = len(self._buffer)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


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
