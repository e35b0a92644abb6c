"""The states of a layer update on one endpoint: what the agent reports and the server
records and shows (`strata endpoint list`). One definition for both sides."""

from __future__ import annotations

from enum import StrEnum


class UpdateState(StrEnum):
    ASSIGNED = "assigned"  # a new desired state; nothing of it downloaded yet
    DOWNLOADING = "downloading"  # chunks are coming into the agent's cache
    READY = "ready"  # all downloaded: a restart (or `strata agent apply`) applies it
    APPLYING = "applying"  # the switch is under way; a killed one is finished at next start
    APPLIED = "applied"
    FAILED = "failed"  # the reason is in the report's detail; `agent apply` tries again
