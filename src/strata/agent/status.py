"""`strata agent status`: what this agent knows (last centralization, pending work,
the update in progress, bytes on the wire) and whether the server lets it in now."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from strata.agent.access import Access, AccessDenied
from strata.agent.cycle import AgentContext, last_bandwidth
from strata.agent.location import read_site
from strata.agent.pipeline import restore_status
from strata.agent.signing import pinned_fingerprint
from strata.errors import StrataError
from strata.model.bandwidth import BYTES_PER_KBPS
from strata.model.wire import BandwidthLimits


@dataclass
class AgentStatus:
    endpoint_id: str
    server: str
    root: str
    access: Access
    access_detail: str = ""
    last_centralization: dict | None = None
    last_checkin: str | None = None
    pending_work: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    layer_update: dict = field(default_factory=dict)  # key, state, error, paused (why)
    applied_layers_key: str = ""
    compliance: dict = field(default_factory=dict)  # the live tree's last measurement
    signing_root: str | None = None  # the pinned root's fingerprint (None: none pinned)
    server_trust: str = ""  # how the server's certificate is checked
    site: str | None = None  # as reported at check-in (`strata agent site`)
    # The caps in force now by the endpoint's clock (the last check-in's rules), kbps.
    bandwidth_kbps: dict = field(default_factory=dict)
    # A pipelined restore onto this endpoint (agent/pipeline.py): phase, usable_after_s,
    # complete_after_s, bytes_total, bytes_done; None: there was none.
    restore: dict | None = None

    @property
    def server_reachable(self) -> bool:
        return self.access is not Access.UNREACHABLE

    def to_dict(self) -> dict:
        return {"endpoint_id": self.endpoint_id, "server": self.server, "root": self.root,
                "server_reachable": self.server_reachable, "access": str(self.access),
                "access_detail": self.access_detail,
                "last_centralization": self.last_centralization,
                "last_checkin": self.last_checkin, "pending_work": self.pending_work,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "layer_update": self.layer_update,
                "applied_layers_key": self.applied_layers_key,
                "compliance": self.compliance,
                "signing_root": self.signing_root, "server_trust": self.server_trust,
                "site": self.site, "bandwidth_kbps": self.bandwidth_kbps,
                "restore": self.restore}


def probe_access(ctx: AgentContext) -> tuple[Access, str]:
    """Ask the server, quickly, whether it lets this endpoint in. An empty check-in: it
    changes nothing on the server (no inventory) and meets the same credential checks as
    every call the agent makes."""
    client = ctx.client(retries=0, timeout=5)
    try:
        client.request("POST", "/api/v1/agent/checkin", json={})
        return Access.OK, ""
    except AccessDenied as exc:
        return exc.access, str(exc)
    except StrataError as exc:  # unreachable, or too broken to answer a check-in
        return Access.UNREACHABLE, str(exc)
    finally:
        ctx.state.add_wire_bytes(client.bytes_sent, client.bytes_received)
        client.close()


def read_status(ctx: AgentContext) -> AgentStatus:
    st, cred = ctx.state, ctx.credential
    access, detail = probe_access(ctx)
    doc = st.update_status(server_reachable=access is not Access.UNREACHABLE,
                           **({} if access is Access.UNREACHABLE else {"access": str(access)}))
    return AgentStatus(
        endpoint_id=cred.endpoint_id, server=cred.server, root=cred.root, access=access,
        access_detail=detail, last_centralization=doc.get("last_centralization"),
        last_checkin=doc.get("last_checkin"), pending_work=list(doc.get("pending_work", [])),
        bytes_sent=int(doc.get("bytes_sent", 0)),
        bytes_received=int(doc.get("bytes_received", 0)),
        layer_update={k: v for k, v in st.update().items()
                      if k in ("key", "state", "error", "paused")},
        applied_layers_key=st.applied_key(), compliance=doc.get("compliance") or {},
        signing_root=pinned_fingerprint(st),
        server_trust=cred.server_trust, site=read_site(st.path),
        bandwidth_kbps=_caps_now(last_bandwidth(st)), restore=restore_status(st.path))


def _caps_now(limits: BandwidthLimits | None) -> dict:
    up, down = limits.caps_at(datetime.now().time()) if limits else (None, None)
    return {"upload": up and round(up / BYTES_PER_KBPS),
            "download": down and round(down / BYTES_PER_KBPS)}
