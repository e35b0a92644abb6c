"""What an agent accepts from the server: a pure function of the desired state the server
sent, the signed catalog (already verified by python-tuf: signatures, expiry, versions),
the endpoint's own id and hardware, and what the endpoint applied before.

The server chooses among what IT signed for an endpoint; it cannot go beyond it:

- every IT layer must be a signed layer whose kind and removals are as signed, and its
  manifest must match the signed digest (checked when the bytes arrive: `Approval`);
- every IT layer must be named by a signed assignment whose scope covers this endpoint
  (all, a collection listing it, or the endpoint itself), or be a driver layer whose
  signed match rule fits the hardware this agent sees;
- no rollback: a layer older (by signed serial) than the version of the same name this
  endpoint applied is refused, unless an assignment signed after the one under which the
  newer version was applied names the older one (IT reverting on purpose);
- a revert, restore or provision must be signed for this endpoint, with the snapshot and
  the digest of its manifest, and is taken once (a replayed one is refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.layers.matching import rule_matches
from strata.model.wire import DesiredLayer, DesiredState
from strata.signing import LayerRefused
from strata.signing.catalog import ManifestDigest, SignedAssignment, SignedCatalog

SNAPSHOT_OPERATIONS = ("revert", "restore")


@dataclass(frozen=True)
class AppliedLayer:
    version: str
    serial: int  # the signed serial of that version
    seq: int  # the newest signed assignment that named it when it was applied (0: none)


@dataclass
class TrustRecord:
    """What the agent keeps about what it applied, for the rollback and replay rules."""

    layers: dict[str, AppliedLayer] = field(default_factory=dict)  # by layer name
    operation_seq: int = 0  # the last one-off operation applied

    def to_dict(self) -> dict:
        return {"layers": {n: a.__dict__ for n, a in self.layers.items()},
                "operation_seq": self.operation_seq}

    @classmethod
    def from_dict(cls, doc: dict) -> TrustRecord:
        return cls(layers={n: AppliedLayer(**a) for n, a in doc.get("layers", {}).items()},
                   operation_seq=int(doc.get("operation_seq", 0)))


def manifest_key(layer: DesiredLayer) -> str:
    if layer.kind == "snapshot":
        return f"snapshot:{layer.snapshot}"
    return f"layer:{layer.name}:{layer.version}"


def label(layer: DesiredLayer) -> str:
    if layer.kind == "snapshot":
        return f"snapshot {layer.snapshot[:8]}"
    return f"{layer.kind} layer {layer.name}:{layer.version}"


@dataclass
class Approval:
    """A desired state the agent accepted: the digest each manifest must have, and the
    record to keep once it is applied. Saved with a ready update, so an apply without
    the server still checks the manifests it reads."""

    catalog_version: int
    manifests: dict[str, ManifestDigest]
    after: TrustRecord

    def verify_manifest(self, layer: DesiredLayer, data: bytes) -> None:
        digest = self.manifests.get(manifest_key(layer))
        if digest is None:
            raise LayerRefused(f"{label(layer)} was not part of the approved update")
        why = digest.mismatch(data)
        if why:
            raise LayerRefused(f"{label(layer)}: the manifest the server sent does not match "
                               f"its signature ({why}): refusing a forged or damaged layer")

    def to_dict(self) -> dict:
        return {"catalog_version": self.catalog_version,
                "manifests": {k: d.model_dump() for k, d in self.manifests.items()},
                "after": self.after.to_dict()}

    @classmethod
    def from_dict(cls, doc: dict) -> Approval:
        return cls(catalog_version=int(doc["catalog_version"]),
                   manifests={k: ManifestDigest(**d) for k, d in doc["manifests"].items()},
                   after=TrustRecord.from_dict(doc["after"]))


def approve(desired: DesiredState, catalog: SignedCatalog, endpoint_id: str,
            hardware: dict[str, str], record: TrustRecord) -> Approval:
    """Accept `desired` or raise LayerRefused saying what is wrong and why it matters."""
    covering = catalog.covering(endpoint_id)
    manifests: dict[str, ManifestDigest] = {}
    after = TrustRecord(layers=dict(record.layers), operation_seq=record.operation_seq)
    own = catalog.assignments.get(f"assignments/endpoint/{endpoint_id}")
    if desired.operation != "update":
        after.operation_seq = _check_operation(desired, own, record)
    for layer in desired.layers:
        if layer.kind == "snapshot":
            if desired.operation not in SNAPSHOT_OPERATIONS:
                raise LayerRefused(f"{label(layer)} is offered outside a signed revert or "
                                   "restore")
            assert own is not None and own.operation is not None  # _check_operation
            manifests[manifest_key(layer)] = _snapshot_digest(layer, desired, own)
    it_layers = {manifest_key(dl): dl for dl in [*desired.layers, *(desired.owned or [])]
                 if dl.kind != "snapshot"}
    for key, layer in it_layers.items():
        manifests[key] = _check_layer(layer, catalog, covering, hardware, record, after)
    return Approval(catalog_version=catalog.version, manifests=manifests, after=after)


def _check_operation(desired: DesiredState, own: SignedAssignment | None,
                     record: TrustRecord) -> int:
    op = own.operation if own is not None else None
    if own is None or op is None or op.kind != desired.operation:
        raise LayerRefused(f"the {desired.operation} of this endpoint is not signed: only an "
                           "image manager's key can order it (`strata endpoint "
                           f"{desired.operation} … --keys DIR`)")
    if own.seq <= record.operation_seq:
        raise LayerRefused(f"this {desired.operation} (signed in metadata version {own.seq}) "
                           "was already carried out here: refusing a replay")
    if op.keep_user_apps != desired.keep_user_apps:
        raise LayerRefused(f"the {desired.operation} differs from what was signed "
                           "(keep user apps)")
    return own.seq


def _snapshot_digest(layer: DesiredLayer, desired: DesiredState,
                     own: SignedAssignment) -> ManifestDigest:
    op = own.operation
    assert op is not None
    if op.snapshot != layer.snapshot or op.removes != layer.removes or op.manifest is None:
        raise LayerRefused(f"the {desired.operation} to {label(layer)} differs from the one "
                           f"signed (snapshot {(op.snapshot or '')[:8]})")
    return op.manifest


def _check_layer(layer: DesiredLayer, catalog: SignedCatalog,
                 covering: list[SignedAssignment], hardware: dict[str, str],
                 record: TrustRecord, after: TrustRecord) -> ManifestDigest:
    ref = f"{layer.name}:{layer.version}"
    signed = catalog.layers.get(ref)
    if signed is None:
        raise LayerRefused(f"{label(layer)} is not signed: no signed metadata names it (it "
                           "was captured without `--keys`, or it is forged)")
    if signed.kind != layer.kind or signed.removes != layer.removes:
        raise LayerRefused(f"{label(layer)} differs from its signed description "
                           f"({'kind' if signed.kind != layer.kind else 'removed paths'})")
    seqs = [a.seq for a in covering if a.lists(ref)]
    by_hardware = layer.kind == "driver" and bool(signed.match)
    fits = by_hardware and rule_matches(signed.match, hardware)
    if not seqs and not fits:
        raise LayerRefused(f"{label(layer)} is not assigned to this endpoint by any signed "
                           "assignment")
    seq = max(seqs, default=0)
    applied = record.layers.get(layer.name)
    if applied is not None and signed.serial < applied.serial and seq <= applied.seq:
        raise LayerRefused(f"{label(layer)} is older than {layer.name}:{applied.version}, "
                           "applied on this endpoint: going back needs an assignment signed "
                           "after that one (a rollback is refused)")
    after.layers[layer.name] = AppliedLayer(version=layer.version, serial=signed.serial,
                                            seq=seq)
    return signed.manifest
