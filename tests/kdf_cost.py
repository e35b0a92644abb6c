"""scrypt at a test cost in the suite's processes.

The product derives every key file's key (signing keys, an encrypted store's master key)
and every password hash with scrypt at N=2^15: 0.1-0.3 s of CPU each, and the suite
derives some 400 of them a run. The fork server (tests/cli_forkserver.py) and the test
workers (tests/conftest.py) lower both to N=2^10; each file and hash records its own cost,
so nothing else changes. The real costs are checked: the key files' in a fresh interpreter
(test_signing.test_new_key_files_take_the_full_scrypt_cost), the passwords' with the
product's value kept here (test_users_roles.test_passwords_are_salted_scrypt_hashes); the
commands run by real exec (STRATA_TEST_EXEC=1, the README walk's `make demo`) keep them.
"""

from strata.server import passwords
from strata.store import crypto

# The product's own costs, read before anything lowers them.
PRODUCT_KEY_FILE_LOG_N = crypto.SCRYPT_LOG_N
PRODUCT_PASSWORD_LOG_N = passwords.SCRYPT_LOG_N
TEST_LOG_N = 10


def lower() -> None:
    crypto.SCRYPT_LOG_N = TEST_LOG_N
    passwords.SCRYPT_LOG_N = TEST_LOG_N
