"""What Strata's signed targets metadata says, parsed and checked for shape.

Two kinds of target, both signed by the targets role (the image manager's key):

- `layers/NAME/VERSION`: one per layer. Its length and SHA-256 are those of the layer's
  manifest bytes (what an agent downloads, decompressed); its `custom` carries what the
  agent relies on besides the manifest: kind, OS family, driver match, app removals, and a
  serial (the targets version that first signed it) that orders versions of one name.
- `assignments/all`, `assignments/collection/NAME`, `assignments/endpoint/ID`: one per
  assignment scope, naming the layers IT assigned there (and for an endpoint, a one-off
  revert, restore or provision), with `seq`, the targets version that signed it. Its
  length and hash are those of its own canonical JSON.

Everything lives under `custom["strata"]`; nothing else is accepted, so a malformed
upload is refused by the server and a malformed download by the agent.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from strata.model.names import LAYER_KINDS, LAYER_NAME, LAYER_VERSION, OS_FAMILIES
from strata.signing import SigningError

if TYPE_CHECKING:  # imported where used: TUF costs a tenth of a second at every CLI start
    from tuf.api.metadata import TargetFile, Targets

LAYER_PREFIX = "layers/"
ASSIGNMENT_PREFIX = "assignments/"
SCOPES = ("all", "collection", "endpoint")
OPERATIONS = ("revert", "restore", "provision")
HEX64 = r"^[0-9a-f]{64}$"
ENDPOINT_ID = r"^[0-9A-Za-z-]{1,64}$"
COLLECTION = r"^[A-Za-z0-9._-]{1,128}$"
MAX_PATHS = 1_000_000  # removes of one app layer or restore
MAX_MEMBERS = 1_000_000
_FROZEN = ConfigDict(extra="forbid", frozen=True)


class MalformedMetadata(SigningError):
    pass


class ManifestDigest(BaseModel):
    model_config = _FROZEN
    length: int = Field(ge=0, le=1 << 40)
    sha256: str = Field(pattern=HEX64)

    @classmethod
    def of(cls, data: bytes) -> ManifestDigest:
        return cls(length=len(data), sha256=hashlib.sha256(data).hexdigest())

    def mismatch(self, data: bytes) -> str:
        """Why `data` is not what this digest describes ("" when it is)."""
        if len(data) != self.length:
            return f"{len(data)} bytes instead of {self.length}"
        if hashlib.sha256(data).hexdigest() != self.sha256:
            return f"SHA-256 {hashlib.sha256(data).hexdigest()[:16]}… instead of " \
                   f"{self.sha256[:16]}…"
        return ""


class SignedLayer(BaseModel):
    model_config = _FROZEN
    type: Literal["layer"] = "layer"
    kind: str
    name: str = Field(pattern=LAYER_NAME)
    version: str = Field(pattern=LAYER_VERSION)
    os: str = "linux"
    match: dict[str, str] = Field(default_factory=dict, max_length=8)
    removes: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    serial: int = Field(ge=1)
    manifest: ManifestDigest = Field(exclude=True)  # the target's length and hash

    @model_validator(mode="after")
    def _known(self) -> SignedLayer:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LAYER_KINDS)}")
        if self.os not in OS_FAMILIES:
            raise ValueError(f"os must be one of {', '.join(OS_FAMILIES)}")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def path(self) -> str:
        return layer_path(self.name, self.version)


class SignedOperation(BaseModel):
    """A one-off operation on one endpoint. Revert and restore take the system from a
    CVD snapshot: its manifest's digest is signed too, so the server cannot swap it."""

    model_config = _FROZEN
    kind: str
    snapshot: str | None = Field(default=None, pattern=HEX64)
    keep_user_apps: bool = False
    removes: list[str] = Field(default_factory=list, max_length=MAX_PATHS)
    manifest: ManifestDigest | None = None

    @model_validator(mode="after")
    def _complete(self) -> SignedOperation:
        if self.kind not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}")
        if self.kind != "provision" and (self.snapshot is None or self.manifest is None):
            raise ValueError(f"a {self.kind} names its snapshot and the digest of its "
                             "manifest")
        return self


