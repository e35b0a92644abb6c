"""The benchmark's data set: a capped copy of /usr plus generated user documents.

Everything is deterministic for given parameters (and a given /usr), so a set left in
bench/work/data is reused when its recorded parameters match. The 1% mutation is made in
place and journalled first; `undo_mutation` puts the original bytes and times back, after
each run and at the start of the next one should a run have died half-way.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import shutil
import stat
import time
from pathlib import Path

import blake3

PARAMS_VERSION = 1
SEED = 20251122
BASE_MTIME = 1_600_000_000  # generated files get mtimes in the three years after this

FOLDERS = ["Documents/Projects", "Documents/Reports", "Documents/Letters", "Spreadsheets",
           "Downloads", "Archive/2019", "Archive/2020", "Archive/2021", "Pictures/raw",
           "Desktop", "Notes"]
# share of the documents budget per kind; what is left over becomes duplicated files
MIX = {"text": 0.55, "csv": 0.20, "binary": 0.20}
SIZES = {"text": (4 << 10, 4 << 20), "csv": (64 << 10, 8 << 20), "binary": (32 << 10, 16 << 20)}


def prepare(work: Path, usr_bytes: int, docs_bytes: int) -> dict:
    """Make (or reuse) bench/work/data/src and return its description."""
    data = work / "data"
    params_file = data / "params.json"
    want = {"version": PARAMS_VERSION, "usr_bytes": usr_bytes, "docs_bytes": docs_bytes,
            "seed": SEED}
    undo_mutation(data)
    if params_file.exists():
        info = json.loads(params_file.read_text())
        if info.get("params") == want:
            info["reused"] = True
            return info
    shutil.rmtree(data, ignore_errors=True)
    src = data / "src"
    src.mkdir(parents=True)
    t0 = time.monotonic()
    info = {"params": want, "usr": copy_usr(Path("/usr"), src / "usr", usr_bytes),
            "docs": make_docs(src / "docs", docs_bytes, random.Random(SEED))}
    info["prepare_seconds"] = round(time.monotonic() - t0, 1)
    params_file.write_text(json.dumps(info, indent=2) + "\n")  # written last: set is complete
    info["reused"] = False
    return info


def copy_usr(root: Path, dest: Path, budget: int) -> dict:
    """Copy `root` in sorted depth-first order until `budget` bytes of files are copied.

    Keeps symlinks as symlinks, modes and mtimes; skips sockets, devices and fifos.
    """
    st = {"files": 0, "symlinks": 0, "dirs": 0, "bytes": 0, "skipped": 0, "last": ""}
    dirs: list[tuple[Path, Path]] = []

    def walk(src: Path, dst: Path) -> bool:  # False once the budget is spent
        dst.mkdir()
        dirs.append((src, dst))
        st["dirs"] += 1
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if st["bytes"] >= budget:
                return False
            target = dst / e.name
            try:
                if e.is_symlink():
                    os.symlink(os.readlink(e.path), target)
                    lst = e.stat(follow_symlinks=False)
                    os.utime(target, ns=(lst.st_atime_ns, lst.st_mtime_ns),
                             follow_symlinks=False)
                    st["symlinks"] += 1
                elif e.is_dir(follow_symlinks=False):
                    if not walk(Path(e.path), target):
                        return False
                    continue
                elif e.is_file(follow_symlinks=False):
                    shutil.copy2(e.path, target, follow_symlinks=False)
                    st["files"] += 1
                    st["bytes"] += e.stat(follow_symlinks=False).st_size
                else:
                    st["skipped"] += 1
                    continue
            except OSError:
                st["skipped"] += 1
                continue
            st["last"] = str(Path(e.path))
        return True

    walk(root, dest)
    for src, dst in reversed(dirs):  # after their contents, or copying would bump the mtimes
        shutil.copystat(src, dst, follow_symlinks=False)
    return st


def vocabulary() -> tuple[list[str], str]:
    """Words for the text documents: /usr/share/dict, else the prose in /usr/share/doc."""
    for dict_file in (Path("/usr/share/dict/words"), Path("/usr/share/dict/american-english")):
        if dict_file.is_file():
            words = sorted({w.strip() for w in dict_file.read_text(errors="replace").split()
                            if w.strip().isalpha()})
            if len(words) > 1000:
                return words, str(dict_file)
    words: set[str] = set()
    read = 0
    for dirpath, dirnames, filenames in os.walk("/usr/share/doc"):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                raw = Path(path).read_bytes()
                if name.endswith(".gz"):
                    raw = gzip.decompress(raw)
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            read += len(raw)
            words.update(re.findall(r"[A-Za-z][a-z]{2,13}", raw.decode("latin-1")))
            if read > 32 << 20:
                return sorted(words), "/usr/share/doc"
    if len(words) < 1000:  # a bare machine: invent some words
        rng = random.Random(SEED)
        words.update("".join(rng.choices("etaoinshrdlucmfwyp", k=rng.randint(3, 10)))
                     for _ in range(5000))
        return sorted(words), "generated"
    return sorted(words), "/usr/share/doc"


def _text(rng: random.Random, vocab: list[str], size: int) -> bytes:
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choices(vocab, k=rng.randint(6, 16))).capitalize()
        line += ".\n\n" if rng.random() < 0.15 else ".\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _csv(rng: random.Random, vocab: list[str], size: int) -> bytes:
    out = ["id,date,customer,product,quantity,unit_price,total\n"]
    n, i = len(out[0]), 0
    while n < size:
        i += 1
        q, p = rng.randint(1, 500), rng.randint(50, 99999) / 100
        row = (f"{i},2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
               f"{rng.choice(vocab).title()} {rng.choice(vocab).title()},{rng.choice(vocab)},"
               f"{q},{p:.2f},{q * p:.2f}\n")
        out.append(row)
        n += len(row)
    return "".join(out).encode()[:size]


def make_docs(dest: Path, budget: int, rng: random.Random) -> dict:
    """Generate ~`budget` bytes of user documents under `dest`."""
    vocab, vocab_source = vocabulary()
    made: dict[str, list[Path]] = {k: [] for k in MIX}
    sizes = {k: 0 for k in MIX}
    ext = {"text": ".txt", "csv": ".csv"}
    i = 0
    while sum(sizes.values()) < budget * sum(MIX.values()):
        short = [k for k in MIX if sizes[k] < budget * MIX[k]]
        kind = rng.choices(short, weights=[MIX[k] for k in short])[0]
        lo, hi = SIZES[kind]
        size = min(int(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
                   max(1, int(budget * MIX[kind]) - sizes[kind]))
        if kind == "binary":
            body = rng.randbytes(size)
        else:
            body = (_text if kind == "text" else _csv)(rng, vocab, size)
        name = f"{rng.choice(vocab).lower()}-{rng.choice(vocab).lower()}-{i:04d}"
        name += ext.get(kind) or rng.choice([".jpg", ".zip", ".bin"])
        path = dest / rng.choice(FOLDERS) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        made[kind].append(path)
        sizes[kind] += size
        i += 1
    # a few duplicates of existing files in other folders
    dup_files = dup_bytes = 0
    pool = sorted(p for paths in made.values() for p in paths)
    while dup_bytes < budget - sum(sizes.values()) and pool:
        orig = rng.choice(pool)
        copy = dest / rng.choice(FOLDERS) / "copies" / orig.name
        if copy.exists() or orig.stat().st_size > budget - sum(sizes.values()) - dup_bytes:
            pool.remove(orig)
            continue
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(orig, copy)
        dup_files += 1
        dup_bytes += copy.stat().st_size
    # deterministic times: files, then directories bottom-up
    for dirpath, _, filenames in sorted(os.walk(dest), reverse=True):
        for name in sorted(filenames):
            t = (BASE_MTIME + rng.randrange(3 * 365 * 86400)) * 10**9
            os.utime(os.path.join(dirpath, name), ns=(t, t))
        os.utime(dirpath, ns=(BASE_MTIME * 10**9,) * 2)
    return {"vocabulary": f"{len(vocab)} words from {vocab_source}",
            **{f"{k}_files": len(v) for k, v in made.items()},
            **{f"{k}_bytes": sizes[k] for k in MIX},
            "duplicate_files": dup_files, "duplicate_bytes": dup_bytes,
            "bytes": sum(sizes.values()) + dup_bytes}


def regular_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                out.append(os.path.relpath(path, root))
    return out


def mutate(data: Path, fraction: float = 0.01) -> dict:
    """Change `fraction` of the regular files under data/src in place, journalling first.

    Three in four get 4 KiB overwritten in the middle (the whole file if smaller), the rest
    get 1 KiB appended.
    """
    src = data / "src"
    rng = random.Random(SEED + 1)
    files = regular_files(src)
    picks = sorted(rng.sample(files, max(1, round(len(files) * fraction))))
    plan, journal = [], []
    for i, rel in enumerate(picks):
        path = src / rel
        st = os.lstat(path)
        if i % 4 == 3 or st.st_size == 0:
            offset, new = st.st_size, rng.randbytes(1024)
            old = b""
        else:
            n = min(4096, st.st_size)
            offset = (st.st_size - n) // 2
            with open(path, "rb") as f:
                f.seek(offset)
                old = f.read(n)
            new = rng.randbytes(n)
        plan.append((path, offset, new))
        journal.append({"path": rel, "size": st.st_size, "offset": offset, "old": old.hex(),
                        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns})
    (data / "mutation.json").write_text(json.dumps(journal))
    for path, offset, new in plan:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(new)
    return {"files_total": len(files), "files_changed": len(picks),
            "bytes_written": sum(len(new) for _, _, new in plan)}


def undo_mutation(data: Path) -> bool:
    journal_file = data / "mutation.json"
    if not journal_file.exists():
        return False
    for j in json.loads(journal_file.read_text()):
        path = data / "src" / j["path"]
        with open(path, "r+b") as f:
            f.seek(j["offset"])
            f.write(bytes.fromhex(j["old"]))
            f.truncate(j["size"])
        os.utime(path, ns=(j["atime_ns"], j["mtime_ns"]))
    journal_file.unlink()
    return True


def tree_digest(root: Path) -> dict[str, tuple]:
    """Path -> (kind, size, permission bits, content hash or link target), for comparison."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                h = blake3.blake3()
                with open(path, "rb") as f:
                    while block := f.read(4 << 20):
                        h.update(block)
                out[rel] = ("file", st.st_size, oct(stat.S_IMODE(st.st_mode)), h.hexdigest())
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def compare_trees(expected: dict[str, tuple], got: dict[str, tuple]) -> list[str]:
    """Human-readable differences between two tree digests (empty when equal)."""
    diffs = [f"missing: {p}" for p in sorted(expected.keys() - got.keys())]
    diffs += [f"extra: {p}" for p in sorted(got.keys() - expected.keys())]
    diffs += [f"differs: {p}: {expected[p]} != {got[p]}"
              for p in sorted(expected.keys() & got.keys()) if expected[p] != got[p]]
    return diffs
