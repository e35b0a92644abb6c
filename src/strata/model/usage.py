"""What an endpoint learned about its own use (agent/usage.py): the files it reads at boot
and at the first login (the boot set) and the files its user works with (the working
set). A pipelined restore (agent/pipeline.py) lays them down first. The agent sends them,
the server keeps them per endpoint and hands them back to the endpoint the CVD is
restored onto: hostile input both ways, so every path is checked and the lists bounded
before any per-path work is done."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from strata.errors import UnsafePath
from strata.tree.writer import validate_path

MAX_BOOT_PATHS = 20_000  # a desktop Linux boot and login read a few thousand files
MAX_WORKING_PATHS = 40_000
MAX_PATH_CHARS = 4096  # PATH_MAX
MAX_TOTAL_CHARS = 3 << 20  # all paths together: the JSON body limit is 4 MiB
MAX_BOOTS_SEEN = 1 << 20


def _usage_path(p: str) -> str:
    """Relative, normalized, UTF-8 (the set only orders a restore: a name that is not
    UTF-8 simply arrives with the rest), never more than PATH_MAX."""
    if len(p) > MAX_PATH_CHARS:
        raise ValueError(f"a path of at most {MAX_PATH_CHARS} characters")
    try:
        validate_path(p.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a path must be UTF-8") from None
    except UnsafePath as exc:
        raise ValueError(str(exc)) from None
    return p


UsagePath = Annotated[str, AfterValidator(_usage_path)]


def _bounded(items: Any, most: int, what: str) -> Any:
    # Before any item is looked at: a huge list costs one len(), not a check per path.
    if isinstance(items, list) and len(items) > most:
        raise ValueError(f"a {what} of at most {most} paths, not {len(items)}")
    return items


class UsageSets(BaseModel):
    """The boot set and the working set of one endpoint, with when they were learned."""

    boot: list[UsagePath] = Field(default_factory=list)
    working: list[UsagePath] = Field(default_factory=list)
    boots_seen: int = Field(default=0, ge=0, le=MAX_BOOTS_SEEN)  # boots they come from
    learned_at: datetime | None = None

    @field_validator("boot", mode="before")
    @classmethod
    def _boot_bounded(cls, v: Any) -> Any:
        return _bounded(v, MAX_BOOT_PATHS, "boot set")

    @field_validator("working", mode="before")
    @classmethod
    def _working_bounded(cls, v: Any) -> Any:
        return _bounded(v, MAX_WORKING_PATHS, "working set")

    @model_validator(mode="after")
    def _deduplicated(self) -> UsageSets:
        total = sum(map(len, self.boot)) + sum(map(len, self.working))
        if total > MAX_TOTAL_CHARS:
            raise ValueError(f"at most {MAX_TOTAL_CHARS} characters of paths in all")
        self.boot = list(dict.fromkeys(self.boot))
        in_boot = set(self.boot)
        self.working = [p for p in dict.fromkeys(self.working) if p not in in_boot]
        return self

    def summary(self) -> dict[str, Any]:
        return {"boot": len(self.boot), "working": len(self.working),
                "boots_seen": self.boots_seen,
                "learned_at": self.learned_at.isoformat() if self.learned_at else None}
