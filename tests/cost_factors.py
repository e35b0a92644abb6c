"""The product's work factors at a test cost in the suite's processes.

What the suite checks of a key derivation or a compressed download does not depend on
how hard it works, and the product's factors are set for production:

- scrypt at N=2^15 for every key file's key (signing keys, an encrypted store's master
  key) and every password hash: 0.1-0.3 s of CPU each, some 400 a run. Lowered to N=2^4;
  each file and hash records its own cost, so nothing else changes.
- zstd level 19 (12 for an endpoint's own data) for the download streams of layers and
  their manifests: on the suite's trees, most of a server's CPU (a migration test's
  server: 11.8 CPU s, 5.3 at level 3). Lowered to 3; a stream says nothing of its level
  to its reader. Which level the server picks is checked against the product's values
  kept here (tests/test_download_levels.py).
- zstd level 19 for file deltas: most of the rest (a 1.5 MiB binary with small edits:
  0.38 s at 19 for a 2.5 kB delta, 0.03 s at 9 for 18 kB). Lowered to 9, not 3: whether a
  delta pays against the chunks, which the tests check, needs a delta that finds the old
  file's matches (at 3 most of the tests' deltas did not pay).

The fork server (tests/cli_forkserver.py) and the test workers (tests/conftest.py) lower
them. The real costs are checked: the key files' in a fresh interpreter
(test_signing.test_new_key_files_take_the_full_scrypt_cost), the passwords' with the
product's value kept here (test_users_roles.test_passwords_are_salted_scrypt_hashes); the
commands run by real exec (STRATA_TEST_EXEC=1, the README walk's `make demo`) and the
benchmarks keep them all.
"""

from strata.engine import delta
from strata.server import passwords
from strata.store import crypto

# The product's own factors checked in this process, read before anything lowers them
# (the download levels by lower(server=True)); the key files' is checked in a fresh one.
PRODUCT_PASSWORD_LOG_N = passwords.SCRYPT_LOG_N
PRODUCT_LEVELS: dict[str, int] = {}  # layer_downloads' DOWNLOAD_, PRIVATE_, MANIFEST_LEVEL
TEST_LOG_N = 4
TEST_LEVEL = 3
TEST_DELTA_LEVEL = 9


def lower(*, server: bool) -> None:
    """`server`: the download levels too, in a process that runs servers (importing the
    server's services costs 0.7 s of CPU where only agents and reflectors run)."""
    crypto.SCRYPT_LOG_N = TEST_LOG_N
    passwords.SCRYPT_LOG_N = TEST_LOG_N
    delta.DELTA_LEVEL = TEST_DELTA_LEVEL
    if server:
        from strata.server.services import layer_downloads

        for name in ("DOWNLOAD_LEVEL", "PRIVATE_LEVEL", "MANIFEST_LEVEL"):
            PRODUCT_LEVELS.setdefault(name, getattr(layer_downloads, name))
            setattr(layer_downloads, name, TEST_LEVEL)
