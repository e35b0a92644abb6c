"""scrypt at a test cost in the suite's processes.

The product derives every key file's key (signing keys, an encrypted store's master key)
and every password hash with scrypt at N=2^15: 0.1-0.3 s of CPU each, and the suite
derives some 370 of them a run (38 CPU s, 6% of the whole). The fork server
(tests/cli_forkserver.py) lowers both to N=2^10 and the test workers the key files' (their
password tests lower it themselves, and test_users_roles checks the real one); each file
and hash records its own cost, so nothing else changes. The key files' real cost is
checked in a fresh interpreter (test_signing.test_new_key_files_take_the_full_scrypt_cost),
and the commands run by real exec (STRATA_TEST_EXEC=1, the README walk's `make demo`)
keep it.
"""

TEST_LOG_N = 10


def lower(*, passwords: bool) -> None:
    from strata.store import crypto

    crypto.SCRYPT_LOG_N = TEST_LOG_N
    if passwords:
        from strata.server import passwords as password_hashes

        password_hashes.SCRYPT_LOG_N = TEST_LOG_N
