"""Generated system trees for the layer tests: a small Debian-like root filesystem in two
versions, built from nothing on the host (no copy of the host's /usr), deterministic to
the byte and the nanosecond, with real owners and modes (tests run as root).

Version 2 is what a new base image brings: a new system account, a dropped one, a
changed configuration file, binaries and a library bumped, a library's symlink moved to
a new file, a new service with its systemd ``*.wants`` link, and symlinks recreated with
the same target but a newer mtime (as a fresh install leaves them).
"""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

T1 = 1_700_000_000 * 10**9  # mtimes of the first base
T2 = 1_720_000_000 * 10**9  # what the second base changed
SHADOW_GID = 42

# name, uid, gid, gecos, home, shell
SYSTEM_USERS = [
    ("root", 0, 0, "root", "/root", "/bin/bash"),
    ("daemon", 1, 1, "daemon", "/usr/sbin", "/usr/sbin/nologin"),
    ("bin", 2, 2, "bin", "/bin", "/usr/sbin/nologin"),
    ("sys", 3, 3, "sys", "/dev", "/usr/sbin/nologin"),
    ("sync", 4, 65534, "sync", "/bin", "/bin/sync"),
    ("games", 5, 60, "games", "/usr/games", "/usr/sbin/nologin"),
    ("man", 6, 12, "man", "/var/cache/man", "/usr/sbin/nologin"),
    ("www-data", 33, 33, "www-data", "/var/www", "/usr/sbin/nologin"),
    ("systemd-network", 998, 998, "systemd Network Management", "/", "/usr/sbin/nologin"),
    ("nobody", 65534, 65534, "nobody", "/nonexistent", "/usr/sbin/nologin"),
]
CHRONY_USER = ("_chrony", 100, 102, "Chrony daemon,,,", "/var/lib/chrony", "/usr/sbin/nologin")
# name, gid, members
SYSTEM_GROUPS = [
    ("root", 0, ""), ("daemon", 1, ""), ("bin", 2, ""), ("sys", 3, ""), ("adm", 4, ""),
    ("tty", 5, ""), ("disk", 6, ""), ("man", 12, ""), ("sudo", 27, ""), ("www-data", 33, ""),
    ("shadow", SHADOW_GID, ""), ("staff", 50, ""), ("games", 60, ""), ("users", 100, ""),
    ("systemd-network", 998, ""), ("nogroup", 65534, ""),
]
CHRONY_GROUP = ("_chrony", 102, "")


def accounts(version: int) -> dict[str, bytes]:
    """The account databases of base `version` (v2 adds _chrony, drops games, and
    changes root's last password change date)."""
    users = [u for u in SYSTEM_USERS if version == 1 or u[0] != "games"]
    groups = [g for g in SYSTEM_GROUPS if version == 1 or g[0] != "games"]
    if version >= 2:
        users.append(CHRONY_USER)
        groups.insert(groups.index(("users", 100, "")), CHRONY_GROUP)
    day = 19500 if version == 1 else 19700

    def lines(rows: list[str]) -> bytes:
        return "".join(r + "\n" for r in rows).encode()
    return {
        "etc/passwd": lines([f"{n}:x:{u}:{g}:{c}:{h}:{s}" for n, u, g, c, h, s in users]),
        "etc/shadow": lines([f"{n}:{'*' if n != 'root' else '!'}:{day}:0:99999:7:::"
                             for n, *_ in users]),
        "etc/group": lines([f"{n}:x:{g}:{m}" for n, g, m in groups]),
        "etc/gshadow": lines([f"{n}:*::{m}" for n, _, m in groups]),
        "etc/subuid": b"",
        "etc/subgid": b"",
    }


def _binary(path: str, size: int, version: int) -> bytes:
    rng = random.Random(path)
    data = bytearray(b"\x7fELF\x02\x01\x01" + rng.randbytes(size))
    if version >= 2:  # a rebuilt binary: a few spots differ, most of it does not
        for k in range(1, 4):
            at = k * len(data) // 4
            data[at:at + 16] = random.Random(path + "v2").randbytes(16)
    return bytes(data)


