"""`make demo`: a sample endpoint backed up twice into a store, then browsed and restored.

It runs the real `strata store …` commands, echoing each one, so the transcript doubles
as a tour of the CLI.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

WORDS = ("quarterly budget endpoint layer driver image snapshot restore policy laptop "
         "office travel invoice meeting roadmap customer support network update").split()


def run(*args: str) -> str:
    cmd = ["strata", *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    exe = Path(sys.executable).with_name("strata")
    out = subprocess.run([str(exe), *args], check=True, text=True, stdout=subprocess.PIPE,
                         env={**os.environ, "STRATA_NO_PROGRESS": "1", "COLUMNS": "110"})
    print(out.stdout, end="", flush=True)
    return out.stdout


def document(rng: random.Random, paragraphs: int) -> str:
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
                       for _ in range(paragraphs))


def build_endpoint(root: Path) -> None:
    """A small machine: an OS part copied from this host, identity, and a user's files."""
    rng = random.Random(7)
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("laptop-042\n")
    (root / "etc/machine-id").write_text(f"{rng.getrandbits(128):032x}\n")
    for name in ("os-release", "passwd", "group", "services"):
        src = Path("/etc") / name
        if src.is_file():
            shutil.copy2(src, root / "etc" / name)
    usr = root / "usr/share/doc"
    usr.mkdir(parents=True)
    for pkg in sorted(Path("/usr/share/doc").iterdir())[:60]:
        if pkg.is_dir():
            shutil.copytree(pkg, usr / pkg.name, symlinks=True)
    (root / "usr/bin").mkdir()
    for tool in ("ls", "cp", "tar", "gzip"):
        if Path("/usr/bin", tool).is_file():
            shutil.copy2(Path("/usr/bin", tool), root / "usr/bin" / tool)
    docs = root / "home/alice/Documents"
    docs.mkdir(parents=True)
    for i in range(12):
        (docs / f"report-{i:02d}.txt").write_text(document(rng, 30))
    (docs / "photo.raw").write_bytes(rng.randbytes(3 << 20))  # incompressible
    shutil.copy2(docs / "report-00.txt", root / "home/alice/report-copy.txt")  # a duplicate
    os.link(docs / "report-01.txt", root / "home/alice/report-hardlink.txt")
    os.symlink("Documents/report-02.txt", root / "home/alice/latest-report")
    (root / "home/alice/empty.txt").touch()
    with open(root / "home/alice/disk.img", "wb") as f:  # a sparse file
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"boot sector")
    (root / "var/cache/apt").mkdir(parents=True)
    (root / "var/cache/apt/pkgcache.bin").write_bytes(rng.randbytes(1 << 20))


def change_endpoint(root: Path) -> None:
    rng = random.Random(8)
    docs = root / "home/alice/Documents"
    with open(docs / "report-03.txt", "a") as f:
        f.write("\n\nAddendum: " + document(rng, 2))
    (docs / "report-04.txt").unlink()
    (docs / "notes-new.txt").write_text(document(rng, 10))


def same_tree(a: Path, b: Path) -> list[str]:
    """Differences between two trees (contents, links, modes): empty when identical."""
    problems = []
    for dirpath, dirs, files in os.walk(a):
        for name in dirs + files:
            pa = Path(dirpath, name)
            pb = b / pa.relative_to(a)
            sa, sb = pa.lstat(), pb.lstat() if os.path.lexists(pb) else None
            if sb is None:
                problems.append(f"missing {pb}")
            elif sa.st_mode != sb.st_mode or int(sa.st_mtime) != int(sb.st_mtime):
                problems.append(f"metadata differs: {pb}")
            elif pa.is_symlink():
                if os.readlink(pa) != os.readlink(pb):
                    problems.append(f"link differs: {pb}")
            elif pa.is_file() and pa.read_bytes() != pb.read_bytes():
                problems.append(f"content differs: {pb}")
    return problems


def main() -> None:
    work = Path(os.environ.get("STRATA_DEMO_DIR", "demo-work")).resolve()
    if work.exists():
        shutil.rmtree(work)
    endpoint, store, restored = work / "endpoint", work / "store", work / "restored"
    print(f"Building a sample endpoint in {endpoint} ...")
    build_endpoint(endpoint)
    run("store", "init", str(store))
    run("store", "backup", str(store), str(endpoint), "--tag", "first", "--exclude",
        "/var/cache")
    print("\n# The user edits a report, deletes one and writes a new one.")
    change_endpoint(endpoint)
    run("store", "backup", str(store), str(endpoint), "--tag", "second", "--exclude",
        "/var/cache")
    run("store", "snapshots", str(store))
    run("store", "diff", str(store), *_ids(store)[-2:])
    run("store", "ls", str(store), "latest", "home/alice")
    run("store", "stats", str(store))
    run("store", "restore", str(store), "latest", str(restored))
    problems = same_tree(endpoint / "home", restored / "home") + \
        same_tree(endpoint / "usr", restored / "usr")
    blocks = os.stat(restored / "home/alice/disk.img").st_blocks * 512
    print(f"\nrestored tree identical to the endpoint: {'yes' if not problems else 'NO'}"
          f"; sparse disk.img uses {blocks // 1024} KiB on disk for 64 MiB")
    for p in problems[:10]:
        print("  ", p)
    run("store", "check", str(store), "--read-data")
    print(f"\nEverything is in {work}; try `strata store --help`.")
    if problems:
        sys.exit(1)


def _ids(store: Path) -> list[str]:
    import json

    exe = Path(sys.executable).with_name("strata")
    out = subprocess.run([str(exe), "store", "snapshots", str(store), "--json"], check=True,
                         text=True, stdout=subprocess.PIPE).stdout
    return [s["id"][:8] for s in json.loads(out)]


if __name__ == "__main__":
    main()
