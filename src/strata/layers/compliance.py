"""Compliance: how far an endpoint's tree has drifted from its IT layers.

Changed (content, type, mode or owner differ), missing, and added outside policy (a file
in a system area that no layer has). Scores are the share of managed paths that match,
per endpoint and per layer. Do-not-override and do-not-download paths are the endpoint's
own business and never count as drift, nor do account databases: they are merged by key,
so the endpoint's copy differs from the layer's by design (its own accounts are in it).
Configuration the endpoint changed does count: it is drift that enforcement repairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from strata.layers.accounts import database_for
from strata.layers.image import Image, resolve_hardlinks
from strata.layers.plan import same_content
from strata.layers.rules import LayerRules, PathClass
from strata.model.entry import Entry, EntryType
from strata.tree.scan import display


@dataclass
class ComplianceReport:
    managed: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    per_layer: dict[str, dict] = field(default_factory=dict)

    @property
    def drift(self) -> int:
        return len(self.changed) + len(self.missing) + len(self.added)

    @property
    def score(self) -> float:
        total = self.managed + len(self.added)
        return round(100.0 * (total - self.drift) / total, 2) if total else 100.0

    def to_dict(self, limit: int = 200) -> dict:
        return {"score": self.score, "managed": self.managed, "drift": self.drift,
                "changed": self.changed[:limit], "missing": self.missing[:limit],
                "added": self.added[:limit], "counts": {
                    "changed": len(self.changed), "missing": len(self.missing),
                    "added": len(self.added)},
                "layers": self.per_layer}


def _differs(c: Entry, t: Entry) -> bool:
    return not same_content(c, t) or (c.mode, c.uid, c.gid) != (t.mode, t.uid, t.gid)


def check_compliance(current: Iterable[Entry], image: Image,
                     rules: LayerRules) -> ComplianceReport:
    report = ComplianceReport()
    tally: dict[str, list[int]] = {}  # label -> [managed, drift]
    cur = {}
    for e in resolve_hardlinks(current):
        cur[e.path] = e
    for path, t in image.entries.items():
        is_dir = t.type is EntryType.DIR
        if rules.do_not_override(path, is_dir) or rules.do_not_download(path, is_dir) or \
                database_for(path, rules.family) is not None:
            continue
        label = image.source.get(path, "")
        counts = tally.setdefault(label, [0, 0])
        counts[0] += 1
        report.managed += 1
        c = cur.get(path)
        if c is None:
            report.missing.append(display(path))
            counts[1] += 1
        elif _differs(c, t):
            report.changed.append(display(path))
            counts[1] += 1
    for path, c in cur.items():
        if path in image.entries or c.type is EntryType.DIR:
            continue
        if rules.classify(path) is PathClass.SYSTEM:
            report.added.append(display(path))
    for label, (managed, drift) in tally.items():
        report.per_layer[label] = {"managed": managed, "drift": drift,
                                   "score": round(100.0 * (managed - drift) / managed, 2)
                                   if managed else 100.0}
    for lst in (report.changed, report.missing, report.added):
        lst.sort()
    return report
