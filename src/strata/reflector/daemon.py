"""The reflector's commands as library calls: enroll with the server, run (serve the
branch's agents, poll the server, warm assigned layers), report status, warm one layer
now, and import a layer bundle exported offline (`strata layer export`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from strata.agent.client import ServerClient, parse_answer
from strata.agent.location import read_site, write_site
from strata.errors import CorruptData, StrataError
from strata.model.reflector import ReflectorConfig as ServerAnswer
from strata.model.reflector import ReflectorEnrollResponse
from strata.model.transfer import iter_bundle
from strata.reflector.cache import ChunkCache
from strata.reflector.service import COUNTERS, ReflectorService
from strata.reflector.state import ReflectorConfig, ReflectorState
from strata.reflector.upstream import Upstream
from strata.store.pack import decode_payload

log = logging.getLogger("strata.reflector")
POLL_SECONDS = 10.0  # how often the reflector asks the server what to warm
IMPORT_BATCH = 256
COUNTERS_SECONDS = 2.0  # how often the counters are saved for `reflector status`


def enroll(state: ReflectorState, *, server: str, token: str, listen: str, cache: Path,
           cache_size: int, url: str = "", name: str = "", ca_cert: str = "",
           server_fingerprint: str | None = None, insecure: bool = False,
           tls: bool = False, force: bool = False, site: str | None = None
           ) -> ReflectorConfig:
    """Register with the server: the reflector's certificate (HTTPS beyond loopback, made
    in STATE/tls), its URL and name go to the server; its credential and the server's
    ticket key come back and are kept in STATE (0600). `site`: matched by the bandwidth
    rules, as an agent's (`strata agent site`), with the subnet it reaches the server from."""
    import socket

    from strata.server.listener import parse_listen
    from strata.server.tls import server_certificate
    from strata.transport import check_server_url, fetch_pinned_certificate, verify_setting

    if state.enrolled() and not force:
        raise StrataError(f"a reflector is already enrolled in {state.path} (--force enrolls "
                          "a new one)")
    server = check_server_url(server, insecure=insecure)
    address = parse_listen(listen)
    state.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert = server_certificate(address, state.path, tls=tls, insecure=insecure)
    host = socket.gethostname() if address.is_wildcard else address.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    url = (url or f"{'https' if cert else 'http'}://{host}:{address.port}").rstrip("/")
    pinned = fetch_pinned_certificate(server, server_fingerprint) if server_fingerprint else ""
    client = ServerClient(server, retries=2, verify=verify_setting(ca_cert, pinned_pem=pinned))
    try:
        resp = client.request("POST", "/api/v1/reflector/enroll", json={
            "token": token, "name": name or socket.gethostname()[:64] or "reflector",
            "url": url, "tls_cert": cert.cert.read_text() if cert else ""})
        done = parse_answer(resp, ReflectorEnrollResponse)
    finally:
        client.close()
    server_cert = ""
    if pinned:
        (state.path / "server-cert.pem").write_text(pinned)
        server_cert = str(state.path / "server-cert.pem")
    cfg = ReflectorConfig(server=server, reflector_id=done.reflector_id,
                          credential=done.credential, ticket_key=done.ticket_key,
                          listen=str(address), url=url, cache=str(cache.resolve()),
                          cache_size=cache_size, name=name, ca_cert=ca_cert,
                          server_cert=server_cert, insecure=insecure)
    ChunkCache(cache, cache_size).close()  # made now: a bad folder fails the enrollment
    write_site(state.path, site)
    state.save_config(cfg)
    return cfg


@contextlib.contextmanager
def opened(state: ReflectorState) -> Iterator[ReflectorService]:
    cfg = state.config()
    cache = ChunkCache(Path(cfg.cache), cfg.cache_size)
    upstream = Upstream(cfg)
    service = ReflectorService(cfg.reflector_id, bytes.fromhex(cfg.ticket_key), cache,
                               upstream, counters=state.counters())
    try:
        yield service
    finally:
        service.close()
        upstream.close()
        cache.close()


class Poller(threading.Thread):
    """Every POLL_SECONDS: report the counters, learn the status and the ticket key,
    warm each newly assigned layer; keeps the counters in STATE for `status`."""

    def __init__(self, service: ReflectorService, state: ReflectorState,
                 interval: float = POLL_SECONDS):
        super().__init__(name="reflector-poll", daemon=True)
        self.service, self.state, self.interval = service, state, interval
        self.stop = threading.Event()
        self.status = "unknown"

    def run(self) -> None:
        due = 0.0
        while not self.stop.is_set():
            if time.monotonic() >= due:
                self.once()
                due = time.monotonic() + self.interval
            self.state.save_counters(self.service.counters.snapshot())  # for `status`
            self.stop.wait(min(COUNTERS_SECONDS, self.interval))

    def once(self) -> None:
        try:
            answer = self.service.upstream.poll(self.service.stats(), read_site(self.state.path))
            self.service.ticket_key = bytes.fromhex(answer.ticket_key)
            self.status = answer.status
            self.state.save_heard({"status": answer.status, "at": time.time(),
                                   "assigned": [w.name for w in answer.warm],
                                   "bandwidth": caps(answer)})
            for layer in answer.warm:
                if layer.snapshot not in self.service.warmed and not self.stop.is_set():
                    n = self.service.warm(layer.snapshot, layer.name)
                    log.info("warmed layer %s: %d bytes from the server", layer.name, n)
        except StrataError as exc:  # the server away: serve from the cache meanwhile
            log.warning("poll: %s", exc)
        finally:
            self.state.save_counters(self.service.counters.snapshot())


