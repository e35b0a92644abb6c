"""The agent's side of signed layers: pin the server's root at enrollment, verify the
signed metadata (python-tuf, from that root) and the desired state against it before an
update is downloaded and again before it is applied, and keep the record of what was
applied, which the rollback and replay rules need. See strata.signing.policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from strata.agent.client import ServerClient, ServerRefused
from strata.agent.inventory import collect_inventory
from strata.agent.state import AgentState
from strata.layers.matching import hardware_facts
from strata.model.wire import DesiredState
from strata.signing import PINNED_ROOT
from strata.signing.policy import Approval, TrustRecord, approve
from strata.store.backend import atomic_write

# strata.signing.trust (python-tuf) is imported where used: importing it costs about a
# third of a second of CPU, which every agent command would pay for nothing.

TRUST_DIR = "trust"  # the pinned root and the verified metadata, in the state directory
RECORD = "signing.json"  # what was applied: signed serials, assignment and operation seqs


def fetch_root(client: ServerClient) -> bytes | None:
    """The server's newest root (a public file), or None when signing is not set up."""
    try:
        return client.request("GET", "/api/v1/signing/root.json").content
    except ServerRefused as exc:
        if exc.status in (404, 409):
            return None
        raise


def pin(state: AgentState, root: bytes, expected: str | None = None) -> str:
    """Trust this root from now on. Pinning another root than before (another server,
    or IT starting over) drops what was verified and recorded under the old one: its
    serials and versions mean nothing under the new one."""
    from strata.signing.trust import pin_root

    before = pinned_fingerprint(state)
    fingerprint = pin_root(state.path / TRUST_DIR, root, expected)
    if before is not None and before != fingerprint:
        shutil.rmtree(state.path / TRUST_DIR / "metadata", ignore_errors=True)
        (state.path / RECORD).unlink(missing_ok=True)
    return fingerprint


def pinned_fingerprint(state: AgentState) -> str | None:
    """For `agent status`: read without python-tuf (the file was checked when pinned)."""
    try:
        doc = json.loads((state.path / TRUST_DIR / PINNED_ROOT).read_bytes())
        return ",".join(sorted(doc["signed"]["roles"]["root"]["keyids"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def approve_update(client: ServerClient, state: AgentState, desired: DesiredState,
                   root: Path) -> Approval:
    """Refresh the signed metadata from the server and accept `desired`, or raise
    LayerRefused."""
    from strata.signing.trust import MetadataMissing, refresh

    def fetch(name: str) -> bytes:
        try:
            return client.request("GET", f"/api/v1/agent/tuf/{name}", retries=2).content
        except ServerRefused as exc:
            if exc.status == 404:
                raise MetadataMissing(name) from None
            raise

    trusted = refresh(state.path / TRUST_DIR, fetch)
    facts = hardware_facts(collect_inventory(root, state.path / "hardware.json"))
    return approve(desired, trusted.catalog, state.credential().endpoint_id, facts,
                   load_record(state))


def load_record(state: AgentState) -> TrustRecord:
    try:
        return TrustRecord.from_dict(json.loads((state.path / RECORD).read_bytes()))
    except FileNotFoundError:
        return TrustRecord()
    except (ValueError, KeyError, TypeError):
        # A damaged record must not let rollbacks through: refuse until IT looks at it.
        from strata.signing import LayerRefused

        raise LayerRefused(f"{state.path / RECORD} is damaged: the agent cannot tell which "
                           "layer versions it applied; restore the file or re-enroll") from None


def save_record(state: AgentState, record: TrustRecord) -> None:
    atomic_write(state.path / RECORD, json.dumps(record.to_dict()).encode())
