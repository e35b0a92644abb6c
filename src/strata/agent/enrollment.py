"""Enrollment: a one-time token for a device credential, kept in the state directory.

A state directory is one endpoint. Enrolling it again would make a second endpoint on the
server and leave the first orphaned, so that takes `force`, and says what it replaces."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from strata.agent.client import ServerClient
from strata.agent.inventory import collect_inventory
from strata.agent.state import AgentState, Credential, NotEnrolled
from strata.errors import StrataError
from strata.model.update import UpdateState
from strata.model.wire import EnrollResponse


class AlreadyEnrolled(StrataError):
    pass


@dataclass
class Enrollment:
    endpoint_id: str
    state: str  # active, or pending (waiting for an administrator's approval)
    replaced: str | None = None  # the endpoint this state directory was before (--force)

    def to_dict(self) -> dict:
        return {"endpoint_id": self.endpoint_id, "state": self.state,
                "replaced": self.replaced}


def enroll(state: AgentState, *, server: str, token: str, root: Path, ca_cert: str = "",
           force: bool = False) -> Enrollment:
    root = root.resolve()
    if not root.is_dir():
        raise StrataError(f"root {root} is not a directory")
    old = _enrolled_as(state, force)
    if old is not None and state.update().get("state") == UpdateState.APPLYING:
        raise StrataError("a layer update was interrupted while it was being applied: "
                          "finish it first (`strata agent apply`), then enroll again")
    with state.exclusive():  # not under an agent run of the old enrollment
        inv = collect_inventory(root, state.path / "hardware.json")
        client = ServerClient(server, retries=2, verify=ca_cert or True)
        try:
            resp = EnrollResponse.model_validate(client.request(
                "POST", "/api/v1/agent/enroll", json={
                    "token": token, "hostname": inv["hostname"] or socket.gethostname(),
                    "os": inv["os"], "inventory": inv}).json())
        finally:
            client.close()
        if old is not None:
            state.forget_endpoint()  # the new endpoint starts its own CVD
        state.save_credential(Credential(server=server, endpoint_id=resp.endpoint_id,
                                         credential=resp.credential, root=str(root),
                                         ca_cert=ca_cert))
        state.add_wire_bytes(client.bytes_sent, client.bytes_received)
    return Enrollment(resp.endpoint_id, resp.state, old.endpoint_id if old else None)


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
            "on the server until an administrator revokes it)")
    return cred
