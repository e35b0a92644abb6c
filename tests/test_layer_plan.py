"""The layer engine without a server: rules, images, merge plans and compliance."""

from __future__ import annotations

import pytest

from strata.layers.capture import without_layers
from strata.layers.changes import Action
from strata.layers.compliance import check_compliance
from strata.layers.config_merge import UpdateHeld, require_no_holds, resolve_merges
from strata.layers.image import LayerContent, build_image
from strata.layers.plan import Mode, plan_update
from strata.layers.rules import LINUX_RULES, LayerRules, PathClass, validate_rules
from strata.model.entry import Entry, EntryType
from strata.model.ids import content_id

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


# -- configuration: the three-way rule ------------------------------------------------------------


def test_configuration_keeps_local_changes_and_takes_untouched_files():
    v1 = build_image([layer("base b:1", d("etc"), f("etc/app.conf", "1"),
                            f("etc/other.conf", "1"), f("etc/gone.conf", "1"),
                            f("etc/deleted.conf", "1"), f("etc/same.conf", "1"))], RULES)
    v2 = build_image([layer("base b:2", d("etc"), f("etc/app.conf", "2"),
                            f("etc/other.conf", "2"), f("etc/deleted.conf", "2"),
                            f("etc/same.conf", "1"))], RULES)
    current = [d("etc"), f("etc/app.conf", "mine"), f("etc/other.conf", "1"),
               f("etc/gone.conf", "mine"), f("etc/same.conf", "mine too")]
    plan = plan_update(current, v2, RULES, owned=v1.entries)
    assert actions(plan) == {"etc/other.conf": "replace"}
    kept = {c.path for c in plan.conflicts if c.kind == "local-change-kept"}
    # Reported where the endpoint's change hides a new version (same.conf: nothing new).
    assert kept == {"etc/app.conf", "etc/gone.conf", "etc/deleted.conf"}
    # Compliance repair (and revert, provisioning) put the layers' versions back.
    plan = plan_update(current, v2, RULES, owned=v1.entries,
                       mode=Mode(keep_local_config=False))
    assert actions(plan) == {"etc/app.conf": "replace", "etc/other.conf": "replace",
                             "etc/gone.conf": "delete", "etc/deleted.conf": "add",
                             "etc/same.conf": "replace"}


def test_configuration_local_mode_change_is_kept():
    o = f("etc/sudoers", "x")
    mine = Entry(path=o.path, type=EntryType.FILE, size=o.size, content_hash=o.content_hash,
                 chunks=o.chunks, mode=0o600, mtime_ns=1)
    v1 = build_image([layer("base b:1", o)], RULES)
    v2 = build_image([layer("base b:2", f("etc/sudoers", "x", mtime=9))], RULES)
    assert actions(plan_update([mine], v2, RULES, owned=v1.entries)) == {}
    assert actions(plan_update([o], v2, RULES, owned=v1.entries)) == {"etc/sudoers": "meta"}


def test_configuration_without_an_earlier_layer_stays_the_endpoints():
    v2 = build_image([layer("base b:2", f("etc/app.conf", "2"), f("etc/new.conf", "2"))],
                     RULES)
    plan = plan_update([f("etc/app.conf", "mine")], v2, RULES, owned={})
    assert actions(plan) == {"etc/new.conf": "add"}
    assert [(c.kind, c.path) for c in plan.conflicts] == [("local-change-kept",
                                                           "etc/app.conf")]
    assert "cannot be told" in plan.conflicts[0].detail
    plan = plan_update([f("etc/app.conf", "mine")], v2, RULES, owned={},
                       mode=Mode(keep_local_config=False))
    assert actions(plan) == {"etc/app.conf": "replace", "etc/new.conf": "add"}


def test_configuration_is_a_layer_rule_administrators_edit():
    no_config = LayerRules.from_doc({**LINUX_RULES, "configuration": []})
    v1 = build_image([layer("base b:1", f("etc/app.conf", "1"))], no_config)
    v2 = build_image([layer("base b:2", f("etc/app.conf", "2"))], no_config)
    plan = plan_update([f("etc/app.conf", "mine")], v2, no_config, owned=v1.entries)
    assert actions(plan) == {"etc/app.conf": "replace"}
    opt = LayerRules.from_doc({**LINUX_RULES, "configuration": ["/etc/", "/opt/*/conf/"]})
    v1 = build_image([layer("base b:1", f("opt/x/conf/a", "1"))], opt)
    v2 = build_image([layer("base b:2", f("opt/x/conf/a", "2"))], opt)
    assert actions(plan_update([f("opt/x/conf/a", "mine")], v2, opt, owned=v1.entries)) == {}
    win = LayerRules.default("windows")
    assert win.configuration(b"ProgramData/Vendor/settings.ini")
    assert win.configuration(b"windows/system32/drivers/etc/services")
    assert not win.configuration(b"Windows/System32/config/SOFTWARE")


