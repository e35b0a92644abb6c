"""The pipelined restore's order (agent/pipeline.py), what it leaves to the user, its
status with an injected clock; the restart prompt (agent/notify.py) and the systemd
units (agent/service.py), with the commands they would run injected."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from strata.agent import service
from strata.agent.notify import Notifier, prompt_restart, ready_detail
from strata.agent.pipeline import (
    BOOT,
    COMPLETE,
    REST,
    WORKING,
    RestoreRecord,
    order_restore,
    restore_status,
    still_due,
)
from strata.layers.changes import Action, Change
from strata.model.entry import Entry, EntryType

MIB = 1 << 20


def f(path: str, size: int, mtime_ns: int = 10**18) -> Entry:
    return Entry(path.encode(), EntryType.FILE, size=size, mtime_ns=mtime_ns,
                 chunks=[(path.encode().ljust(32, b"\0")[:32], size)] if size else [])


def add(e: Entry) -> Change:
    return Change(Action.ADD, e.path, e)


def d(path: str) -> Change:
    return Change(Action.ADD, path.encode(), Entry(path.encode(), EntryType.DIR, mode=0o755))


def paths(changes: list[Change]) -> list[str]:
    return [c.path.decode() for c in changes]


def test_boot_set_and_skeleton_first_then_working_set_then_the_rest_deletes_last():
    changes = [
        d("etc"), d("home"), d("home/ann"), d("usr"), d("usr/lib"),
        add(f("etc/fstab", 200)),
        add(f("usr/lib/libc.so", 2 * MIB)),
        add(f("usr/lib/big.so", 9 * MIB)),
        add(f("usr/lib/empty", 0)),
        Change(Action.ADD, b"usr/lib/libc.link", Entry(b"usr/lib/libc.link",
                                                       EntryType.SYMLINK, link_target=b"x")),
        add(f("home/ann/report.odt", 5 * MIB)),
        add(f("home/ann/photos.tar", 30 * MIB)),
        add(f("home/ann/old.iso", 7 * MIB)),
        Change(Action.ADD, b"home/ann/report.hard",
               Entry(b"home/ann/report.hard", EntryType.HARDLINK,
                     link_target=b"home/ann/report.odt")),
        Change(Action.DELETE, b"opt/fresh-install", None, f("opt/fresh-install", 10)),
        Change(Action.META, b"usr/lib/same.so", f("usr/lib/same.so", 4 * MIB),
               f("usr/lib/same.so", 4 * MIB, 5)),
    ]
    slices = order_restore(changes, boot={b"etc/fstab", b"usr/lib/libc.so"},
                           working={b"home/ann/report.odt"}, slice_bytes=16 * MIB)
    assert [s.phase for s in slices] == [BOOT, WORKING, REST, REST, REST, REST]
    assert paths(slices[0].changes) == [
        "etc", "etc/fstab", "home", "home/ann", "usr", "usr/lib", "usr/lib/empty",
        "usr/lib/libc.link", "usr/lib/libc.so", "usr/lib/same.so"]
    assert slices[0].bytes == 200 + 2 * MIB  # metadata-only changes download nothing
    assert paths(slices[1].changes) == ["home/ann/report.hard", "home/ann/report.odt"]
    # The rest in tree order, cut at about 16 MiB (a larger file is a slice of its own).
    assert [paths(s.changes) for s in slices[2:5]] == [
        ["home/ann/old.iso"], ["home/ann/photos.tar"], ["usr/lib/big.so"]]
    assert [s.bytes for s in slices[2:5]] == [7 * MIB, 30 * MIB, 9 * MIB]
    assert paths(slices[5].changes) == ["opt/fresh-install"]
    # Every change is in exactly one slice.
    assert sorted(p for s in slices for p in paths(s.changes)) == sorted(paths(changes))


def test_a_directory_that_becomes_a_file_goes_with_the_deletions():
    old_dir = Entry(b"srv/data", EntryType.DIR)
    changes = [Change(Action.DELETE, b"srv/data/x", None, f("srv/data/x", 1)),
               Change(Action.REPLACE, b"srv/data", f("srv/data", 5), old_dir)]
    slices = order_restore(changes, set(), set())
    assert [s.phase for s in slices] == [BOOT, REST]
    assert paths(slices[1].changes) == ["srv/data", "srv/data/x"]


def test_nothing_learned_is_one_boot_slice_of_skeleton_only():
    slices = order_restore([add(f("a", 10))], set(), set())
    assert [(s.phase, paths(s.changes)) for s in slices] == [(BOOT, []), (REST, ["a"])]


def test_files_the_user_wrote_during_the_restore_are_kept(tmp_path):
    root = tmp_path
    (root / "home").mkdir()
    target = f("home/done.txt", 5, 1_700_000_000_000_000_000)
    (root / "home/done.txt").write_bytes(b"12345")
    os.utime(root / "home/done.txt", ns=(target.mtime_ns, target.mtime_ns))
    os.chmod(root / "home/done.txt", 0o644)
    (root / "home/mine.txt").write_bytes(b"the user's new work")
    (root / "home/fresh.cfg").write_bytes(b"as found")
    fresh = f("home/fresh.cfg", 8, os.stat(root / "home/fresh.cfg").st_mtime_ns)
    (root / "home/edited.cfg").write_bytes(b"edited by the user now")
    edited_old = f("home/edited.cfg", 3, 1)
    changes = [
        add(target),  # laid down before a kill, after its switch: done
        add(f("home/mine.txt", 40)),  # the user created it meanwhile: theirs
        add(f("home/new.txt", 9)),  # absent, as found: due
        Change(Action.REPLACE, b"home/fresh.cfg", f("home/fresh.cfg", 2), fresh),  # due
        Change(Action.REPLACE, b"home/edited.cfg", f("home/edited.cfg", 2), edited_old),
        Change(Action.DELETE, b"home/gone", None, f("home/gone", 1)),  # gone already
        d("home/newdir"),
    ]
    due, kept = still_due(os.fsencode(root), changes)
    assert paths(due) == ["home/new.txt", "home/fresh.cfg", "home/newdir"]
    assert kept == [b"home/mine.txt", b"home/edited.cfg"]


def test_status_reports_phase_times_and_bytes(tmp_path):
    assert restore_status(tmp_path) is None
    rec = RestoreRecord(key="k", started=1000.0, phase=WORKING, bytes_total=100,
                        bytes_done=10, usable_at=1001.25)
    rec.save(tmp_path)
    st = restore_status(tmp_path)
    assert st is not None
    assert {k: st[k] for k in ("phase", "usable_after_s", "complete_after_s", "bytes_total",
                               "bytes_done")} == {"phase": WORKING, "usable_after_s": 1.25,
                                                  "complete_after_s": None,
                                                  "bytes_total": 100, "bytes_done": 10}
    rec.phase, rec.complete_at, rec.bytes_done = COMPLETE, 1030.0, 100
    assert rec.status()["complete_after_s"] == 30.0
    (tmp_path / "restore.json").write_text("{damaged")
    assert restore_status(tmp_path) is None


# -- telling the user ------------------------------------------------------------------------


class Runs:
    def __init__(self, fail: set[str] = frozenset()):  # type: ignore[assignment]
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        rc = 1 if any(Path(c).name in self.fail for c in cmd[:1]) else 0
        return subprocess.CompletedProcess(cmd, rc, "", "")


def tools(*present: str):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_desktop_notification_as_the_user_or_in_each_session_as_root():
    lines: list[str] = []
    runs = Runs()
    n = Notifier(which=tools("notify-send", "wall"), run=runs, log=lines.append,
                 euid=lambda: 1000)
    assert n("Restart", "An update is ready") == "notify-send"
    assert runs.calls == [["/usr/bin/notify-send", "--app-name=Strata", "Restart",
                           "An update is ready"]]
    assert lines == ["Restart: An update is ready"]  # the log line always
    runs = Runs()
    n = Notifier(which=tools("notify-send", "runuser"), run=runs, log=lines.append,
                 euid=lambda: 0, buses=lambda: [(0, "unix:path=/run/user/0/bus"),
                                                (1000, "unix:path=/run/user/1000/bus")])
    assert n("T", "B") == "notify-send"
    assert len(runs.calls) == 1 and runs.calls[0][:2] == ["/usr/bin/runuser", "-u"]
    assert "DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus" in runs.calls[0]


def test_wall_without_a_desktop_then_only_the_log():
    runs = Runs(fail={"notify-send"})
    n = Notifier(which=tools("notify-send", "wall"), run=runs, log=lambda s: None,
                 euid=lambda: 1000)
    assert n("T", "B") == "wall"
    assert runs.calls[-1] == ["/usr/bin/wall", "T: B"]
    assert Notifier(which=tools(), run=Runs(), log=lambda s: None)("T", "B") == "log"
    # As root with no graphical session: wall.
    runs = Runs()
    assert Notifier(which=tools("notify-send", "runuser", "wall"), run=runs,
                    log=lambda s: None, euid=lambda: 0, buses=list)("T", "B") == "wall"


def test_the_restart_prompt_once_per_update_then_daily(tmp_path):
    told: list[tuple[str, str]] = []

    def notify(title: str, body: str) -> str:
        told.append((title, body))
        return "log"
    assert prompt_restart(tmp_path, "k1", "3 to add", 1000.0, notify)
    assert not prompt_restart(tmp_path, "k1", "3 to add", 1000.0 + 3600, notify)
    assert prompt_restart(tmp_path, "k1", "3 to add", 1000.0 + 86400, notify)
    assert prompt_restart(tmp_path, "k2", "1 to delete", 1000.0 + 86401, notify)
    assert len(told) == 3 and "3 to add" in told[0][1] and "restart" in told[0][1]
    assert ready_detail({"plan": {"changes": {"add": 3, "replace": 0, "delete": 1}}}) == \
        "3 to add, 1 to delete"
    assert ready_detail({}) == "a layer update"


# -- systemd units ------------------------------------------------------------------------------


def test_units_written_into_a_directory_of_ones_own_are_not_enabled(tmp_path):
    runs = Runs()
    out = service.install_service("/opt/strata/bin/strata", unit_dir=tmp_path / "units",
                                  state=Path("/var/lib/strata agent"), run=runs)
    assert not out.enabled and runs.calls == [] and "not enabled" in out.note
    agent = (tmp_path / "units" / service.AGENT_UNIT).read_text()
    apply = (tmp_path / "units" / service.APPLY_UNIT).read_text()
    assert "ExecStart=/opt/strata/bin/strata agent run --state '/var/lib/strata agent'" \
        in agent
    assert "RestartPreventExitStatus=5" in agent
    assert "ExecStart=/opt/strata/bin/strata agent apply --state" in apply
    assert "Before=display-manager.service" in apply and "Type=oneshot" in apply
    assert oct((tmp_path / "units" / service.APPLY_UNIT).stat().st_mode & 0o777) == "0o644"


def test_dry_run_writes_nothing(tmp_path):
    out = service.install_service("strata", unit_dir=tmp_path / "u", dry_run=True,
                                  run=Runs())
    assert out.dry_run and not (tmp_path / "u").exists() and out.written == []


def test_the_system_unit_directory_is_enabled_with_systemctl(tmp_path, monkeypatch):
    system = tmp_path / "etc/systemd/system"
    monkeypatch.setattr(service, "SYSTEM_UNIT_DIR", system)
    runs = Runs()
    out = service.install_service("strata", unit_dir=system, run=runs)
    assert out.enabled
    assert runs.calls == [["systemctl", "daemon-reload"],
                          ["systemctl", "enable", service.APPLY_UNIT, service.AGENT_UNIT]]
    failing = Runs(fail={"systemctl"})
    try:
        service.install_service("strata", unit_dir=system, run=failing)
    except service.ServiceInstallFailed as exc:
        assert "systemctl daemon-reload failed" in str(exc)
    else:
        raise AssertionError("a failing systemctl must be reported")


def test_units_go_under_the_root_given_or_the_directory_given(tmp_path):
    assert service.unit_dir_for(Path("/mnt/image"), None) == \
        Path("/mnt/image/etc/systemd/system")
    assert service.unit_dir_for(None, None) == Path("/etc/systemd/system")
    assert service.unit_dir_for(Path("/mnt/image"), tmp_path) == tmp_path


def test_without_a_learned_boot_set_the_system_comes_first_then_user_data():
    from strata.agent.pipeline import first_sets
    from strata.layers.rules import LayerRules
    from strata.model.usage import UsageSets

    changes = [add(f("etc/fstab", 10)), add(f("usr/bin/tool", 5000)),
               add(f("home/ann/thesis.odt", 9000)), add(f("home/ann/recent.txt", 20))]
    rules = LayerRules.default("linux")
    boot, working, how = first_sets(UsageSets(working=["home/ann/recent.txt"]), changes,
                                    rules)
    assert "none learned" in how
    slices = order_restore(changes, boot, working)
    assert [(s.phase, paths(s.changes)) for s in slices] == [
        (BOOT, ["etc/fstab", "usr/bin/tool"]), (WORKING, ["home/ann/recent.txt"]),
        (REST, ["home/ann/thesis.odt"])]
    learned, _, how = first_sets(UsageSets(boot=["etc/fstab"], boots_seen=4), changes, rules)
    assert learned == {b"etc/fstab"} and how == "learned over 4 boot(s)"


def test_the_working_set_comes_most_recently_used_first():
    changes = [add(f("home/a.txt", 10)), add(f("home/b.txt", 10)), add(f("home/c.txt", 10))]
    slices = order_restore(changes, set(), {b"home/c.txt": 0, b"home/a.txt": 1},
                           slice_bytes=15)
    assert [(s.phase, paths(s.changes)) for s in slices[1:]] == [
        (WORKING, ["home/c.txt"]), (WORKING, ["home/a.txt"]), (REST, ["home/b.txt"])]
