"""The "base layer update" benchmark: what an endpoint holding base image v1 downloads to
reach v2, for Strata and for peers on the same pair of trees.

    .venv/bin/python -m bench.layers [--keep-work]

v1 is a Debian minbase tree and v2 the same plus PACKAGES, both made by debootstrap from
the host's suite and mirror, so the packages they share are the very same files. The pair
is kept in bench/work/layers/<suite>-<arch>-<hash of the package list>/ and reused by later
runs. The peers run on the *layer view* of each tree: what a base layer lays down on an
endpoint under the default Linux layer rules (no /var/cache with debootstrap's .debs, no
/proc, /dev, /tmp, /var/log, identity files or home directories, no do-not-download
paths), so every tool moves the same content. Peers:

- rsync -z: the v1 holder pulls v2 through a remote shell that runs the other end locally,
  so rsync uses its delta algorithm and compression (a local-to-local copy uses neither);
- casync: chunk stores of v1 and v2; the download is v2's index plus the chunks of v2's
  store that v1's does not hold;
- zstd --patch-from: a binary patch from the tarball of v1 to that of v2;
- for scale, v2's size and its tarball compressed with zstd.

Strata (bench/layer_strata.py) runs the real product path on the whole trees: an endpoint
that is a full copy of v1 takes the v2 base layer from a server; its figure is what the
agent counted on the wire, and the endpoint must end equal to v2's layer view.

Prints a JSON summary and saves it to bench/layers-results.json, which bench/report.py
renders as the "Base layer update" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from strata.layers.rules import LayerRules

from . import data, report
from .layer_strata import laid_down, measure_strata
from .tools import ROOT, du

WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "layers-results.json"
LAYOUT_VERSION = 1  # bump when the way the pair is built changes, so old caches are not reused
# What v2 adds to minbase: the usual server extras (about 100 MiB installed with their
# dependencies: OpenSSL, Python 3.11, Perl for git, ...).
PACKAGES = ("openssh-server", "curl", "ca-certificates", "less", "vim-tiny", "python3", "git")
FALLBACK_MIRROR = "http://deb.debian.org/debian"
APT = {"debootstrap": "debootstrap", "rsync": "rsync", "casync": "casync", "zstd": "zstd",
       "tar": "tar"}
ZSTD_LEVEL = 19
ZSTD_THREADS = 2
# Magic numbers of the compressors casync can use for its chunk files.
MAGIC = {b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gzip"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)  # stdout is kept for the JSON summary


# --- the machine: tools, suite, mirror ---------------------------------------------------

def ensure_installed(commands: list[str]) -> list[str]:
    """Install missing commands from Debian's packages; return notes about what happened."""
    missing = [c for c in commands if not shutil.which(c)]
    if not missing:
        return []
    pkgs = [APT[c] for c in missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say(f"installing {' '.join(pkgs)} with apt-get …")
    install = ["apt-get", "install", "-y", *pkgs]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)  # stale or missing package lists
        subprocess.run(install, env=env)
    if still := [c for c in missing if not shutil.which(c)]:
        raise SystemExit(f"could not install {', '.join(APT[c] for c in still)} with apt-get")
    return [f"installed {' '.join(pkgs)} with apt-get"]


def host_suite() -> str:
    """The host's Debian suite (VERSION_CODENAME), which both trees are built from."""
    text = Path("/etc/os-release").read_text()
    m = re.search(r'^VERSION_CODENAME="?([a-z]+)"?$', text, re.MULTILINE)
    if not m or "debian" not in text.lower():
        raise SystemExit("this benchmark builds Debian trees and needs a Debian host "
                         "(no VERSION_CODENAME in /etc/os-release)")
    return m.group(1)


