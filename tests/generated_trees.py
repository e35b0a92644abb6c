"""Generated system trees, built from nothing on the host (no copy of the host's /usr) and
deterministic to the byte and the nanosecond, with real modes.

``build_base``: a small Debian-like root filesystem in two versions for the layer tests,
with real owners (tests run as root). Version 2 is what a new base image brings: a new
system account, a dropped one, a changed configuration file, binaries and a library
bumped, a library's symlink moved to a new file, a new service with its systemd
``*.wants`` link, and symlinks recreated with the same target but a newer mtime (as a
fresh install leaves them).

``os_tree``: an OS-like /usr of a given size whose files compress and dedup like real
ones, for the tests that centralize, capture and migrate "the OS".
"""

from __future__ import annotations

import itertools
import math
import os
import random
import stat
import struct
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


# -- an OS-like tree of a given size -------------------------------------------------------

OS_T0 = 1_680_000_000  # seconds: the oldest package build of an os_tree (2023)
OS_MAX_FILE = 4 << 20
_WORDS = ("the", "of", "to", "and", "a", "in", "is", "for", "file", "be", "this", "that",
          "with", "on", "not", "by", "or", "if", "it", "as", "are", "from", "value", "data",
          "default", "set", "name", "error", "use", "path", "list", "when", "type", "can",
          "all", "an", "which", "new", "user", "system", "return", "config", "options",
          "see", "license", "version", "string", "only", "must", "used", "GNU", "buffer")
_SYLLABLES = ("ka", "ro", "mi", "ne", "to", "sa", "li", "vu", "pe", "do", "ga", "zi", "xo",
              "bre", "str", "an", "el", "or", "is", "um", "qu", "ch", "th", "fi", "lo", "ma",
              "de", "te", "re", "con", "gen", "pro", "ex", "in", "ar", "us", "ul", "ip")
_LANGS = ("de", "fr", "es", "it", "pt_BR", "ru", "ja", "zh_CN", "pl", "nl", "sv", "cs")


def words_by_byte(words: tuple[str, ...]) -> list[bytes]:
    """A word and its space for each value of a byte: the table `word_text` draws from."""
    return [f"{words[b % len(words)]} ".encode() for b in range(256)]


def word_text(rng: random.Random, table: list[bytes], count: int) -> bytes:
    """`count` words of `table` (from `words_by_byte`), one random byte each, joined in C:
    a draw per word in Python took 73 us of CPU per KiB, a third of some tests' CPU."""
    return b"".join(map(table.__getitem__, rng.randbytes(count)))


def _byte_table(common: bytes, zeros: int, rare: int) -> bytes:
    """A bytes.translate table that turns uniform random bytes into skewed ones: a zero in
    `zeros` of 256, each of the `common` values 4 times, `rare` other values once."""
    others = bytes(b for b in range(1, 256) if b not in common)[:rare]
    table = bytes(zeros) + bytes(b for b in common for _ in range(4)) + others
    assert len(table) == 256, len(table)
    return table


# Machine code: zeros, REX prefixes, mov/call/jcc opcodes are more common than other bytes.
_CODE = _byte_table(bytes((0xff, 0x48, 0x89, 0x8b, 0xe8, 0x0f, 0x24, 0x83, 0x85, 0x74, 0x75,
                           0x4c, 0x44, 0xc3, 0x01, 0x31)), zeros=48, rare=144)
# Tables (symbols, relocations, offsets) are rows of little-endian fields, mostly zero
# in their high bytes: a row of an ELF symbol table (name, info, other, section, value,
# size), as a mask on random bytes.
_ROW = bytes.fromhex("ff0f0000" "0f" "00" "0f00" "ffff000000000000" "ff00000000000000")