class SignedAssignment(BaseModel):
    """The layers IT assigned to a scope. A field left None was never set for this scope
    (an assignment of --base alone leaves the apps as they were)."""

    model_config = _FROZEN
    type: Literal["assignment"] = "assignment"
    scope: str
    name: str = ""  # the collection's name or the endpoint's id; "" for all
    members: list[str] | None = Field(default=None, max_length=MAX_MEMBERS)
    base: str | None = None
    apps: list[str] | None = Field(default=None, max_length=4096)
    drivers: list[str] | None = Field(default=None, max_length=4096)
    operation: SignedOperation | None = None
    seq: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SignedAssignment:
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if self.scope == "all" and (self.name or self.members is not None):
            raise ValueError("the scope `all` has no name and no member list")
        if self.scope == "collection" and (not re.fullmatch(COLLECTION, self.name)
                                           or self.members is None):
            raise ValueError("a collection scope has a name and a member list")
        if self.scope == "endpoint" and (not re.fullmatch(ENDPOINT_ID, self.name)
                                         or self.members != [self.name]):
            raise ValueError("an endpoint scope has the endpoint's id as name and member")
        if self.operation is not None and self.scope != "endpoint":
            raise ValueError("only an endpoint scope carries an operation")
        for ref in self.refs():
            name, _, version = ref.partition(":")
            if not (re.fullmatch(LAYER_NAME, name) and re.fullmatch(LAYER_VERSION, version)):
                raise ValueError(f"malformed layer reference {ref!r}")
        return self

    @property
    def path(self) -> str:
        return assignment_path(self.scope, self.name)

    def refs(self) -> list[str]:
        return [*([self.base] if self.base else []), *(self.apps or []),
                *(self.drivers or [])]

    def covers(self, endpoint_id: str) -> bool:
        return self.members is None or endpoint_id in self.members

    def lists(self, ref: str) -> bool:
        return ref in self.refs()

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


def layer_path(name: str, version: str) -> str:
    return f"{LAYER_PREFIX}{name}/{version}"


def assignment_path(scope: str, name: str = "") -> str:
    return f"{ASSIGNMENT_PREFIX}all" if scope == "all" else \
        f"{ASSIGNMENT_PREFIX}{scope}/{name}"


def canonical_json(doc: dict[str, object]) -> bytes:
    from securesystemslib.formats import encode_canonical

    text = encode_canonical(doc)  # a str when no output function is given
    assert isinstance(text, str)
    return text.encode()


# -- to and from TUF targets -------------------------------------------------------------

def layer_target(layer: SignedLayer) -> TargetFile:
    from tuf.api.metadata import TargetFile

    return TargetFile(length=layer.manifest.length, hashes={"sha256": layer.manifest.sha256},
                      path=layer.path,
                      unrecognized_fields={"custom": {"strata": layer.model_dump(mode="json")}})


def assignment_target(assignment: SignedAssignment) -> TargetFile:
    from tuf.api.metadata import TargetFile

    data = assignment.canonical()
    return TargetFile(length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()},
                      path=assignment.path,
                      unrecognized_fields={"custom": {"strata":
                                                      assignment.model_dump(mode="json")}})


def _doc(target: TargetFile) -> dict:
    custom = target.unrecognized_fields.get("custom")
    doc = custom.get("strata") if isinstance(custom, dict) else None
    if not isinstance(doc, dict):
        raise MalformedMetadata(f"target {target.path!r} has no Strata description")
    return doc


@dataclass(frozen=True)
class SignedCatalog:
    """Every layer and assignment the current targets metadata signs."""

    version: int
    expires: datetime
    layers: dict[str, SignedLayer]  # by NAME:VERSION
    assignments: dict[str, SignedAssignment]  # by target path

    @classmethod
    def from_targets(cls, targets: Targets) -> SignedCatalog:
        layers: dict[str, SignedLayer] = {}
        assignments: dict[str, SignedAssignment] = {}
        for path, target in targets.targets.items():
            try:
                if path.startswith(LAYER_PREFIX):
                    digest = ManifestDigest(length=target.length,
                                            sha256=target.hashes.get("sha256", ""))
                    layer = SignedLayer(**_doc(target), manifest=digest)
                    if layer.path != path:
                        raise MalformedMetadata(f"target {path!r} describes layer "
                                                f"{layer.ref}")
                    layers[layer.ref] = layer
                elif path.startswith(ASSIGNMENT_PREFIX):
                    assignment = SignedAssignment(**_doc(target))
                    if assignment.path != path:
                        raise MalformedMetadata(f"target {path!r} describes the "
                                                f"assignment {assignment.path!r}")
                    assignments[path] = assignment
                else:
                    raise MalformedMetadata(f"unknown target {path!r}")
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                raise MalformedMetadata(f"target {path!r}: {where}: {first['msg']}") from None
            except TypeError:
                raise MalformedMetadata(f"target {path!r} is malformed") from None
        return cls(version=targets.version, expires=targets.expires, layers=layers,
                   assignments=assignments)

    def covering(self, endpoint_id: str) -> list[SignedAssignment]:
        return [a for a in self.assignments.values() if a.covers(endpoint_id)]

    def next_serial(self) -> int:
        return self.version + 1
