"""Verifying signed metadata with python-tuf's client (ngclient), from a pinned root.

The agent pins the root at enrollment; the image manager's CLI pins the one it made at
`strata signing init`. Each refresh lets ngclient walk the root chain (key rotations),
then check timestamp, snapshot and targets: signatures by the keys the root names,
versions that never go back, expiry dates. Nothing here repeats those checks; it only
carries the files over the caller's own authenticated connection and turns ngclient's
errors into sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from strata.errors import StrataError
from strata.signing import PINNED_ROOT, LayerRefused
from strata.signing.catalog import MalformedMetadata, SignedCatalog
from strata.signing.metadata import MAX_METADATA_BYTES
from strata.store.backend import atomic_write

_BASE_URL = "strata-metadata:/"  # never dialled: the fetcher maps names to requests


class MetadataMissing(Exception):
    """The server has no such metadata file (the end of the root chain, for one)."""


Fetch = Callable[[str], bytes]  # a metadata file name -> its bytes; MetadataMissing if none


@dataclass(frozen=True)
class Trusted:
    """The metadata ngclient verified in this refresh."""

    root: Root
    targets: Targets
    catalog: SignedCatalog

    @property
    def fingerprint(self) -> str:
        return root_fingerprint(self.root)


class _Fetcher(FetcherInterface):
    def __init__(self, fetch: Fetch):
        self._get = fetch  # not `fetch`: that is the interface's own method

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rsplit("/", 1)[-1]
        try:
            return iter([self._get(name)])
        except MetadataMissing:
            raise tuf_errors.DownloadHTTPError(f"{name}: not found", 404) from None


def root_fingerprint(root: Root) -> str:
    return ",".join(sorted(root.roles["root"].keyids))


def check_root(root_bytes: bytes, expected: str | None = None) -> str:
    """The fingerprint of a root signed by its own root keys; when `expected` is given,
    it must be the one IT was shown (`strata signing init` prints it)."""
    try:
        md = Metadata[Root].from_bytes(root_bytes)
        if not isinstance(md.signed, Root):
            raise ValueError("not a root")
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    except (ValueError, tuf_errors.RepositoryError, KeyError, TypeError) as exc:
        raise LayerRefused(f"the server's signing root is not valid root metadata ({exc})") \
            from None
    fp = root_fingerprint(md.signed)
    if expected is not None and expected.strip().lower() not in fp.split(","):
        raise LayerRefused(f"the server's signing root has fingerprint {fp}, not "
                           f"{expected.strip()}: refusing to trust it (is this the right "
                           "server?)")
    return fp


def pin_root(directory: Path, root_bytes: bytes, expected: str | None = None) -> str:
    """Trust this root from now on (the agent at enrollment); see check_root."""
    fp = check_root(root_bytes, expected)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(directory / PINNED_ROOT, root_bytes)
    return fp


def pinned_fingerprint(directory: Path) -> str | None:
    try:
        return root_fingerprint(Metadata[Root].from_file(str(directory / PINNED_ROOT)).signed)
    except FileNotFoundError:
        return None


def refresh(directory: Path, fetch: Fetch) -> Trusted:
    """Bring the trusted metadata up to date and return it, or raise LayerRefused."""
    try:
        bootstrap = (directory / PINNED_ROOT).read_bytes()
    except FileNotFoundError:
        raise LayerRefused("this agent has no pinned signing root, so it accepts no layer: "
                           "it was enrolled before `strata signing init` ran on the server "
                           "(pin it with `strata agent trust-root --fingerprint FP`)") from None
    cache = directory / "metadata"
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = UpdaterConfig(targets_max_length=MAX_METADATA_BYTES,
                           snapshot_max_length=1 << 20)
    try:
        updater = Updater(str(cache), _BASE_URL, fetcher=_Fetcher(fetch), config=config,
                          bootstrap=bootstrap)
        updater.refresh()
    except tuf_errors.ExpiredMetadataError as exc:
        raise LayerRefused(f"the signed layer metadata is stale ({_role_of(exc)} has "
                           "expired): the server is not offering fresh metadata, so nothing "
                           "new is accepted (an image manager refreshes it with `strata "
                           "signing refresh`)") from None
    except tuf_errors.BadVersionNumberError as exc:
        raise LayerRefused(f"the server offered older layer metadata than this endpoint "
                           f"already trusts ({exc}): refusing a rollback") from None
    except tuf_errors.RepositoryError as exc:
        raise LayerRefused(f"the layer metadata from the server does not verify ({exc}): "
                           "refusing forged or damaged metadata") from None
    except tuf_errors.DownloadError as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, StrataError):
            raise cause from None  # e.g. the server is unreachable: not a refusal
        raise StrataError(f"cannot fetch layer metadata: {cause}") from None
    try:  # what ngclient just verified and persisted (it writes only verified files)
        root = Metadata[Root].from_file(str(cache / "root.json")).signed
        targets = Metadata[Targets].from_file(str(cache / "targets.json")).signed
        return Trusted(root=root, targets=targets, catalog=SignedCatalog.from_targets(targets))
    except MalformedMetadata as exc:
        raise LayerRefused(f"the signed layer metadata is not in Strata's shape ({exc})") \
            from None


def _role_of(exc: Exception) -> str:
    text = str(exc)
    for role in ("root", "timestamp", "snapshot", "targets"):
        if role in text:
            return f"its {role} metadata"
    return "it"
