"""A pipelined restore onto new hardware, end to end (issue 14: "the endpoint is usable at
no more than 10% of the full restore's time, then completes, and the final tree equals
the CVD").

The old endpoint learns its boot set from its own files' access times (the boot's files
read within the window after the kernel's real boot time, as /proc/stat gives it) and
sends it with its first cycle; the CVD is restored onto a new endpoint that reaches the
server over a throttled link: a network namespace joined by a veth pair shaped with
`tc ... tbf` (as in tests/test_wan_netns.py), or, without root, the agent's own download
cap over loopback (the bandwidth policy). A second test kills the agent mid-restore,
after the endpoint became usable: the next run resumes and nothing is downloaded twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from server_fixtures import (
    Agent,
    Proc,
    Server,
    kill_group,
    spawn,
    strata,
    strata_json,
)
from strata.agent.usage import read_boot_time

# The datacenter/branch link and its server, as the outage test sets them up.
from test_wan_netns import wan, wan_args  # noqa: F401

pytestmark = pytest.mark.e2e

MIB = 1 << 20
REST_BYTES = 40 * MIB  # incompressible: what the link carries after the boot set
BOOT_FILES = 40  # small, as a boot's libraries and configuration are
DAY = 86400


def tree_state(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, st.st_mtime_ns, p.read_bytes())
    return out


def build_old_endpoint(root: Path) -> tuple[dict[str, list[str]], dict[str, tuple]]:
    """A tree with a boot set (read just after this machine's boot), a working set (read
    today) and a large rest (untouched for two months); returns the paths of each, and
    the tree's state (read before the access times are set: under relatime a read after
    utime(), which moves ctime, would move them again)."""
    btime = read_boot_time()
    assert btime is not None
    rng = random.Random(14)
    old = time.time() - 60 * DAY
    groups: dict[str, list[str]] = {"boot": [], "working": [], "rest": []}
    atimes: dict[str, float] = {}

    def put(rel: str, data: bytes, atime: float, group: str, mode: int = 0o644) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)
        os.utime(p, (old, old))
        atimes[rel] = atime
        groups[group].append(rel)

    for i in range(BOOT_FILES):
        put(f"usr/lib/boot/lib{i:02d}.so", rng.randbytes(3000 + 50 * i), btime + 20 + i,
            "boot", 0o755)
    put("etc/machine-info", b"PRETTY_HOSTNAME=old laptop\n", btime + 5, "boot")
    put("etc/fstab", b"# the laptop's disks\n", btime + 6, "boot")
    put("home/ann/report.odt", rng.randbytes(400_000), time.time() - 3600, "working")
    put("home/ann/.config/app.ini", b"[app]\nx=1\n", time.time() - 7200, "working")
    for i in range(8):
        put(f"home/ann/media/clip{i}.mp4", rng.randbytes(REST_BYTES // 8), old, "rest")
    (root / "usr/lib/boot/libc.link").symlink_to("lib00.so")
    (root / "home/ann/empty").write_bytes(b"")
    (root / "var/spool").mkdir(parents=True)
    state = tree_state(root)
    for rel, atime in atimes.items():
        os.utime(root / rel, (atime, old))
    return groups, state


def new_endpoint_tree(root: Path) -> None:
    """A fresh install on the new machine: replaced by the CVD."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("fresh-install\n")
    (root / "opt/vendor-tools").mkdir(parents=True)
    (root / "opt/vendor-tools/tool").write_bytes(b"preinstalled\n")


def restore_status(state: Path) -> dict:
    try:
        return json.loads((state / "restore.json").read_text())
    except (OSError, ValueError):
        return {}


