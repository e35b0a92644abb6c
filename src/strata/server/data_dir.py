"""The server's data directory as a place for secrets: the admin token, the catalog (which
names every endpoint and file), the store's packs and the TLS key are readable by the
server's own user only."""

from __future__ import annotations

import os
from pathlib import Path

from strata.errors import StrataError

MARKER = "admin.token"  # what every data directory holds from its first start on
# What a server keeps there: a directory holding only these (a store copied in before
# the first start, say) is a data directory too.
OWN_NAMES = ("store", "store-state", "signing", "tls", "cache", "catalog.sqlite")


def lock_down(data_dir: Path) -> None:
    """Create `data_dir` (0700), or tighten it to 0700 when it is a Strata data directory
    or empty, and make everything this process creates from now on 0600 (directories
    0700). Files an older version made under it are out of other users' reach once the
    directory is 0700, whatever their own mode. A directory that holds other things is
    refused rather than chmodded: `--data /tmp` is a mistake, and closing /tmp to every
    other user would be a worse one."""
    os.umask(0o077)
    if not data_dir.exists():
        data_dir.mkdir(parents=True, mode=0o700)
        return
    if not data_dir.is_dir():
        raise StrataError(f"--data {data_dir} is not a directory")
    foreign = [p.name for p in data_dir.iterdir() if not p.name.startswith(OWN_NAMES)]
    if not (data_dir / MARKER).exists() and foreign:
        raise StrataError(f"{data_dir} holds other files ({', '.join(sorted(foreign)[:3])}"
                          f"{', …' if len(foreign) > 3 else ''}) and is not a Strata data "
                          f"directory (no {MARKER}): give --data a new or empty directory")
    if data_dir.stat().st_mode & 0o077:
        os.chmod(data_dir, 0o700)
