"""Opening a store by where it lives: a local directory (objects and working state in one
folder) or an object store, `s3://BUCKET/PREFIX`, with the working state (chunk index,
locks, upload spool) in a local directory of its own.

A state directory remembers the one store it serves (`store.json`): an index that claims
chunks another store lacks would let writers skip uploading them. Every process that
writes to one object store must use the same state directory (its locks keep prune from
deleting what a backup is about to reference); several servers on one object store keep
the index and locks in their PostgreSQL catalog instead (`shared`, store/pg_shared.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strata.errors import StoreNotFound, StrataError
from strata.store.backend import atomic_write
from strata.store.blockcache import BlockCache
from strata.store.repository import PassphraseSource, SharedState, Store

if TYPE_CHECKING:
    from strata.store.s3 import S3Backend

BINDING = "store.json"


def is_object_store(location: str) -> bool:
    return location.startswith("s3://")


def open_store_at(location: str, state: Path | None,
                  passphrase: str | PassphraseSource | None = None, *,
                  s3_endpoint_url: str = "", s3_region: str = "",
                  shared: SharedState | None = None) -> Store:
    """Open the store at `location` (`StoreNotFound` if it has none). `shared`: the index
    and locks in a database several processes share, not in the working state."""
    if not is_object_store(location):
        return Store.open(_local(location, state), passphrase, shared=shared)
    backend, state = _object_store(location, state, s3_endpoint_url, s3_region)
    try:
        store = Store.open_on(BlockCache(backend), state, passphrase, shared)
    except StoreNotFound:
        backend.close()
        raise StoreNotFound(f"no Strata store at {backend.location}") from None
    except BaseException:
        backend.close()
        raise
    return _bound(store, state, str(backend.location))


def init_store_at(location: str, state: Path | None, *, passphrase: str | None = None,
                  s3_endpoint_url: str = "", s3_region: str = "",
                  **init_options: Any) -> Store:
    """Create a store at `location` (`StoreExists` if it has one); `init_options` (and
    `shared`) go to `Store.init_on`."""
    if not is_object_store(location):
        return Store.init(_local(location, state), passphrase=passphrase, **init_options)
    backend, state = _object_store(location, state, s3_endpoint_url, s3_region)
    try:
        store = Store.init_on(BlockCache(backend), state, passphrase=passphrase,
                              **init_options)
    except BaseException:
        backend.close()
        raise
    return _bound(store, state, str(backend.location))


def _local(location: str, state: Path | None) -> Path:
    if state is not None and Path(state).resolve() != Path(location).resolve():
        raise StrataError("--state is for a store on an object store; a local store keeps "
                          "its working state in its own directory")
    return Path(location)


def _object_store(location: str, state: Path | None, endpoint_url: str,
                  region: str) -> tuple[S3Backend, Path]:
    if state is None:
        raise StrataError(f"a store on an object store needs --state DIR for its local "
                          f"working state (index, locks); every process writing to "
                          f"{location} must use the same one")
    # Imported here: boto3 costs start-up time a local store need not pay.
    from strata.store.s3 import S3Backend, S3Location, S3Options

    where = S3Location.parse(location)
    read_binding(state)  # an unreadable binding is reported before any request
    return S3Backend(where, S3Options(endpoint_url=endpoint_url, region=region)), Path(state)


def _bound(store: Store, state: Path, where: str) -> Store:
    """Check (or record) that `state` serves this store, and index the packs it does not
    know yet: the state may be new, or older than the objects (restored from a backup,
    or another process wrote meanwhile)."""
    try:
        bound = read_binding(state)
        if bound is not None and bound["id"] != store.config.id:
            raise StrataError(f"{state} is the working state of the store {bound['id'][:12]} "
                              f"at {bound['location']}, but {where} holds the store "
                              f"{store.config.id[:12]}: give another state directory")
        if bound is None:
            atomic_write(state / BINDING, json.dumps(
                {"location": where, "id": store.config.id}, indent=1).encode())
        store.reconcile_index()
    except BaseException:
        store.close()
        raise
    return store


def read_binding(state: Path) -> dict[str, str] | None:
    """The store a state directory serves: {"location", "id"}, or None if not bound yet."""
    path = Path(state) / BINDING
    try:
        doc = json.loads(path.read_text())
        return {"location": str(doc["location"]), "id": str(doc["id"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StrataError(f"{path} is unreadable ({exc}); it names the store this working "
                          "state belongs to") from None
