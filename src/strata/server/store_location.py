"""Which store a server runs on: DATA/store by default, another directory, or an object
store (`--store s3://BUCKET/PREFIX`) whose working state (chunk index, locks, upload
spool) lives in DATA/store-state. A data directory serves one store: its catalog names
that store's snapshots, so a server started on another one is refused."""

from __future__ import annotations

from pathlib import Path

from strata.errors import StoreNotFound, StrataError
from strata.store.location import init_store_at, is_object_store, open_store_at, read_binding
from strata.store.repository import SharedState, Store

STATE_DIR = "store-state"


def open_server_store(data_dir: Path, location: str = "", *, s3_endpoint_url: str = "",
                      s3_region: str = "", passphrase: str | None = None,
                      encrypt: bool = False, shared: SharedState | None = None) -> Store:
    """Open (or create, on first start) the server's store at `location`. With `encrypt`
    a new store is encrypted under `passphrase`, and an existing one must be; an
    encrypted store opens with `passphrase` whether `encrypt` is given or not. `shared`:
    the index and locks in the catalog database, for several server processes."""
    state: Path | None = data_dir / STATE_DIR
    bound = read_binding(data_dir / STATE_DIR)
    if not is_object_store(location):
        if bound is not None:
            raise StrataError(f"the store of {data_dir} is at {bound['location']}: start "
                              f"the server with --store {bound['location']}")
        location = location or str(data_dir / "store")
        state = None
    elif (data_dir / "store" / "config").exists():
        raise StrataError(f"{data_dir / 'store'} holds this data directory's local store; to "
                          f"move it to {location}, copy its objects there and move that "
                          "folder away (see docs/deployment.md)")
    options: dict = {"s3_endpoint_url": s3_endpoint_url, "s3_region": s3_region, "shared": shared}
    if encrypt and not passphrase:
        raise StrataError("--encrypt needs the passphrase or key: --passphrase-file FILE "
                          "(or STRATA_PASSPHRASE_FILE, STRATA_PASSPHRASE)")
    try:
        store = open_store_at(location, state, passphrase, **options)
    except StoreNotFound:
        return init_store_at(location, state, passphrase=passphrase if encrypt else None, **options)
    except StrataError as exc:
        if "encrypted" in str(exc) and not passphrase:
            raise StrataError(f"the store at {location} is encrypted: start the server with "
                              "--encrypt --passphrase-file FILE") from None
        raise
    if encrypt and store.config.encryption == "none":
        store.close()
        raise StrataError(f"the store at {location} was created without encryption: "
                          "--encrypt applies to a new store (copy the data into an "
                          "encrypted one with `strata store`, or start without --encrypt)")
    return store