def learned_and_moved(server: Server, old: Agent, groups: dict[str, list[str]],
                      new_id: str) -> str:
    """The old endpoint's first cycle sent its sets; the restore moves them to `new_id`."""
    usage = server.admin("GET", f"/endpoints/{old.endpoint_id}/usage")
    assert usage["boot"] == len(groups["boot"]), usage  # type: ignore[index]
    # The working set: what was read today, and what the agent itself reads (hostname).
    assert usage["working"] >= len(groups["working"]), usage  # type: ignore[index]
    said = server.admin_cli("endpoint", "restore", old.endpoint_id, "--to-endpoint", new_id,
                            "--yes").stdout
    assert f"boot set of {len(groups['boot'])} file(s) first" in said, said
    moved = server.admin("GET", f"/endpoints/{new_id}/usage")
    assert moved["boot"] == len(groups["boot"]), moved  # type: ignore[index]
    return said


def watch(proc: Proc, state: Path, root: Path, groups: dict[str, list[str]],
          netns: str = "") -> dict:
    """Follow a restore until it ends; at the first sight of it usable with files still to
    come, check what is in place and what `agent status --json` says. Returns that
    status's restore block."""
    seen: dict = {}
    deadline = time.monotonic() + 600
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the restore did not finish"
        rec = restore_status(state)
        if not seen and rec.get("usable_at") and rec.get("phase") in ("working", "rest"):
            for rel in groups["boot"]:
                assert (root / rel).is_file(), rel
            assert not all((root / r).exists() for r in groups["rest"])
            out = strata("agent", "status", "--state", state, "--json", timeout=120,
                         netns=netns)
            seen = json.loads(out.stdout)["restore"]
        time.sleep(0.05)
    return seen


def check_done(old_state: dict[str, tuple], new_root: Path, out: str, err: str,
               seen: dict, state: Path, *, resumed: bool = False) -> dict:
    result = json.loads(out)
    assert result["update"]["state"] == "applied", (out, err)
    # The log line when it became usable (a resumed run was usable already).
    assert ("usable after" in err) is not resumed and "restore complete" in err, err
    assert seen and seen["usable_after_s"] is not None and seen["complete_after_s"] is None
    assert seen["phase"] in ("working", "rest") and 0 < seen["bytes_done"] < seen["bytes_total"]
    final = strata_json("agent", "status", "--state", state)["restore"]
    assert final["phase"] == "complete" and final["bytes_done"] == final["bytes_total"]
    # The tree is the CVD's: every file, mode, time, link; the fresh install's own is gone.
    assert tree_state(new_root) == old_state
    return final


def test_usable_within_a_tenth_of_the_full_restore_over_a_throttled_link(wan, tmp_path):  # noqa: F811
    server, link = wan
    old = Agent(server, tmp_path / "old", tmp_path / "old-state")
    groups, old_state = build_old_endpoint(old.root)
    old.enroll(server.create_token())
    assert old.run_once()["centralized"]
    new_root, new_state = tmp_path / "new", tmp_path / "new-state"
    new_endpoint_tree(new_root)
    url = f"http://{link.dc_ip}:{server.port}"
    enrolled = json.loads(link.run("agent", "enroll", "--server", url, "--token",
                                   server.create_token(), "--root", new_root, "--state",
                                   new_state, "--insecure", "--json"))
    link.run("agent", "run", "--once", "--state", new_state, "--json")  # the fresh install
    learned_and_moved(server, old, groups, enrolled["endpoint_id"])

    before = link.bytes_to_branch()
    proc = link.spawn("agent", "run", "--once", "--state", new_state, "--json")
    try:
        seen = watch(proc, new_state, new_root, groups, link.ns)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    carried = link.bytes_to_branch() - before
    final = check_done(old_state, new_root, out, err, seen, new_state)
    usable, complete = final["usable_after_s"], final["complete_after_s"]
    print(f"\nusable after {usable:.2f} s, complete after {complete:.2f} s "
          f"({usable / complete:.1%}); {carried:,} B crossed the link for "
          f"{final['bytes_total']:,} B of files")
    assert usable <= 0.1 * complete, final
    assert carried <= final["bytes_total"] * 1.05 + 2 * MIB


