"""`python tests/moto_server.py ARGS…`: moto's S3 server (`python -m moto.server ARGS…`),
less one cost of each request. Moto finds which AWS service a request is for by listing
its package's folders, on every request (a tenth of its CPU in the S3 tests); the list
cannot change while it runs, so it is read once here."""

from __future__ import annotations

import functools
import sys

from moto import backends
from moto.server import main

backends.list_of_moto_modules = functools.cache(  # type: ignore[assignment]
    lambda list_folders=backends.list_of_moto_modules: tuple(list_folders()))

if __name__ == "__main__":
    main(sys.argv[1:])
