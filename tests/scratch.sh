#!/bin/sh
# `tests/scratch.sh COMMAND ARGS...`: run the tests with their temporary files (TMPDIR) in
# a new folder on /dev/shm, removed when they end, if /dev/shm is a tmpfs with room for a
# whole run. A run writes about 3 GB of trees, stores and catalogs, durably: on a tmpfs
# fsync and unlink cost nothing, on this machine's ext4 (mounted with `discard`) they cost
# about 25 s of CPU and 50 s of wall time per `make test`.
# A TMPDIR you set is used as it is, and kept (e.g. `TMPDIR=/var/tmp make test` to look
# at a failed test's files afterwards).
set -u
NEEDED_KIB=$((6 * 1024 * 1024))  # a run's 3 GB, twice over

if [ -n "${TMPDIR:-}" ] || [ "$(stat -f -c %T /dev/shm 2>/dev/null)" != tmpfs ] || \
        [ "$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')" -lt "$NEEDED_KIB" ]; then
    exec "$@"
fi
dir=$(mktemp -d /dev/shm/strata-tests.XXXXXX) || exec "$@"
chmod 755 "$dir"  # the tests' PostgreSQL runs as `postgres` in a folder of its own in it
trap 'rm -rf "$dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
TMPDIR=$dir "$@"