def test_killed_mid_restore_resumes_with_nothing_downloaded_twice(tmp_path):
    """Over loopback, the agent's download cap (the bandwidth policy, 16000 kbps) makes
    the restore last long enough to kill it once the endpoint is usable; the next run
    finishes it from the slice it had reached and the resume journal."""
    server = Server(tmp_path / "server").start()
    try:
        old = Agent(server, tmp_path / "old", tmp_path / "old-state")
        groups, old_state = build_old_endpoint(old.root)
        old.enroll(server.create_token())
        assert old.run_once()["centralized"]
        new = Agent(server, tmp_path / "new", tmp_path / "new-state")
        new_endpoint_tree(new.root)
        new.enroll(server.create_token())
        new.run_once()
        rules = tmp_path / "bandwidth.json"
        rules.write_text(json.dumps({"rules": [{"subnet": "127.0.0.0/8",
                                                "download_kbps": 16000}]}))
        server.admin_cli("policy", "set", "bandwidth", rules, "--replace", "--yes")
        learned_and_moved(server, old, groups, new.endpoint_id)
        proc = spawn(*new.cmd("run", "--once", "--json"))
        deadline = time.monotonic() + 300
        journal = new.state / "download.journal"  # agent/resume.py: chunks as they come

        def mid_slice() -> bool:  # usable, one slice of the rest in, the next half come
            rec = restore_status(new.state)
            return rec.get("phase") == "rest" and rec.get("bytes_done", 0) > REST_BYTES // 4 \
                and journal.exists() and journal.stat().st_size > 3 * MIB
        while not mid_slice():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        kill_group(proc)
        first = restore_status(new.state)
        partial = journal.stat().st_size  # received of the slice in flight, not switched in
        assert first["usable_at"] and not first["complete_at"]
        # The user needs a file that has not arrived: `agent restore PATH` fetches it at
        # once from the snapshot being restored; the restore then finds it in place.
        wanted = next(r for r in reversed(groups["rest"]) if not (new.root / r).exists())
        got = strata_json(*new.cmd("restore", wanted, "--yes"))
        assert got["files"] == 1 and not got["errors"], got
        assert (new.root / wanted).read_bytes() == old_state[wanted][3]
        wire_before = strata_json("agent", "status", "--state", new.state)["bytes_received"]
        proc = spawn(*new.cmd("run", "--once", "--json"))
        seen = watch(proc, new.state, new.root, groups)
        out, err = proc.communicate(timeout=60)
        final = check_done(old_state, new.root, out, err, seen, new.state, resumed=True)
        assert final["kept_user_files"] == 0  # the file fetched early was the CVD's
        resumed = strata_json("agent", "status", "--state", new.state)["bytes_received"] \
            - wire_before
        left = final["bytes_total"] - first["bytes_done"] - len(old_state[wanted][3])
        print(f"\nkilled at {first['bytes_done']:,} of {final['bytes_total']:,} B in place "
              f"and {partial:,} B of the next slice received; the resumed run received "
              f"{resumed:,} B for the {left:,} B left")
        # The slice in flight when it was killed was partly received: kept (the resume
        # journal), not fetched again; the rest once.
        assert resumed <= (left - partial) * 1.02 + MIB, (resumed, left, partial)
    finally:
        server.stop()
        server.kill()
    shutil.rmtree(tmp_path / "server", ignore_errors=True)


def test_install_service_writes_units_where_told_and_enables_nothing_there(tmp_path):
    state = tmp_path / "state"
    dry = strata_json("agent", "install-service", "--unit-dir", tmp_path / "units",
                      "--state", state, "--dry-run")
    assert dry["dry_run"] and not (tmp_path / "units").exists()
    out = strata_json("agent", "install-service", "--root", tmp_path / "image", "--state",
                      state, "--strata", "/usr/bin/strata")
    units = tmp_path / "image/etc/systemd/system"
    assert not out["enabled"] and out["commands"] == []
    assert sorted(p.name for p in units.iterdir()) == ["strata-agent-apply.service",
                                                       "strata-agent.service"]
    assert f"ExecStart=/usr/bin/strata agent apply --state {state}" in \
        (units / "strata-agent-apply.service").read_text()