def build_base(dest: Path, version: int) -> None:
    """Write base `version` (1 or 2) at `dest`."""
    v2 = version >= 2
    files: list[tuple[str, bytes, int, int, int, bool]] = []  # path, data, mode, uid, gid, new

    def add(path: str, data: bytes, mode: int = 0o644, changed: bool = False,
            gid: int = 0) -> None:
        files.append((path, data, mode, 0, gid, changed and v2))

    for name, size in (("bash", 120_000), ("ls", 60_000), ("cat", 30_000),
                       ("cp", 40_000), ("login", 25_000)):
        add(f"usr/bin/{name}", _binary(name, size, version if name in ("bash", "ls") else 1),
            0o755, changed=name in ("bash", "ls"))
    add("usr/bin/passwd", _binary("passwd", 30_000, 1), 0o4755)
    add("usr/bin/sudo", _binary("sudo", 50_000, version), 0o4755, changed=True)
    add("usr/sbin/useradd", _binary("useradd", 40_000, 1), 0o755)
    add("usr/sbin/nologin", _binary("nologin", 8_000, 1), 0o755)
    lib = "usr/lib/x86_64-linux-gnu"
    add(f"{lib}/libc.so.6", _binary("libc", 400_000, version), 0o755, changed=True)
    add(f"{lib}/libfoo.so.1.2.{3 if not v2 else 4}", _binary("libfoo", 20_000, version),
        changed=True)
    add("usr/lib/os-release", f'PRETTY_NAME="Debian GNU/Linux 12"\nVERSION_ID="12"\n'
        f'ID=debian\nBUILD={version}\n'.encode(), changed=True)
    add("usr/share/zoneinfo/Etc/UTC", b"TZif2" + bytes(40))
    add("usr/share/doc/bash/copyright", b"Copyright (C) the bash authors\n")
    for unit in ("ssh", "cron") + (("chrony",) if v2 else ()):
        add(f"usr/lib/systemd/system/{unit}.service",
            f"[Unit]\nDescription={unit}\n[Service]\nExecStart=/usr/sbin/{unit}d\n"
            "[Install]\nWantedBy=multi-user.target\n".encode(), changed=unit == "chrony")
    if v2:
        add("usr/sbin/chronyd", _binary("chronyd", 35_000, 2), 0o755, changed=True)
    add("var/lib/dpkg/status", f"Package: base-files\nVersion: 12.{4 + version}\n".encode(),
        changed=True)
    add("etc/debian_version", f"12.{4 + version}\n".encode(), changed=True)
    add("etc/default/locale", b"LANG=C.UTF-8\n" if not v2 else b"LANG=en_US.UTF-8\n",
        changed=True)
    add("etc/ssh/sshd_config", b"Port 22\nPermitRootLogin prohibit-password\n"
        + (b"KbdInteractiveAuthentication no\n" if v2 else b""), changed=True)
    add("etc/login.defs", b"UID_MIN 1000\nUID_MAX 60000\nSYS_UID_MAX 999\n")
    add("etc/fstab", b"# <file system> <mount point> <type> <options> <dump> <pass>\n")
    add("etc/sudoers", b"root ALL=(ALL:ALL) ALL\n%sudo ALL=(ALL:ALL) ALL\n", 0o440)
    for path, data in accounts(version).items():
        secret = path in ("etc/shadow", "etc/gshadow")
        add(path, data, 0o640 if secret else 0o644, changed=data != accounts(1)[path],
            gid=SHADOW_GID if secret else 0)

    links = [  # path, target, recreated by the new base (same target, newer mtime)
        ("bin", "usr/bin", True), ("sbin", "usr/sbin", True), ("lib", "usr/lib", False),
        ("etc/os-release", "../usr/lib/os-release", False),
        ("etc/localtime", "/usr/share/zoneinfo/Etc/UTC", True),
        (f"{lib}/libfoo.so.1", f"libfoo.so.1.2.{3 if not v2 else 4}", True),
        ("etc/systemd/system/multi-user.target.wants/ssh.service",
         "/usr/lib/systemd/system/ssh.service", True),
        ("etc/systemd/system/multi-user.target.wants/cron.service",
         "/usr/lib/systemd/system/cron.service", False),
    ]
    if v2:
        links.append(("etc/systemd/system/multi-user.target.wants/chrony.service",
                      "/usr/lib/systemd/system/chrony.service", True))
    for path, data, mode, uid, gid, new in files:
        p = dest / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)  # after chown, which clears setuid bits
        t = T2 if new else T1
        os.utime(p, ns=(t, t))
    for path, target, recreated in links:
        p = dest / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
        t = T2 if recreated and v2 else T1
        os.utime(p, ns=(t, t), follow_symlinks=False)
    for d in sorted({p for p in dest.rglob("*") if p.is_dir() and not p.is_symlink()},
                    key=lambda p: -len(p.parts)):
        os.chmod(d, 0o755)
        os.utime(d, ns=(T1, T1))


def copy_tree(src: Path, dst: Path) -> None:
    """An exact copy: owners, modes, times, symlinks (cp -a)."""
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{src}/.", str(dst)], check=True)


def full_state(root: Path, skip: tuple[str, ...] = (".strata-apply",)) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, mtime_ns, content or link target) for a whole tree;
    a directory's mtime is left out (it moves whenever its contents do)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames if (rel_dir / d).as_posix() not in skip]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = (rel_dir / name).as_posix()
            st = p.lstat()
            head = (st.st_mode & 0o7777, st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", *head, st.st_mtime_ns, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", *head, None, None)
            else:
                out[rel] = ("f", *head, st.st_mtime_ns, p.read_bytes())
    return out
