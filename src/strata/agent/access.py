"""Whether the server lets this endpoint in: approved, waiting for an administrator's
approval, revoked, or not known at all. The agent acts differently on each (keep checking
in, stop and say so), so a refusal is classified here once, not matched in every caller."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum, StrEnum

from strata.agent.client import ServerClient, ServerRefused
from strata.agent.state import Credential
from strata.errors import StrataError
from strata.transport import check_server_url


class ExitCode(IntEnum):
    """The agent's exit codes (documented in README.md and docs/centralization.md)."""

    OK = 0
    PARTIAL = 1  # done, but some files could not be read or restored
    REFUSED = 2  # a usage error, or the server or the local state refused the request
    UNREACHABLE = 3  # the server could not be reached; the work is kept and retried
    PENDING_APPROVAL = 4  # enrolled, waiting for an administrator's approval
    ACCESS_DENIED = 5  # revoked, or the server no longer knows this endpoint: enroll again


class Access(StrEnum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    PENDING = "pending"  # enrolled with a token that needs an administrator's approval
    REVOKED = "revoked"  # `strata endpoint revoke`: permanent for this credential
    UNKNOWN = "unknown"  # the server holds no such credential (the endpoint was deleted)


ADVICE = {
    Access.PENDING: "waiting for an administrator's approval (`strata endpoint approve ID`)",
    Access.REVOKED: "this endpoint's access was revoked by an administrator; to use this "
                    "machine again, enroll it anew with a new token "
                    "(`strata agent enroll --force`)",
    Access.UNKNOWN: "the server does not know this endpoint's credential (was the endpoint "
                    "deleted?); enroll it anew with a new token (`strata agent enroll --force`)",
}


class AccessDenied(ServerRefused):
    """The server refuses this endpoint's credential itself (not one request)."""

    def __init__(self, access: Access, status: int, server_message: str,
                 advice: str | None = None):
        super().__init__(status, advice or ADVICE[access])  # what to do, said plainly
        self.access = access
        self.server_message = server_message
        self.exit_code = (ExitCode.PENDING_APPROVAL if access is Access.PENDING
                          else ExitCode.ACCESS_DENIED)

def classify(exc: ServerRefused) -> AccessDenied | None:
    """The access refusal `exc` stands for, or None for a refusal of one request (a 403
    for a chunk outside the endpoint's layers is not a revocation).

    The server says which with its status and message (server/deps.py: require_device):
    401 for an unknown credential, 403 with "revoked" or "approval" for the others."""
    text = str(exc).lower()
    if exc.status == 401 and "credential expired" in text:
        # Known, but not renewed in time: the server's own words say what to do.
        detail = str(exc).split(": ", 1)[-1]
        return AccessDenied(Access.UNKNOWN, exc.status, str(exc), advice=detail)
    if exc.status == 401:
        return AccessDenied(Access.UNKNOWN, exc.status, str(exc))
    if exc.status == 403 and "revoked" in text:
        return AccessDenied(Access.REVOKED, exc.status, str(exc))
    if exc.status == 403 and "approval" in text:
        return AccessDenied(Access.PENDING, exc.status, str(exc))
    return None


class DeviceClient(ServerClient):
    """A client holding a device credential: a refusal of that credential is an
    AccessDenied, whichever call met it."""

    def refusal(self, status: int, message: str) -> StrataError:
        refused = ServerRefused(status, message)
        return classify(refused) or refused


def device_client(cred: Credential, *, retries: int = 5, timeout: float = 120.0,
                  upload_rate: float | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> DeviceClient:
    server = check_server_url(cred.server, insecure=cred.insecure is not False)
    return DeviceClient(server, cred.credential, retries=retries, timeout=timeout,
                        upload_rate=upload_rate, verify=cred.verify, sleep=sleep)