def _apt_sources() -> list[tuple[str, str]]:
    """(URI, suite) of every enabled `deb` source, in apt's order."""
    out: list[tuple[str, str]] = []
    base = Path("/etc/apt")
    one_line = [base / "sources.list", *sorted((base / "sources.list.d").glob("*.list"))]
    for f in one_line:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                out.append((words[1], words[2]))
    for f in sorted((base / "sources.list.d").glob("*.sources")):
        for para in re.split(r"\n\s*\n", f.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", para, re.MULTILINE))
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
                continue
            out += [(uri, suite) for uri in fields.get("URIs", "").split()
                    for suite in fields.get("Suites", "").split()]
    return out


def host_mirror(suite: str) -> str:
    """The mirror apt uses for `suite` itself (not -updates or -security), else deb.debian.org."""
    for uri, s in _apt_sources():
        if s == suite and uri.startswith(("http://", "https://", "file:")):
            return uri.rstrip("/")
    return FALLBACK_MIRROR


def check_mirror(mirror: str, suite: str) -> None:
    """Stop with a clear message if the mirror cannot serve the suite: no data is invented."""
    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read(1)
    except OSError as exc:
        raise SystemExit(f"cannot reach the Debian mirror ({url}: {exc}); debootstrap needs it "
                         f"to build the v1/v2 trees, so the benchmark stops here") from exc


# --- building the pair -------------------------------------------------------------------

def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (debootstrap mounts /proc and /sys in its target)."""
    prefix = str(path.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    points = [p.replace("\\040", " ") for p in points]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def remove_tree(path: Path) -> None:
    """Remove a (possibly half-built) tree, unmounting what a dead debootstrap left first:
    removing through a mounted /proc or /sys would be a disaster."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    if left := _mounts_under(path):
        raise SystemExit(f"refusing to remove {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


def debootstrap(suite: str, mirror: str, target: Path, include: tuple[str, ...],
                cache: Path) -> float:
    """Run debootstrap --variant=minbase into `target`; return the seconds it took.

    Both trees share one --cache-dir, so v2 installs the very .debs v1 did.
    """
    cmd = ["debootstrap", "--variant=minbase", f"--cache-dir={cache}"]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [suite, str(target), mirror]
    log = target.with_suffix(".log")
    say(f"  $ {' '.join(cmd)}   (log: {log})")
    t0 = time.monotonic()
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    seconds = time.monotonic() - t0
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        inner = target / "debootstrap" / "debootstrap.log"
        if inner.is_file():
            tail += ["--- debootstrap.log:", *inner.read_text(errors="replace").splitlines()[-15:]]
        remove_tree(target)
        raise SystemExit(f"debootstrap failed (exit {rc}) building {target.name}; the benchmark "
                         "stops here rather than use other data:\n  " + "\n  ".join(tail))
    return seconds


def tree_stats(root: Path) -> dict:
    """Counts and apparent bytes of what is in a tree (hardlinked files counted once)."""
    st = {"files": 0, "dirs": 0, "symlinks": 0, "other": 0, "bytes": 0, "hardlinked": 0}
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        st["dirs"] += len(dirnames)
        for name in dirnames + filenames:
            s = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(s.st_mode):
                if s.st_nlink > 1 and (s.st_dev, s.st_ino) in seen:
                    st["hardlinked"] += 1
                    continue
                seen.add((s.st_dev, s.st_ino))
                st["files"] += 1
                st["bytes"] += s.st_size
            elif stat.S_ISLNK(s.st_mode):
                st["symlinks"] += 1
            elif not stat.S_ISDIR(s.st_mode):
                st["other"] += 1
    return st


def dpkg_versions(root: Path) -> dict[str, str]:
    """Package -> version of what dpkg has installed in a tree."""
    status = (root / "var/lib/dpkg/status").read_text()
    out = {}
    for para in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Status): (.*)$", para, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed"):
            out[fields["Package"]] = fields["Version"]
    return out


def describe(suite: str, mirror: str, v1: Path, v2: Path) -> dict:
    """What the pair is: its origin, sizes, and what v2 adds (at the same versions as v1)."""
    p1, p2 = dpkg_versions(v1), dpkg_versions(v2)
    return {
        "layout": LAYOUT_VERSION, "suite": suite, "arch": _arch(), "mirror": mirror,
        "variant": "minbase", "include": list(PACKAGES),
        "v1": {**tree_stats(v1), "packages": len(p1)},
        "v2": {**tree_stats(v2), "packages": len(p2)},
        "added_packages": sorted(p2.keys() - p1.keys()),
        "removed_packages": sorted(p1.keys() - p2.keys()),
        # should be empty: the shared packages must be byte-identical for a fair comparison
        "version_mismatches": sorted(p for p in p1.keys() & p2.keys() if p1[p] != p2[p]),
    }


def _arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip()


