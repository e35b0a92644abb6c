"""The layer engine without a server: rules, images, merge plans and compliance."""

from __future__ import annotations

from strata.layers.changes import Action
from strata.layers.compliance import check_compliance
from strata.layers.image import LayerContent, build_image
from strata.layers.plan import Mode, plan_update
from strata.layers.rules import LayerRules, PathClass, validate_rules
from strata.model.entry import Entry, EntryType

RULES = LayerRules.default("linux")


def f(path: str, data: str, mtime: int = 1) -> Entry:
    return Entry(path=path.encode(), type=EntryType.FILE, size=len(data),
                 content_hash=data.encode().ljust(32, b"."), mtime_ns=mtime,
                 chunks=[(data.encode().ljust(32, b"-"), max(1, len(data)))])


def d(path: str) -> Entry:
    return Entry(path=path.encode(), type=EntryType.DIR, mode=0o755)


def layer(label: str, *entries: Entry, removes: tuple[str, ...] = ()) -> LayerContent:
    return LayerContent(label, label.split()[0], list(entries),
                        [r.encode() for r in removes])


def actions(plan) -> dict[str, str]:
    return {c.path.decode(): c.action.value for c in plan.changes}


def test_rules_classify_linux_and_windows_paths():
    assert RULES.classify(b"home/ann/doc.txt") is PathClass.USER_DATA
    assert RULES.classify(b"etc/hostname") is PathClass.IDENTITY
    assert RULES.classify(b"etc/ssh/ssh_host_ed25519_key") is PathClass.IDENTITY
    assert RULES.classify(b"var/cache/apt/pkgcache.bin") is PathClass.NEVER
    assert RULES.classify(b"usr/bin/ls") is PathClass.SYSTEM
    assert RULES.classify(b"opt/tool/bin/tool") is PathClass.USER_APP
    win = LayerRules.default("windows")
    assert win.classify(b"Users/ann/Desktop/a.docx") is PathClass.USER_DATA
    assert win.classify(b"WINDOWS/system32/kernel32.dll") is PathClass.SYSTEM  # any case
    assert win.classify(b"pagefile.sys") is PathClass.NEVER
    assert win.classify(b"Program Files/Vendor/app.exe") is PathClass.USER_APP


def test_rules_documents_are_validated():
    assert validate_rules({"linux": {"identity": ["/etc/hostname"]}})["linux"]["never"] == []
    for bad in ({"linux": {"nonsense": ["/x"]}}, {"linux": {"never": "/x"}},
                {"linux": {"never": [""]}}):
        try:
            validate_rules(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_image_never_carries_identity_or_user_data_and_applies_removes():
    img = build_image([layer("base b:1", d("usr"), f("usr/a", "1"), f("usr/b", "1"),
                             f("etc/hostname", "evil"), f("home/x/secret", "s")),
                       layer("app a:1", f("usr/c", "app"), removes=("usr/b",))], RULES)
    assert set(img.entries) == {b"usr", b"usr/a", b"usr/c"}
    assert img.source[b"usr/c"] == "app a:1"


def test_update_keeps_user_layers_replaces_and_deletes_owned_paths():
    v1 = build_image([layer("base b:1", d("usr"), f("usr/a", "1"), f("usr/old", "1"))], RULES)
    v2 = build_image([layer("base b:2", d("usr"), f("usr/a", "2"), f("usr/new", "2"))], RULES)
    current = [d("usr"), f("usr/a", "1"), f("usr/old", "1"), f("usr/mine", "user app"),
               d("home"), f("home/ann", "data"), f("etc/hostname", "pc1")]
    plan = plan_update(current, v2, RULES, owned=v1.entries)
    assert actions(plan) == {"usr/a": "replace", "usr/new": "add", "usr/old": "delete"}
    assert plan.chunk_ids() == {b"2".ljust(32, b"-")}
    assert not plan.conflicts


def test_conflicts_user_modified_overwrite_downgrade_and_do_not_override():
    v1 = build_image([layer("base b:1", f("usr/lib/x.so", "1"), f("etc/fstab", "1"))], RULES)
    v2 = build_image([layer("base b:2", f("usr/lib/x.so", "2"), f("etc/fstab", "2"),
                            f("usr/lib/y.so", "2", mtime=1))], RULES)
    current = [f("usr/lib/x.so", "edited"), f("etc/fstab", "mine"),
               f("usr/lib/y.so", "newer", mtime=5)]
    plan = plan_update(current, v2, RULES, owned=v1.entries)
    kinds = {c.kind: c.path for c in plan.conflicts}
    assert kinds == {"user-modified": "usr/lib/x.so", "kept": "etc/fstab",
                     "downgrade": "usr/lib/y.so"}
    assert actions(plan) == {"usr/lib/x.so": "replace", "usr/lib/y.so": "replace"}
    # The conflict policy can let the endpoint win instead.
    plan = plan_update(current, v2, RULES, owned=v1.entries, mode=Mode(conflicts="endpoint"))
    assert "usr/lib/x.so" not in actions(plan)


def test_revert_wipes_or_keeps_user_apps():
    snap = build_image([layer("snapshot s", d("usr"), f("usr/a", "1"))], RULES)
    current = [d("usr"), f("usr/a", "2"), f("usr/userapp", "u"), f("home/ann", "today")]
    wipe = plan_update(current, snap, RULES, mode=Mode(wipe_unmanaged=True))
    assert actions(wipe) == {"usr/a": "replace", "usr/userapp": "delete"}
    keep = plan_update(current, snap, RULES, mode=Mode(keep_user_apps=True))
    assert actions(keep) == {}  # usr/a is a user app here (no layer owned it)


def test_directory_with_surviving_files_is_not_deleted():
    v1 = build_image([layer("base b:1", d("opt"), d("opt/suite"), f("opt/suite/x", "1"))],
                     RULES)
    empty = build_image([], RULES)
    current = [d("opt"), d("opt/suite"), f("opt/suite/x", "1"), f("opt/suite/user.cfg", "u")]
    plan = plan_update(current, empty, RULES, owned=v1.entries)
    assert actions(plan) == {"opt/suite/x": "delete"}
    assert [c.kind for c in plan.conflicts] == ["blocked", "blocked"]
    assert all(c.action is Action.DELETE for c in plan.changes)


def test_compliance_scores_changed_missing_added():
    img = build_image([layer("base b:1", f("usr/bin/a", "1"), f("usr/bin/b", "1"),
                             f("usr/bin/c", "1"), f("usr/bin/d", "1"))], RULES)
    current = [f("usr/bin/a", "1"), f("usr/bin/b", "changed"), f("usr/bin/c", "1"),
               f("usr/bin/extra", "x"), f("opt/userapp", "u")]
    rep = check_compliance(current, img, RULES)
    assert (rep.changed, rep.missing, rep.added) == (["usr/bin/b"], ["usr/bin/d"],
                                                     ["usr/bin/extra"])
    assert rep.score == 40.0  # 2 of 4 managed match, plus 1 added: 2/5
    assert rep.per_layer["base b:1"] == {"managed": 4, "drift": 2, "score": 50.0}