# -- account databases: merged by key, content computed on the endpoint ----------------------------

O_PASSWD = b"root:x:0:0:root:/root:/bin/bash\n"
E_PASSWD = O_PASSWD + b"alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
N_PASSWD = O_PASSWD + b"_chrony:x:100:102::/var/lib/chrony:/usr/sbin/nologin\n"


def real(path: str, data: bytes, mode: int = 0o644, gid: int = 0) -> Entry:
    cid = content_id(data)
    return Entry(path=path.encode(), type=EntryType.FILE, size=len(data), content_hash=cid,
                 chunks=[(cid, len(data))], mode=mode, gid=gid, mtime_ns=5)


class Copies:
    """MergeInputs over byte strings by content hash (what agent and server read)."""

    def __init__(self, *blobs: bytes, unavailable: tuple[bytes, ...] = ()):
        self.by_hash = {content_id(b): b for b in blobs}
        self.unavailable = unavailable

    def old(self, entry: Entry) -> bytes | None:
        data = self.by_hash[entry.content_hash]
        return None if data in self.unavailable else data

    def endpoint(self, entry: Entry) -> bytes:
        return self.by_hash[entry.content_hash]

    def new(self, entry: Entry) -> bytes:
        return self.by_hash[entry.content_hash]


def test_account_databases_are_merged_into_computed_content():
    v1 = build_image([layer("base b:1", d("etc"), real("etc/passwd", O_PASSWD))], RULES)
    v2 = build_image([layer("base b:2", d("etc"), real("etc/passwd", N_PASSWD),
                            f("usr/bin/x", "2"))], RULES)
    current = [d("etc"), real("etc/passwd", E_PASSWD)]
    plan = plan_update(current, v2, RULES, owned=v1.entries)
    assert [m.path for m in plan.merges] == [b"etc/passwd"]
    assert actions(plan) == {"usr/bin/x": "add"}  # nothing for passwd until it is merged
    resolve_merges(plan, Copies(O_PASSWD, E_PASSWD, N_PASSWD), "linux", now_ns=777)
    assert actions(plan) == {"etc/passwd": "replace", "usr/bin/x": "add"}
    change = next(c for c in plan.changes if c.path == b"etc/passwd")
    merged = O_PASSWD + b"_chrony:x:100:102::/var/lib/chrony:/usr/sbin/nologin\n" + \
        b"alice:x:1000:1000:Alice:/home/alice:/bin/bash\n"
    assert change.content == merged
    assert change.entry.content_hash == content_id(merged) and change.entry.size == len(merged)
    assert change.entry.mtime_ns == 777
    # Nothing of it is downloaded; the apply's data source serves it by its id.
    assert content_id(merged) not in plan.chunks_in_order()
    assert plan.computed_chunks() == {content_id(merged): merged}
    assert [(c.kind, c.path) for c in plan.conflicts] == [("accounts-merged", "etc/passwd")]
    assert "alice" in plan.conflicts[0].detail and "_chrony" in plan.conflicts[0].detail
    assert not plan.held()


def test_account_merge_takes_mode_and_owner_from_the_new_base():
    o = real("etc/shadow", b"root:*:1:0:99999:7:::\n", mode=0o640, gid=42)
    e = real("etc/shadow", b"root:$y$hash:2:0:99999:7:::\n", mode=0o600)
    n = real("etc/shadow", b"root:*:3:0:99999:7:::\n", mode=0o640, gid=42)
    plan = plan_update([e], build_image([layer("base b:2", n)], RULES), RULES,
                       owned={o.path: o})
    resolve_merges(plan, Copies(b"root:*:1:0:99999:7:::\n", b"root:$y$hash:2:0:99999:7:::\n",
                                b"root:*:3:0:99999:7:::\n"), "linux", now_ns=1)
    # The merged content is the endpoint's own (its hash is its business): only the base's
    # mode and group are applied.
    assert actions(plan) == {"etc/shadow": "meta"}
    change = plan.changes[0]
    assert (change.entry.mode, change.entry.gid) == (0o640, 42) and change.content is None