def build_pair(work: Path) -> tuple[Path, Path, dict]:
    """Build (or reuse) v1 = Debian minbase and v2 = minbase + PACKAGES under work/layers.

    Returns the v1 and v2 directories and a description (suite, packages, file counts and
    sizes, build seconds, and whether the pair was reused).
    """
    if os.geteuid() != 0:
        raise SystemExit("building the trees needs root (debootstrap)")
    notes = ensure_installed(["debootstrap"])
    suite = host_suite()
    key = hashlib.sha256(json.dumps([LAYOUT_VERSION, sorted(PACKAGES)]).encode()).hexdigest()
    home = work / "layers" / f"{suite}-{_arch()}-{key[:10]}"
    v1, v2, info_file = home / "v1", home / "v2", home / "info.json"
    if info_file.is_file():
        return v1, v2, {**json.loads(info_file.read_text()), "reused": True, "notes": notes}
    mirror = host_mirror(suite)
    check_mirror(mirror, suite)
    remove_tree(home)
    home.mkdir(parents=True)
    cache = home / "debs"
    cache.mkdir()
    say(f"building v1 (minbase) and v2 (+ {', '.join(PACKAGES)}) from {mirror} {suite}")
    t1 = debootstrap(suite, mirror, v1, (), cache)
    t2 = debootstrap(suite, mirror, v2, PACKAGES, cache)
    shutil.rmtree(cache)
    info = {**describe(suite, mirror, v1, v2),
            "build_seconds": {"v1": round(t1, 1), "v2": round(t2, 1)}}
    info_file.write_text(json.dumps(info, indent=2) + "\n")  # written last: the pair is whole
    return v1, v2, {**info, "reused": False, "notes": notes}


# --- the peers ---------------------------------------------------------------------------

