"""Errors that reach the user as one clear line and an exit code."""


class StrataError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits with `exit_code`,
    the server answers it with `http_status` and the message as `detail`."""

    exit_code = 2
    http_status = 400


# Exit codes a script can tell apart, as restic's: 10 no store there, 11 locked by
# another process, 12 wrong passphrase (every other refusal is 2).


class StoreNotFound(StrataError):
    exit_code = 10


class StoreExists(StrataError):
    pass


class WrongPassphrase(StrataError):
    exit_code = 12


class SnapshotNotFound(StrataError):
    pass


class PathNotInSnapshot(StrataError):
    pass


class StoreLocked(StrataError):
    exit_code = 11


class UnsafePath(StrataError):
    """A manifest path that would escape the restore target."""


class StoreWriteFailed(StrataError):
    """Writing new data into the store failed (a full disk, an I/O error): the backup
    stops, since carrying on would save a snapshot without the files it could not store."""

    http_status = 507  # Insufficient Storage: the server's problem, not the request's


class CorruptData(StrataError):
    """Bytes read back from the store do not match what they claim to be."""

    exit_code = 1
    http_status = 500  # the server's own data is damaged: not the request's fault


class MissingChunks(StrataError):
    """A snapshot commit references chunks the store does not hold."""

    http_status = 409

    def __init__(self, missing: list[bytes]):
        self.missing = missing
        super().__init__(f"{len(missing)} referenced chunk(s) are not in the store")


# What the server's services raise for a request they refuse (server/services/); the
# app answers each with its status and the message, so no service knows about HTTP.


class NotFound(StrataError):
    """The request names something that does not exist (or that the caller may not see:
    another endpoint's snapshot reads exactly like one that does not exist)."""

    http_status = 404


class Conflict(StrataError):
    """The request is well-formed but the current state refuses it (a layer still in
    use, an endpoint that has not centralized yet)."""

    http_status = 409


class Invalid(StrataError):
    """The request itself is malformed: a bad reference, a value out of range."""

    http_status = 422


class Forbidden(StrataError):
    """The caller is known but may not do this."""

    http_status = 403


class TooLarge(StrataError):
    """The request asks for more work than one request may cost."""

    http_status = 413


# Why a connection failed, in words (httpx's exception class names are not causes).
_TRANSPORT_CAUSES = {
    "ConnectError": "connection refused or host not found",
    "ConnectTimeout": "timed out while connecting",
    "ReadTimeout": "the server did not answer in time",
    "WriteTimeout": "timed out while sending",
    "PoolTimeout": "timed out waiting for a connection",
    "ReadError": "the connection broke while reading",
    "WriteError": "the connection broke while sending",
    "RemoteProtocolError": "the server closed the connection without a proper answer",
    "LocalProtocolError": "the request could not be sent",
    "UnsupportedProtocol": "the address must start with http:// or https://",
    "ProxyError": "the proxy refused the connection",
}


def transport_cause(exc: BaseException) -> str:
    """A network failure as a person reads it: the OS's reason when there is one
    (`Connection refused`, `Name or service not known`, a certificate error), else what
    the kind of failure means."""
    text = str(exc).strip()
    if text.startswith("[Errno"):
        text = text.partition("]")[2].strip()
    generic = _TRANSPORT_CAUSES.get(type(exc).__name__, "")
    if not text or type(exc).__name__ in ("UnsupportedProtocol", "RemoteProtocolError"):
        return generic or type(exc).__name__
    return text
