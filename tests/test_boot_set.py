"""Boot-set learning (agent/usage.py) and the sets on the wire (model/usage.py): which
files an endpoint reads at boot and first login, learned from their access times with an
injected clock and injected sessions; relatime's partial view made up for by remembering
several boots; a crafted list refused or bounded before it costs the server work."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from strata.agent.usage import (
    BOOT_SECONDS,
    SESSIONS_KEPT,
    USAGE_FILE,
    Learned,
    Observation,
    Session,
    SessionClock,
    Windows,
    classify,
    learn,
    learn_and_report,
    learn_due,
    read_boot_time,
    read_first_login,
)
from strata.engine.backup import HashOnlySink, archive_tree
from strata.model.usage import MAX_BOOT_PATHS, MAX_WORKING_PATHS, UsageSets
from strata.store.chunker import Chunker, ChunkerParams

DAY = 86400.0
BOOT = 1_800_000_000.0  # an injected boot time
LOGIN = BOOT + 40.0


def obs(path: str, atime: float, mtime: float = BOOT - 90 * DAY) -> Observation:
    return Observation(path, atime, mtime)


def test_files_read_at_boot_and_first_login_are_the_boot_set():
    now = BOOT + 3 * 3600
    boot, working = classify([
        obs("usr/lib/systemd/systemd", BOOT + 2),  # read by the boot
        obs("etc/fstab", BOOT + BOOT_SECONDS),  # the window's last second
        obs("home/ann/.bashrc", LOGIN + 250),  # the login (boot window closed at +300)
        obs("usr/share/gnome/shell.js", LOGIN + 299),
        obs("home/ann/report.odt", BOOT + 2 * 3600),  # opened later: working set
        obs("home/ann/edited.txt", BOOT - 30 * DAY, mtime=now - 5 * DAY),  # written lately
        obs("usr/share/doc/old/README", BOOT - 40 * DAY),  # not used lately: the rest
        obs("var/cache/x", LOGIN + 301),  # after both windows
        obs("var/log/boot.log", BOOT + 30, mtime=BOOT + 30),  # written by the boot, unread
    ], [Session(BOOT, LOGIN)], now)
    assert set(boot) == {"usr/lib/systemd/systemd", "etc/fstab", "home/ann/.bashrc",
                         "usr/share/gnome/shell.js"}
    assert working == ["home/ann/report.odt", "var/cache/x", "var/log/boot.log",
                       "home/ann/edited.txt"]


def test_relatime_reads_missed_by_one_boot_are_kept_from_earlier_boots():
    """Under relatime a file read at every boot shows its atime only once a day: today's
    boot sees it read yesterday. The sessions of recent boots are remembered, so it stays
    in the boot set; once no remembered boot read it, it drops out."""
    learned = Learned()
    day1 = Session(BOOT, BOOT + 60)
    learned = learn(learned, day1, [obs("usr/lib/libc.so.6", BOOT + 3),
                                     obs("etc/hosts", BOOT + 5)], BOOT + 3600)
    day2 = Session(BOOT + 0.5 * DAY, None)
    # Second boot, 12 h later: relatime leaves libc's atime at day 1's boot; hosts was read
    # again after being changed (mtime > atime), so it moved into this boot's window.
    files = [obs("usr/lib/libc.so.6", BOOT + 3),
             obs("etc/hosts", day2.boot + 7, mtime=day2.boot - 100)]
    learned = learn(learned, day2, files, day2.boot + 3600)
    assert learned.boot_paths == {"usr/lib/libc.so.6": [BOOT],
                                  "etc/hosts": [BOOT, day2.boot]}
    assert learned.sets().boot == ["etc/hosts", "usr/lib/libc.so.6"]  # most boots first
    # Many boots later, a file nobody reads at boot any more has dropped out.
    t = day2.boot
    for _ in range(SESSIONS_KEPT):
        t += DAY
        learned = learn(learned, Session(t), [obs("etc/hosts", t + 4, mtime=t - 1)],
                        t + 3600)
    assert "usr/lib/libc.so.6" not in learned.boot_paths
    assert learned.sets().boot == ["etc/hosts"] and learned.sets().boots_seen == SESSIONS_KEPT


def test_a_pass_is_due_when_a_window_closes_and_once_a_day():
    s = Session(BOOT, LOGIN)
    assert learn_due(Learned(), s, BOOT + 10)
    done = Learned(learned=BOOT + 10)
    assert not learn_due(done, s, BOOT + 200)  # both windows still open
    assert learn_due(done, s, BOOT + 301)  # the boot window closed since
    later = Learned(learned=LOGIN + 301)
    assert not learn_due(later, s, LOGIN + 3600)
    assert learn_due(later, s, LOGIN + 301 + DAY)


def _manifest(root: Path) -> bytes:
    return archive_tree(HashOnlySink(Chunker(ChunkerParams())), root,
                        parent_entries=None).manifest_bytes


def test_learned_from_a_real_tree_and_sent_once(tmp_path):
    root = tmp_path / "root"
    files = {"usr/lib/libboot.so": BOOT + 10, "etc/login.defs": LOGIN + 20,
             "home/ann/doc.odt": BOOT + 5000, "usr/share/old.txt": BOOT - 60 * DAY}
    for rel, atime in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode() * 50)
        os.utime(p, (atime, BOOT - 61 * DAY))
    manifest = _manifest(root)  # the backup reads with O_NOATIME: the times stay
    assert os.stat(root / "usr/lib/libboot.so").st_atime == BOOT + 10
    sent: list[UsageSets] = []
    now = [BOOT + 7200]
    clock = SessionClock(now=lambda: now[0], boot_time=lambda: BOOT,
                         first_login=lambda after: LOGIN)
    state = tmp_path / "state"
    state.mkdir()
    out = learn_and_report(state, root, lambda: manifest, sent.append, clock=clock)
    assert out is not None and sent == [out]
    assert out.boot == ["etc/login.defs", "usr/lib/libboot.so"]
    assert out.working == ["home/ann/doc.odt"] and out.boots_seen == 1
    # Nothing new: nothing sent again (the next pass is not even due).
    now[0] += 600
    assert learn_and_report(state, root, lambda: manifest, sent.append, clock=clock) is None
    assert len(sent) == 1
    # A server that was unreachable: the sets stay unsent and go with the next cycle.
    (state / USAGE_FILE).write_text(json.dumps({**json.loads((state / USAGE_FILE)
                                                             .read_text()), "sent": ""}))

    def down(sets: UsageSets) -> None:
        raise OSError("unreachable")
    with pytest.raises(OSError):
        learn_and_report(state, root, lambda: manifest, down, clock=clock)
    assert learn_and_report(state, root, lambda: manifest, sent.append, clock=clock) is not None


def test_no_boot_time_or_no_snapshot_learns_nothing(tmp_path):
    clock = SessionClock(now=time.time, boot_time=lambda: None)
    assert learn_and_report(tmp_path, tmp_path, lambda: b"x", lambda s: None,
                            clock=clock) is None
    clock = SessionClock(now=time.time, boot_time=lambda: BOOT, first_login=lambda a: None)
    assert learn_and_report(tmp_path, tmp_path, lambda: None, lambda s: None,
                            clock=clock) is None


def _utmp_record(kind: int, sec: int) -> bytes:
    rec = bytearray(384)
    struct.pack_into("<h", rec, 0, kind)
    struct.pack_into("<i", rec, 340, sec)
    return bytes(rec)


def test_first_login_from_utmp_wtmp_and_logind(tmp_path):
    wtmp = tmp_path / "wtmp"
    wtmp.write_bytes(_utmp_record(7, int(BOOT) - 500)  # a login of the previous boot
                     + _utmp_record(2, int(BOOT))  # BOOT_TIME record
                     + _utmp_record(7, int(LOGIN) + 100) + _utmp_record(8, int(LOGIN) + 9))
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    (sessions / "3").write_text(f"UID=1000\nCLASS=user\nREALTIME={int(LOGIN * 1e6)}\n")
    (sessions / "c1").write_text(f"CLASS=greeter\nREALTIME={int((BOOT + 1) * 1e6)}\n")
    assert read_first_login(BOOT, utmp=[str(wtmp)], logind=str(sessions / "*")) == LOGIN
    assert read_first_login(BOOT, utmp=[str(wtmp)], logind=str(tmp_path / "none/*")) \
        == LOGIN + 100
    assert read_first_login(LOGIN + 200, utmp=[str(wtmp)], logind="") is None
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nbtime 1800000000\nprocesses 5\n")
    assert read_boot_time(str(stat)) == BOOT
    assert read_boot_time(str(tmp_path / "missing")) is None


# -- the sets on the wire: hostile input ----------------------------------------------------


@pytest.mark.parametrize("bad", ["../etc/shadow", "/etc/passwd", "home/../../x", "a//b",
                                 "./a", "a/./b", "", "a\x00b", "x" * 5000, "\udcff"])
def test_a_crafted_path_is_refused(bad):
    with pytest.raises(ValidationError):
        UsageSets(boot=["usr/lib/ok", bad])
    with pytest.raises(ValidationError):
        UsageSets.model_validate({"working": [bad]})


def test_a_huge_list_is_refused_before_any_path_is_checked():
    huge = ["a"] * (MAX_BOOT_PATHS + 1)
    started = time.process_time()
    with pytest.raises(ValidationError, match="at most 20000 paths"):
        UsageSets.model_validate({"boot": huge})
    with pytest.raises(ValidationError, match="at most 40000 paths"):
        UsageSets.model_validate({"working": ["a"] * (MAX_WORKING_PATHS + 1)})
    assert time.process_time() - started < 0.5
    with pytest.raises(ValidationError, match="characters of paths in all"):
        UsageSets(boot=["d/" + "x" * 4000 + str(i) for i in range(800)])


def test_duplicates_and_overlaps_are_dropped():
    s = UsageSets(boot=["a", "b", "a"], working=["b", "c", "c"])
    assert s.boot == ["a", "b"] and s.working == ["c"]


def test_what_the_agent_sends_is_within_the_bounds():
    many = {f"usr/lib/{i:06d}/" + "x" * 100: [BOOT] for i in range(2 * MAX_BOOT_PATHS)}
    learned = Learned(sessions=[Session(BOOT)], boot_paths=many,
                      working=[f"home/w{i}" for i in range(MAX_WORKING_PATHS + 10)])
    sets = learned.sets()  # validated by the wire model itself
    assert len(sets.boot) == MAX_BOOT_PATHS
    assert len(sets.working) <= MAX_WORKING_PATHS
    UsageSets.model_validate(sets.model_dump(mode="json"))


def test_windows_are_configurable():
    boot, _ = classify([obs("a", BOOT + 50)], [Session(BOOT)], BOOT + 100,
                       Windows(boot_seconds=30))
    assert boot == {}
