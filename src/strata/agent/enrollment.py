"""Enrollment: a one-time token for a device credential, kept in the state directory.

A state directory is one endpoint. Enrolling it again would make a second endpoint on the
server and leave the first orphaned, so that takes `force`, and says what it replaces."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

from strata.agent.client import ServerClient, parse_answer
from strata.agent.inventory import collect_inventory
from strata.agent.signing import fetch_root, pin
from strata.agent.state import AgentState, Credential, NotEnrolled
from strata.errors import StrataError
from strata.model.update import UpdateState
from strata.model.wire import EnrollResponse
from strata.transport import check_server_url, fetch_pinned_certificate, verify_setting


class AlreadyEnrolled(StrataError):
    pass


@dataclass
class Enrollment:
    endpoint_id: str
    state: str  # active, or pending (waiting for an administrator's approval)
    replaced: str | None = None  # the endpoint this state directory was before (--force)
    signing_root: str | None = None  # the fingerprint pinned (None: no signing on the server)

    def to_dict(self) -> dict:
        return {"endpoint_id": self.endpoint_id, "state": self.state,
                "replaced": self.replaced, "signing_root": self.signing_root}


def enroll(state: AgentState, *, server: str, token: str, root: Path, ca_cert: str = "",
           force: bool = False, root_fingerprint: str | None = None,
           one_file_system: bool | None = None, server_fingerprint: str | None = None,
           insecure: bool = False) -> Enrollment:
    """Enroll, and pin the server's signing root: the agent takes only layers signed under
    it. The root comes over the enrollment connection and is checked before enrolling
    (against `root_fingerprint`, when IT gave it): it is as trustworthy as that connection,
    which TLS with a pinned certificate makes so (docs/security.md).

    `server_fingerprint` pins the server's TLS certificate: it is fetched and compared
    before anything is sent, the enrollment itself is made trusting that certificate only,
    and it is kept (STATE/server-cert.pem) as the only one every later call accepts."""
    server = check_server_url(server, insecure=insecure)
    pinned_pem = fetch_pinned_certificate(server, server_fingerprint) \
        if server_fingerprint else ""
    verify = verify_setting(ca_cert, pinned_pem=pinned_pem)
    root = root.resolve()
    if not root.is_dir():
        raise StrataError(f"root {root} is not a directory")
    old = _enrolled_as(state, force)
    if old is not None and state.update().get("state") == UpdateState.APPLYING:
        raise StrataError("a layer update was interrupted while it was being applied: "
                          "finish it first (`strata agent apply`), then enroll again")
    with state.exclusive():  # not under an agent run of the old enrollment
        inv = collect_inventory(root, state.path / "hardware.json")
        client = ServerClient(server, retries=2, verify=verify)
        try:
            signing_root = fetch_root(client)
            if signing_root is None and root_fingerprint:
                raise StrataError("the server has no signing root (`strata signing init` "
                                  "was never run there), yet --root-fingerprint was given")
            if signing_root is not None:
                from strata.signing.trust import check_root  # python-tuf: only here

                check_root(signing_root, root_fingerprint)
            same_server = old is not None and old.server == server
            resp = parse_answer(client.request(
                "POST", "/api/v1/agent/enroll", json={
                    "token": token, "hostname": inv["hostname"] or socket.gethostname(),
                    "os": inv["os"], "inventory": inv,
                    "previous_credential": old.credential if old and same_server else ""}),
                EnrollResponse)
        finally:
            client.close()
        if old is not None:  # the new endpoint starts its own CVD
            state.forget_endpoint(keep_files_cache=same_server)
        server_cert = ""
        if pinned_pem:
            server_cert = str(state.save_server_certificate(pinned_pem))
        state.save_credential(Credential(server=server, endpoint_id=resp.endpoint_id,
                                         credential=resp.credential, root=str(root),
                                         ca_cert=ca_cert, server_cert=server_cert,
                                         insecure=insecure, one_file_system=one_file_system))
        fingerprint = pin(state, signing_root) if signing_root is not None else None
        state.add_wire_bytes(client.bytes_sent, client.bytes_received)
    return Enrollment(resp.endpoint_id, resp.state, old.endpoint_id if old else None,
                      fingerprint)


def _enrolled_as(state: AgentState, force: bool) -> Credential | None:
    try:
        cred = state.credential()
    except NotEnrolled:
        return None
    except StrataError:  # a damaged credential file: only --force replaces it
        if force:
            return None
        raise
    if not force:
        raise AlreadyEnrolled(
            f"{state.path} is already enrolled as endpoint {cred.endpoint_id} on "
            f"{cred.server}; `--force` enrolls it anew as a new endpoint (the old one stays "
            "on the server until an administrator revokes or deletes it)")
    return cred


def trust_server(state: AgentState, *, server: str | None = None, ca_cert: str = "",
                 server_fingerprint: str | None = None, insecure: bool = False) -> Credential:
    """Point an enrolled endpoint at its server anew: a renewed certificate to pin, a CA,
    or a new URL (HTTPS after an upgrade, a new name). The same endpoint carries on: the
    server must accept its credential over the new connection, checked before anything
    is saved."""
    if not (server or ca_cert or server_fingerprint):
        raise StrataError("give --server-fingerprint FP, --ca-cert FILE or --server URL")
    with state.exclusive():
        cred = state.credential()
        url = check_server_url(server or cred.server, insecure=insecure)
        pinned_pem = fetch_pinned_certificate(url, server_fingerprint) \
            if server_fingerprint else ""
        client = ServerClient(url, cred.credential, retries=1,
                              verify=verify_setting(ca_cert, pinned_pem=pinned_pem))
        try:
            client.request("POST", "/api/v1/agent/checkin", json={})  # proves it is ours
        finally:
            state.add_wire_bytes(client.bytes_sent, client.bytes_received)
            client.close()
        server_cert = str(state.save_server_certificate(pinned_pem)) if pinned_pem else ""
        updated = dataclasses.replace(cred, server=url, ca_cert=ca_cert,
                                      server_cert=server_cert, insecure=insecure)
        state.save_credential(updated)
    return updated
