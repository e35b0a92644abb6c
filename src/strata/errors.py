"""Errors that reach the user as one clear line and an exit code."""


class StrataError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 2


class StoreNotFound(StrataError):
    pass


class StoreExists(StrataError):
    pass


class WrongPassphrase(StrataError):
    pass


class SnapshotNotFound(StrataError):
    pass


class PathNotInSnapshot(StrataError):
    pass


class StoreLocked(StrataError):
    pass


class UnsafePath(StrataError):
    """A manifest path that would escape the restore target."""


class StoreWriteFailed(StrataError):
    """Writing new data into the store failed (a full disk, an I/O error): the backup
    stops, since carrying on would save a snapshot without the files it could not store."""

    http_status = 507  # Insufficient Storage: the server's problem, not the request's


class CorruptData(StrataError):
    """Bytes read back from the store do not match what they claim to be."""

    exit_code = 1


class MissingChunks(StrataError):
    """A snapshot commit references chunks the store does not hold."""

    def __init__(self, missing: list[bytes]):
        self.missing = missing
        super().__init__(f"{len(missing)} referenced chunk(s) are not in the store")
