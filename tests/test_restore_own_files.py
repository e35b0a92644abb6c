"""Restore to new hardware carries every file of the CVD: the do-not-download rule is
about what a layer carries, not about the endpoint's own files (its changelogs, its apt
lists), which would otherwise be missing from the new machine and from every snapshot
after it.
"""

from __future__ import annotations

from strata.layers.image import LayerContent, build_image
from strata.layers.plan import Mode, plan_update
from strata.layers.rules import LayerRules, PathClass
from strata.model.entry import Entry, EntryType

RULES = LayerRules.default("linux")
FULL_RESTORE = Mode(wipe_unmanaged=True, protect=frozenset({PathClass.NEVER}),
                    keep_local_config=False, merge_accounts=False)


def f(path: str, data: str) -> Entry:
    return Entry(path=path.encode(), type=EntryType.FILE, size=len(data),
                 content_hash=data.encode().ljust(32, b"."), mtime_ns=1,
                 chunks=[(data.encode().ljust(32, b"-"), len(data))])


def test_the_cvds_own_do_not_download_files_are_restored():
    own = LayerContent("snapshot snapshot:1234", "snapshot", [
        f("usr/share/doc/tool/changelog.gz", "own changelog"),
        f("var/lib/apt/lists/deb.debian.org_Packages", "own apt list"),
        f("usr/bin/tool", "tool")])
    driver = LayerContent("driver drv:1", "driver", [
        f("usr/share/doc/drv/changelog.gz", "driver changelog"),
        f("usr/lib/firmware/fw.bin", "fw")])
    assert RULES.do_not_download(b"usr/share/doc/tool/changelog.gz", False)
    image = build_image([own, driver], RULES, full=True)
    plan = plan_update([], image, RULES, mode=FULL_RESTORE)
    added = {c.path.decode() for c in plan.changes}
    assert added == {"usr/share/doc/tool/changelog.gz",
                     "var/lib/apt/lists/deb.debian.org_Packages", "usr/bin/tool",
                     "usr/lib/firmware/fw.bin"}  # not the driver layer's changelog


def test_a_path_a_layer_also_carries_is_the_layers():
    own = LayerContent("snapshot snapshot:1234", "snapshot", [
        f("usr/share/doc/drv/changelog.gz", "the CVD's copy")])
    driver = LayerContent("driver drv:1", "driver", [
        f("usr/share/doc/drv/changelog.gz", "driver changelog")])
    image = build_image([own, driver], RULES, full=True)
    assert image.own == set()
    assert plan_update([], image, RULES, mode=FULL_RESTORE).changes == []