def timed(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` (check=True, output captured as text); return it and its wall seconds."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)
    return proc, time.monotonic() - t0


def _version(cmd: list[str], pattern: str, name: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(pattern, out.stdout + out.stderr)
    return f"{name} {m.group(1)}" if m else name


def _stat_number(stats: str, label: str) -> int:
    m = re.search(rf"^{re.escape(label)}: ([\d,.]+)", stats, re.MULTILINE)
    if not m:
        raise RuntimeError(f"rsync --stats printed no {label!r}:\n{stats}")
    return int(re.sub(r"[,.]", "", m.group(1)))


def measure_rsync(v1: Path, v2: Path, scratch: Path) -> dict:
    """Bytes a copy of v1 receives when it pulls v2 with rsync -z.

    Both ends run here, but connected by a pipe through --rsh as if remote: a local-to-local
    rsync would switch to --whole-file (no delta algorithm) and skip compression.
    """
    endpoint = scratch / "rsync-endpoint"
    subprocess.run(["cp", "-a", f"{v1}/.", str(endpoint)], check=True)  # keeps mtimes, links
    rsh = scratch / "rsh"
    # rsync calls `RSH HOST rsync --server ...`: drop HOST and run the server side directly
    rsh.write_text('#!/bin/sh\nshift\nexec "$@"\n')
    rsh.chmod(0o755)
    cmd = ["rsync", "-aH", "-z", "--delete", "--stats", "--debug=nstr", "-e", str(rsh),
           f"localhost:{v2}/", f"{endpoint}/"]
    proc, seconds = timed(cmd)
    out = proc.stdout + proc.stderr
    received = _stat_number(out, "Total bytes received")
    sent = _stat_number(out, "Total bytes sent")
    literal, matched = _stat_number(out, "Literal data"), _stat_number(out, "Matched data")
    compress = re.search(r"negotiated compress: (\S+)", out, re.IGNORECASE)
    checksum = re.search(r"negotiated checksum: (\S+)", out, re.IGNORECASE)
    diffs = data.compare_trees(data.tree_digest(v2), data.tree_digest(endpoint))
    if diffs:
        raise RuntimeError("rsync's copy differs from v2: " + "; ".join(diffs[:5]))
    return {
        "tool": "rsync -z", "version": _version(["rsync", "--version"], r"version (\S+)", "rsync"),
        "bytes": received, "seconds": round(seconds, 1),
        "detail": f"pull over --rsh (a pipe to a local rsync --server): `{' '.join(cmd[:7])}`; "
                  f"received {received} B, sent {sent} B (block checksums, file list); "
                  f"literal data {literal} B, matched data {matched} B (delta algorithm on); "
                  f"compression {compress.group(1) if compress else '?'}, checksum "
                  f"{checksum.group(1) if checksum else '?'}; result verified equal to v2",
        "sent_bytes": sent, "literal_bytes": literal, "matched_bytes": matched,
    }


def _chunks(store: Path) -> dict[str, int]:
    """Chunk id -> size of its (compressed) file in a casync store."""
    return {p.name.split(".", 1)[0]: p.stat().st_size for p in store.rglob("*.cacnk")}


def _compression(store: Path) -> str:
    """Which compressor casync used, from the magic number of one of its chunk files."""
    sample = next(store.rglob("*.cacnk"), None)
    head = sample.read_bytes()[:6] if sample else b""
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), "unknown")


def measure_casync(v1: Path, v2: Path, scratch: Path) -> dict:
    """Bytes an endpoint holding v1's chunks downloads for v2: v2's index plus the chunk
    files of v2's store missing from v1's (what `casync extract --seed=v1` would fetch)."""
    timings = {}
    for name, tree in (("v1", v1), ("v2", v2)):
        cmd = ["casync", "make", f"--store={scratch / name}.castr",
               str(scratch / f"{name}.caidx"), str(tree)]
        timings[name] = timed(cmd)[1]
    old, new = _chunks(scratch / "v1.castr"), _chunks(scratch / "v2.castr")
    missing = new.keys() - old.keys()
    chunk_bytes = sum(new[c] for c in missing)
    index_bytes = (scratch / "v2.caidx").stat().st_size
    return {
        "tool": "casync", "version": _version(["casync", "--version"], r"(\d[\w.]*)", "casync"),
        "bytes": chunk_bytes + index_bytes, "seconds": round(timings["v2"], 1),
        "detail": f"defaults (64 KiB average chunks, {_compression(scratch / 'v2.castr')} "
                  f"compression, chosen by casync itself); {len(missing)} of v2's {len(new)} "
                  f"chunks are not in v1's store: {chunk_bytes} B of chunk files + "
                  f"{index_bytes} B v2.caidx; v2's whole store is {sum(new.values())} B; "
                  f"seconds = `casync make` of v2 (v1 took {timings['v1']:.1f} s)",
        "chunk_bytes": chunk_bytes, "index_bytes": index_bytes,
        "compression": _compression(scratch / "v2.castr"),
    }


def make_tar(tree: Path, out: Path) -> None:
    """A deterministic tarball of `tree` (sorted names, numeric owners)."""
    subprocess.run(["tar", "--sort=name", "--numeric-owner", "-C", str(tree), "-cf", str(out),
                    "."], check=True)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def measure_zstd_patch(v1_tar: Path, v2_tar: Path, scratch: Path) -> dict:
    """Size of `zstd --patch-from=v1.tar v2.tar`, checked by applying it."""
    patch, applied = scratch / "v1-v2.patch.zst", scratch / "applied.tar"
    # --long=31 lets the match window cover all of v1.tar (zstd enables long-distance
    # matching for --patch-from anyway); decompression needs the same window allowed.
    cmd = ["zstd", "-q", f"-{ZSTD_LEVEL}", f"-T{ZSTD_THREADS}", "--long=31",
           f"--patch-from={v1_tar}", str(v2_tar), "-o", str(patch)]
    _, seconds = timed(cmd)
    _, apply_s = timed(["zstd", "-q", "-d", "--long=31", f"--patch-from={v1_tar}", str(patch),
                        "-o", str(applied)])
    if _digest(applied) != _digest(v2_tar):
        raise RuntimeError("zstd --patch-from: applying the patch did not give v2.tar")
    applied.unlink()
    size = patch.stat().st_size
    return {
        "tool": "zstd --patch-from",
        "version": _version(["zstd", "--version"], r"v(\d[\w.]*)", "zstd"),
        "bytes": size, "seconds": round(seconds, 1),
        "detail": f"`{' '.join(cmd[:5])} --patch-from=v1.tar v2.tar` between "
                  f"`tar --sort=name --numeric-owner` tarballs; applying it took {apply_s:.1f} s "
                  "and gave v2.tar exactly",
    }


def measure_plain(v2: Path, v2_tar: Path, scratch: Path, cache: Path) -> list[dict]:
    """For scale: v2 itself, and v2's tarball compressed with zstd (a full download).

    The compressed size depends only on the pair and zstd's version, and takes two minutes
    at -19 on 2 CPUs, so it is computed once per pair and zstd version and kept in `cache`.
    """
    version = _version(["zstd", "--version"], r"v(\d[\w.]*)", "zstd")
    cmd = ["zstd", "-q", f"-{ZSTD_LEVEL}", f"-T{ZSTD_THREADS}", "v2.tar", "-o", "v2.tar.zst"]
    name = re.sub(r"[^\w.-]", "_", version)
    key = cache / f"plain-{name}-{ZSTD_LEVEL}.json"
    tar_digest = _digest(v2_tar)
    known = json.loads(key.read_text()) if key.is_file() else {}
    if known.get("tar_sha256") == tar_digest:
        size, seconds, when = known["bytes"], known["seconds"], "kept from the first run"
    else:
        out = scratch / "v2.tar.zst"
        _, seconds = timed([*cmd[:-3], str(v2_tar), "-o", str(out)])
        size, seconds, when = out.stat().st_size, round(seconds, 1), "measured in this run"
        key.write_text(json.dumps({"tar_sha256": tar_digest, "bytes": size,
                                   "seconds": seconds}) + "\n")
    return [
        {"tool": "v2 as is", "version": "", "bytes": du(v2), "seconds": 0.0,
         "detail": f"apparent size of v2's files; its tarball is {v2_tar.stat().st_size} B"},
        {"tool": f"tar | zstd -{ZSTD_LEVEL}", "version": version, "bytes": size,
         "seconds": seconds,
         "detail": f"the whole of v2 compressed: `{' '.join(cmd)}` ({when}: it depends "
                   "only on v2's tarball, checked by its SHA-256, and zstd's version)"},
    ]


def measure_peers(v1: Path, v2: Path, work: Path, cache: Path, keep: bool = False) -> list[dict]:
    """Run every peer on the pair; one dict per peer (tool, version, bytes, seconds, detail).

    Scratch files go to work/layers-peers, removed afterwards unless `keep`; `cache` keeps
    what depends on the pair alone (see measure_plain).
    """
    ensure_installed(["rsync", "casync", "zstd", "tar"])
    scratch = work / "layers-peers"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        say("rsync …")
        results = [measure_rsync(v1, v2, scratch)]
        say(f"  {results[-1]['bytes']} B in {results[-1]['seconds']} s\ncasync …")
        results.append(measure_casync(v1, v2, scratch))
        say(f"  {results[-1]['bytes']} B in {results[-1]['seconds']} s\ntarballs …")
        v1_tar, v2_tar = scratch / "v1.tar", scratch / "v2.tar"
        make_tar(v1, v1_tar)
        make_tar(v2, v2_tar)
        say("zstd --patch-from …")
        results.append(measure_zstd_patch(v1_tar, v2_tar, scratch))
        say(f"  {results[-1]['bytes']} B in {results[-1]['seconds']} s\nzstd of v2 …")
        results += measure_plain(v2, v2_tar, scratch, cache)
        say(f"  {results[-1]['bytes']} B in {results[-1]['seconds']} s")
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return results


def layer_view(tree: Path, dest: Path) -> dict:
    """A hardlinked copy of `tree` holding only what a base layer lays down on an endpoint
    (bench.layer_strata.laid_down under the default Linux rules); returns what was left out.

    The hardlinks share inodes with the cached pair, so nothing may write into a view: the
    peers only read it (rsync writes into its own full copy of v1's view).
    """
    rules = LayerRules.default("linux")
    subprocess.run(["cp", "-al", str(tree), str(dest)], check=True)
    left_out = {"paths": 0, "bytes": 0}
    base = os.fsencode(dest)
    pruned: set[bytes] = set()  # directories something was removed from
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in [*dirnames, *filenames]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            full = os.path.join(dirpath, name)
            is_dir = name in dirnames and not os.path.islink(full)
            if laid_down(rules, rel, is_dir):
                continue
            pruned.add(rel_dir)
            if is_dir:
                left_out["paths"] += 1 + sum(len(d) + len(f) for _, d, f in os.walk(full))
                left_out["bytes"] += du(Path(os.fsdecode(full)))
                shutil.rmtree(full)
                dirnames.remove(name)
            else:
                left_out["paths"] += 1
                left_out["bytes"] += os.lstat(full).st_size
                os.unlink(full)
    for rel_dir in pruned:  # as in the tree, so the view's tarball is the same every run
        st = os.lstat(os.path.join(os.fsencode(tree), rel_dir))
        os.utime(os.path.join(base, rel_dir), ns=(st.st_atime_ns, st.st_mtime_ns),
                 follow_symlinks=False)
    return left_out


def verdict(results: list[dict]) -> dict:
    """The issue's target: Strata sends fewer bytes than both rsync -z and casync."""
    by = {r["tool"]: r for r in results if "bytes" in r}
    s, peers = by.get("strata"), [by.get("rsync -z"), by.get("casync")]
    if s is None or None in peers:
        return {"goal": "fewer bytes than rsync -z and casync", "met": None,
                "measured": "n/a (a tool did not run)"}
    met = all(s["bytes"] < p["bytes"] for p in peers)  # type: ignore[index]
    return {"goal": "fewer bytes than rsync -z and casync", "met": met,
            "measured": "; ".join(f"{s['bytes']} B vs {p['bytes']} B for {p['tool']} "  # type: ignore[index]
                                  f"({s['bytes'] / p['bytes']:.2f}x)" for p in peers)}


def compare(v1: Path, v2: Path, work: Path, cache: Path, keep: bool = False,
            name: str = "debian") -> tuple[dict, list[dict], dict]:
    """Every tool on the pair: the peers on the layer views, Strata on the whole trees.
    Returns the views' stats, the results (Strata first) and the seconds each part took."""
    views = work / "layers-views"
    remove_tree(views)
    views.mkdir(parents=True)
    try:
        t1 = time.monotonic()
        left_out = {n: layer_view(tree, views / n) for n, tree in (("v1", v1), ("v2", v2))}
        view_stats = {n: {**tree_stats(views / n), "left_out": left_out[n]}
                      for n in ("v1", "v2")}
        results = measure_peers(views / "v1", views / "v2", work, cache, keep=keep)
        peers_s = time.monotonic() - t1
    finally:
        if not keep:
            shutil.rmtree(views, ignore_errors=True)
    say("strata …")
    t2 = time.monotonic()
    strata = measure_strata(v1, v2, work, name)
    strata_s = time.monotonic() - t2
    say(f"  {strata['bytes']} B in {strata['seconds']} s")
    if not keep:
        shutil.rmtree(work / "strata", ignore_errors=True)
    results.insert(0, strata)
    return view_stats, results, {"peers": round(peers_s, 1), "strata": round(strata_s, 1)}


def run(work: Path = WORK, keep: bool = False, command: str = "") -> dict:
    """Build or reuse the pair, measure every tool on it, save RESULTS; return the summary."""
    t0 = time.monotonic()
    v1, v2, pair = build_pair(work)
    pair_s = time.monotonic() - t0
    say(f"pair {'reused' if pair['reused'] else 'built'} in {pair_s:.1f} s: "
        f"v1 {pair['v1']['bytes']} B, v2 {pair['v2']['bytes']} B")
    view_stats, results, seconds = compare(v1, v2, work, v1.parent, keep=keep)
    summary = {
        "command": command or "python -m bench.layers",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": report.machine(),
        "pair": {k: v for k, v in pair.items() if k not in ("notes",)},
        "views": view_stats, "results": results, "target": verdict(results),
        "seconds": {"pair": round(pair_s, 1), **seconds,
                    "total": round(time.monotonic() - t0, 1)},
        "notes": pair.get("notes", []),
    }
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__.split("\n")[0])
    p.add_argument("--keep-work", action="store_true",
                   help="keep the peers' scratch files (tarballs, stores), the layer views "
                        "and Strata's server and endpoint in bench/work")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.layers" + (" --keep-work" if args.keep_work else "")
    summary = run(WORK, keep=args.keep_work, command=command)
    print(json.dumps(summary, indent=2))
    report.update_sections(ROOT)
    say(f"wrote {RESULTS} and its section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