def run(state: ReflectorState, *, poll_seconds: float = POLL_SECONDS) -> None:
    """Serve until interrupted (SIGTERM or Ctrl-C)."""
    import uvicorn

    from strata.reflector.app import create_app
    from strata.server.listener import bind, parse_listen
    from strata.server.tls import server_certificate

    cfg = state.config()
    address = parse_listen(cfg.listen)
    sock = bind(address)
    https = cfg.url.startswith("https://")
    cert = server_certificate(address, state.path, tls=https, insecure=not https)
    with opened(state) as service:
        poller = Poller(service, state, poll_seconds)
        poller.start()
        log.info("reflector %s serving on %s (cache %s, at most %d bytes)", cfg.reflector_id,
                 cfg.url, cfg.cache, cfg.cache_size)
        try:
            config = uvicorn.Config(create_app(service), log_level="warning",
                                    timeout_keep_alive=30,
                                    ssl_certfile=str(cert.cert) if cert else None,
                                    ssl_keyfile=str(cert.key) if cert else None)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            poller.stop.set()
            poller.join(timeout=10)
            state.save_counters(service.counters.snapshot())
            sock.close()


def caps(answer: ServerAnswer) -> dict:
    """The bandwidth caps in force at the last poll (kilobits per second; None: none)."""
    bw = answer.bandwidth
    return {"upload_kbps": bw.upload_kbps if bw else None,
            "download_kbps": bw.download_kbps if bw else None}


def status(state: ReflectorState) -> dict:
    """What `strata reflector status --json` prints: the counters the running reflector
    last saved, and the cache as it is now."""
    cfg = state.config()
    counters = state.counters()
    cache = ChunkCache(Path(cfg.cache), cfg.cache_size)
    try:
        cache_bytes = cache.stored_bytes()
    finally:
        cache.close()
    heard = state.heard()
    return {"reflector_id": cfg.reflector_id, "name": cfg.name, "server": cfg.server,
            "url": cfg.url, "listen": cfg.listen, "cache": cfg.cache,
            # as the server said at the last poll: active, quarantined (out of rotation)
            "status": heard.get("status", "unknown"),
            "assigned_layers": heard.get("assigned", []),
            # the caps its fetches follow, from the bandwidth rules for its site and subnet
            "bandwidth": heard.get("bandwidth", {}),
            "cache_limit": cfg.cache_size, "cache_bytes": cache_bytes,
            **{k: counters.get(k, 0) for k in COUNTERS}}


def warm(state: ReflectorState, layer: str) -> dict:
    """Fetch one layer now (NAME:VERSION as the server lists it for this reflector)."""
    with opened(state) as service:
        answer = service.upstream.poll(service.stats(), read_site(state.path))
        found = [w for w in answer.warm if w.name == layer or w.snapshot == layer]
        if not found:
            raise StrataError(f"layer {layer} is not assigned to any endpoint this reflector "
                              "serves (the server allows warming only those; `strata layer "
                              "export` and `strata reflector import` seed any layer offline)")
        started = time.monotonic()
        n = service.warm(found[0].snapshot, found[0].name)
        state.save_counters(service.counters.snapshot())
        return {"layer": found[0].name, "bytes_from_server": n,
                "seconds": round(time.monotonic() - started, 3), "bandwidth": caps(answer)}


def import_bundle(state: ReflectorState, source: IO[bytes]) -> dict:
    """Seed the cache from a layer bundle: every chunk verified against its id before it
    is kept; a damaged one is counted and skipped, never cached."""
    cfg = state.config()
    cache = ChunkCache(Path(cfg.cache), cfg.cache_size)
    chunks = bad = added = 0
    batch: list[tuple[bytes, bytes]] = []
    try:
        try:
            for cid, raw_length, payload in iter_bundle(source):
                try:
                    batch.append((cid, decode_payload(cid, payload, raw_length)))
                except CorruptData:
                    bad += 1
                    continue
                chunks += 1
                if len(batch) >= IMPORT_BATCH:
                    added += cache.put_many(batch)
                    batch = []
        except CorruptData as exc:
            raise StrataError(f"not a whole layer bundle: {exc} ({chunks} chunks read "
                              "before it were kept)") from None
        finally:
            added += cache.put_many(batch)
        return {"chunks": chunks, "bad_chunks": bad, "bytes_added": added,
                "cache_bytes": cache.stored_bytes()}
    finally:
        cache.close()