class _Content:
    """The generators of one tree's file contents, all drawn from one seeded Random."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        tail = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4)))
                       for _ in range(700)})
        self.words = list(_WORDS) + tail
        # Zipf-like word frequencies, as in any natural or programming language
        self.cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(self.words))))
        self.symbols = ["_".join(self.word(rng.randint(1, 3))) for _ in range(3000)]
        self.lines = {kind: [self._line(kind) for _ in range(1200)]
                      for kind in ("prose", "python", "c", "conf")}
        # Code that real binaries share (a statically linked runtime): every big binary
        # of a tree carries it byte for byte, long enough for whole chunks.
        self.runtime = self.code(320 << 10)

    def word(self, k: int = 1) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum, k=k)

    def name(self) -> str:
        return "".join(self.rng.choices(_SYLLABLES, k=self.rng.randint(2, 3)))

    def _line(self, kind: str) -> str:
        rng, w = self.rng, self.word(6)
        a, b, c, d = (x.lower() for x in w[:4])
        prose = " ".join(self.word(rng.randint(5, 12)))
        if kind == "prose":
            return prose.capitalize() + rng.choice((".\n", ",\n", " ", ".\n\n"))
        ind = " " * 4 * rng.randint(0, 3)
        if kind == "python":
            return rng.choice((
                f"{ind}def {a}_{b}(self, {c}, {d}=None):\n", f"{ind}{a} = {b}.{c}({d})\n",
                f"{ind}if {a} is not None and {b}.{c}:\n", f"{ind}return {a}_{b}\n",
                f"{ind}# {prose}\n", f'{ind}raise {a.capitalize()}Error("{prose}")\n',
                f"{ind}for {a} in self.{b}:\n", f"from {a}.{b} import {c}\n", "\n"))
        if kind == "c":
            return rng.choice((
                f"extern int {a}_{b}(struct {c} *{d}, size_t len);\n",
                f"#define {a.upper()}_{b.upper()} 0x{rng.randrange(1 << 16):04x}\n",
                f" * {prose}\n", f"typedef struct {a}_{b} {a}_{b}_t;\n",
                f"\t{rng.choice(('int', 'char *', 'uint32_t', 'void *'))} {a}_{b};\n", "\n"))
        return rng.choice((f"{a}_{b} = {c}\n", f"[{a}]\n", f"# {prose}\n",
                           f'{a.upper()}_{b.upper()}="{c} {d}"\n', "\n"))

    def text(self, kind: str, size: int, head: str = "") -> bytes:
        n = size // 30 + 1
        return (head + "".join(self.rng.choices(self.lines[kind], k=n))).encode()[:size]

    def table(self, size: int) -> bytes:
        mask = (_ROW * (size // len(_ROW) + 1))[:size]
        bits = int.from_bytes(self.rng.randbytes(size), "little")
        return (bits & int.from_bytes(mask, "little")).to_bytes(size, "little")

    def code(self, size: int) -> bytes:
        """Machine-code-like bytes: skewed literals, and about 2/3 of the pieces repeated
        from the 32 KiB before (prologues, idioms), as a compiler leaves them. zstd -3
        gets ~2.5x, and zstd -19 (deltas) takes as long, as on Debian's libraries."""
        rng = self.rng
        fresh = rng.randbytes(size).translate(_CODE)
        n = size // 16 + 1  # pieces of 16-334 bytes: enough of them
        lengths, coins, back = rng.randbytes(n), rng.randbytes(n), rng.randbytes(2 * n)
        out, used = bytearray(), 0
        for i in range(n):
            if len(out) >= size:
                break
            k = 16 + lengths[i] * 10 // 8
            distance = max(k, back[2 * i] | (back[2 * i + 1] & 0x7F) << 8)
            if coins[i] < 166 and len(out) >= k:
                at = len(out) - min(distance, len(out))
                out += out[at:at + k]
            else:
                out += fresh[used:used + k]
                used += k
        return bytes(out[:size])

    def strings(self, size: int) -> bytes:
        """A string table: symbol names and messages, NUL-terminated."""
        names = "\0".join(self.rng.choices(self.symbols, k=size // 30 + 1)) + "\0"
        return names.encode()[:size // 2] + self.text("prose", size - size // 2)

    def elf(self, size: int) -> bytes:
        """An ELF shared object's shape: header, tables, code, strings, padding."""
        rng = self.rng
        head = struct.pack("<4s5B7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 3, 0x3E, 1,
                           0x1000 + rng.randrange(1 << 16), 64, 0, 0, 64, 56, 11, 64, 28, 27)
        table = self.table(size // 6)
        strings = self.strings(size // 6)
        code = self.code(max(0, size - len(table) - len(strings)))
        if len(code) >= 2 * len(self.runtime):
            at = rng.randrange(len(code) // 2)
            code = code[:at] + self.runtime + code[at + len(self.runtime):]
        pad = bytes(rng.randrange(4096))  # section alignment
        return (head + table + pad + code + strings)[:size].ljust(size, b"\0")

    def mo(self, size: int) -> bytes:
        """A gettext catalog: header, offset tables, then the messages."""
        head = struct.pack("<7I", 0x950412DE, 0, size // 80, 28, 28 + size // 10, 0, 0)
        table = self.table(size // 5)
        return (head + table + self.text("prose", size)).replace(b"\n", b"\0")[:size]

    def gz(self, size: int) -> bytes:
        """A gzip file (man pages, NEWS.gz): compressed already, so random bytes."""
        return b"\x1f\x8b\x08\0\0\0\0\0\x02\x03" + self.rng.randbytes(max(0, size - 10))


def _size(rng: random.Random, median: int, spread: float, lo: int, hi: int) -> int:
    """A log-normal size around `median`: many small files, a few large ones."""
    return max(lo, min(hi, int(median * math.exp(rng.gauss(0, spread)))))


def os_tree(dest: Path, budget: int, seed: int = 0) -> int:
    """Write an OS-like tree of `budget` bytes of files under dest/usr, plus
    dest/etc/os-release; returns the bytes under usr.

    It imitates a Debian /usr so that the tests measure what they would on a real system
    without depending on what the host has installed (another image would change what they
    test) or walking its /usr: packages, each with its files where Debian puts them
    (usr/lib/x86_64-linux-gnu/lib*.so.* and their symlinks, usr/bin, usr/share/doc/*,
    usr/share/man, usr/share/locale, usr/lib/python3/dist-packages, usr/include,
    usr/share/<package>); sizes log-normal per kind (most files a few KiB, a few of
    several MiB, none over 4 MiB; binaries ~75 % of the bytes); text (docs, scripts,
    configuration, Python, headers) that zstd -3 compresses ~3x (2x when small, 5x when
    large); ELF-shaped binaries (header, symbol tables, code-like bytes, strings,
    padding) that compress 2.5-3x, a few big ones carrying the same blocks of code (so
    chunks dedup a little inside the tree, as real libraries do); already compressed
    man pages. Package docs have a copyright file but no changelog (as in Debian's
    minimal images; changelogs fall under a layer rule of their own).

    Deterministic: the same seed and budget give the same names, bytes, modes and mtimes
    on any machine (one random.Random, no host data). Cheap: bytes come from randbytes,
    translate and joins of pregenerated lines, never per-byte Python loops."""
    rng = random.Random(f"os-tree {seed}")
    gen = _Content(rng)
    max_file = min(OS_MAX_FILE, max(budget // 4, 64 << 10))
    lib = "usr/lib/x86_64-linux-gnu"
    total, libs, names = 0, 0, set[str]()
    while total < budget:
        pkg = gen.name()
        if pkg in names:
            continue
        names.add(pkg)
        files: dict[str, tuple[bytes, int]] = {}  # path: content, mode
        links: dict[str, str] = {}

        def size(median: int, spread: float, lo: int = 64) -> int:
            return _size(rng, median, spread, lo, max_file)
        files[f"usr/share/doc/{pkg}/copyright"] = gen.text(
            "prose", size(9000, 1.0), "Format: https://www.debian.org/doc/packaging-manuals"
            f"/copyright-format/1.0/\nUpstream-Name: {pkg}\n\n"), 0o644
        roll = rng.random()
        if roll < 0.35:  # a library
            major = rng.randint(0, 9)
            so = f"lib{pkg}.so.{major}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
            big = libs % 8 == 0  # one in eight: libc, libstdc++, libcrypto, libpython...
            libs += 1
            files[f"{lib}/{so}"] = gen.elf(size(2 << 20, 0.5) if big
                                           else size(120_000, 1.2, 4096)), 0o644
            links[f"{lib}/lib{pkg}.so.{major}"] = so
        elif roll < 0.6:  # a program (a script now and then) with its manual page
            files[f"usr/bin/{pkg}"] = (gen.elf(size(60_000, 1.3, 4096)) if rng.random() < 0.8
                                       else gen.text("conf", size(3000, 1.0),
                                                     "#!/bin/sh\nset -e\n")), 0o755
            files[f"usr/share/man/man1/{pkg}.1.gz"] = gen.gz(size(3000, 0.7)), 0o644
        elif roll < 0.85:  # a Python package
            where = f"usr/lib/python3/dist-packages/{pkg}"
            files[f"{where}/__init__.py"] = gen.text("python", size(800, 1.5)), 0o644
            for _ in range(rng.randint(1, 12)):
                files[f"{where}/{gen.name()}.py"] = gen.text("python", size(9000, 1.2)), 0o644
        else:  # data and headers
            for _ in range(rng.randint(1, 6)):
                files[f"usr/share/{pkg}/{gen.name()}.conf"] = (
                    gen.text("conf", size(6000, 1.2)), 0o644)
            files[f"usr/include/{pkg}.h"] = gen.text("c", size(12000, 1.0)), 0o644
        if rng.random() < 0.1:  # translated messages
            mo = size(12000, 1.0)
            for lang in rng.sample(_LANGS, rng.randint(2, 6)):
                files[f"usr/share/locale/{lang}/LC_MESSAGES/{pkg}.mo"] = (
                    gen.mo(mo + rng.randrange(mo // 8 + 1)), 0o644)
        when = (OS_T0 + rng.randrange(2 * 365 * 86400)) * 10**9  # the package's build
        for path, (data, mode) in files.items():
            data = data[:budget - total]
            if not data:
                break
            p = dest / path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode)
            os.utime(p, ns=(when, when))
            total += len(data)
        for path, target in links.items():
            if (dest / path).with_name(target).exists():
                (dest / path).symlink_to(target)
                os.utime(dest / path, ns=(when, when), follow_symlinks=False)
    release = dest / "etc/os-release"
    release.parent.mkdir(parents=True, exist_ok=True)
    release.write_text('ID=stratatest\nVERSION_ID="1"\nPRETTY_NAME="Strata test OS 1"\n')
    for p in [release, *(p for p in dest.rglob("*") if p.is_dir() and not p.is_symlink())]:
        p.chmod(0o644 if p == release else 0o755)  # whatever the umask
        os.utime(p, ns=(OS_T0 * 10**9, OS_T0 * 10**9))
    return total