def test_account_clash_holds_the_plan_with_names_and_ids():
    clash = O_PASSWD + b"newsvc:x:1000:1000::/nonexistent:/bin/false\n"
    v1 = build_image([layer("base b:1", real("etc/passwd", O_PASSWD))], RULES)
    v2 = build_image([layer("base b:2", real("etc/passwd", clash))], RULES)
    plan = plan_update([real("etc/passwd", E_PASSWD)], v2, RULES, owned=v1.entries)
    resolve_merges(plan, Copies(O_PASSWD, E_PASSWD, clash), "linux", now_ns=1)
    assert actions(plan) == {}
    assert [c.kind for c in plan.held()] == ["account-clash"]
    with pytest.raises(UpdateHeld, match="uid 1000 is the endpoint's alice and the new "
                                         "base's newsvc"):
        require_no_holds(plan)


def test_unknown_old_base_falls_back_to_a_two_way_merge():
    v2 = build_image([layer("base b:2", real("etc/passwd", N_PASSWD))], RULES)
    o = real("etc/passwd", O_PASSWD)
    for owned, inputs in (({}, Copies(E_PASSWD, N_PASSWD)),
                          ({o.path: o}, Copies(O_PASSWD, E_PASSWD, N_PASSWD,
                                               unavailable=(O_PASSWD,)))):
        plan = plan_update([real("etc/passwd", E_PASSWD)], v2, RULES, owned=owned)
        resolve_merges(plan, inputs, "linux", now_ns=1)
        assert b"alice" in plan.changes[0].content
        assert "two-way" in plan.conflicts[0].detail


def test_unmergeable_account_database_holds_and_accounts_are_never_deleted():
    broken = b"root:x\n"
    v2 = build_image([layer("base b:2", real("etc/group", b"root:x:0:\n"))], RULES)
    plan = plan_update([real("etc/group", broken)], v2, RULES)
    resolve_merges(plan, Copies(broken, b"root:x:0:\n"), "linux", now_ns=1)
    assert [c.kind for c in plan.held()] == ["accounts-unmergeable"]
    assert "line 1: 2 fields, expected 4" in plan.held()[0].detail
    # A base without an account database never takes the endpoint's away.
    v1 = build_image([layer("base b:1", real("etc/group", b"root:x:0:\n"))], RULES)
    plan = plan_update([real("etc/group", b"root:x:0:\n")], build_image([], RULES), RULES,
                       owned=v1.entries)
    assert actions(plan) == {} and plan.conflicts[0].kind == "kept"


def test_provisioning_lays_down_the_bases_accounts_as_they_are():
    v2 = build_image([layer("base b:2", real("etc/passwd", N_PASSWD))], RULES)
    plan = plan_update([real("etc/passwd", E_PASSWD)], v2, RULES,
                       mode=Mode(wipe_unmanaged=True, merge_accounts=False,
                                 keep_local_config=False))
    assert actions(plan) == {"etc/passwd": "replace"} and not plan.merges


def test_compliance_does_not_count_merged_account_databases_as_drift():
    img = build_image([layer("base b:1", real("etc/passwd", O_PASSWD), f("etc/app.conf", "1"))],
                      RULES)
    rep = check_compliance([real("etc/passwd", E_PASSWD), f("etc/app.conf", "mine")], img,
                           RULES)
    assert rep.changed == ["etc/app.conf"] and rep.managed == 1


# -- capture from a managed reference machine ------------------------------------------------------


def test_capture_from_an_endpoint_leaves_out_its_driver_and_app_layers():
    base = [d("usr"), d("usr/lib"), f("usr/lib/libc.so", "base"), f("usr/lib/gone.so", "b"),
            d("etc"), f("etc/os-release", "1")]
    app = layer("app office:1", d("opt"), d("opt/office"), f("opt/office/bin", "app"),
                d("usr"), d("usr/lib"), f("usr/lib/libc.so", "patched by the app"),
                removes=("usr/lib/gone.so",))
    driver = layer("driver nic:1", d("usr/lib/firmware"), f("usr/lib/firmware/nic.bin", "fw"))
    machine = [d("etc"), f("etc/os-release", "1"), d("opt"), d("opt/office"),
               f("opt/office/bin", "app"), d("opt/mine"), f("opt/mine/tool", "user app"),
               d("usr"), d("usr/lib"), f("usr/lib/libc.so", "patched by the app"),
               d("usr/lib/firmware"), f("usr/lib/firmware/nic.bin", "fw"),
               f("usr/lib/extra.so", "installed by hand")]
    got = {e.path.decode(): e for e in without_layers(machine, base, [app, driver])}
    assert sorted(got) == ["etc", "etc/os-release", "opt", "opt/mine", "opt/mine/tool", "usr",
                           "usr/lib", "usr/lib/extra.so", "usr/lib/gone.so", "usr/lib/libc.so"]
    assert got["usr/lib/libc.so"].content_hash == f("usr/lib/libc.so", "base").content_hash
