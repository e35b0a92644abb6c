"""What a clone of a known endpoint puts on the wire when it centralizes.

`python -m bench.clone` (`--usr-bytes`, `--docs-bytes` size the corpus, as in
`bench.run`): a server on loopback; endpoint 1 (the corpus) enrolls and centralizes.
Then its disk is cloned, the agent's state directory with it, and the clone enrolls
again with `strata agent enroll --force` (a new endpoint that holds what endpoint 1 did:
docs/security.md) and centralizes: every file is read again (new inodes and ctimes, and
`--force` starts a new CVD), nothing needs uploading, and what crosses the wire is the
protocol's own cost: chunk queries and the snapshot manifest. Last, endpoint 1 centralizes
again after 1% of its files changed (its incremental cost).

Reports each centralization's bytes sent against its tree (target for the clone: at most
0.2%), with the manifest's size as stored and as sent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from bench.checkins import start_server
from bench.data import mutate, prepare
from bench.fleet import strata, tree_bytes
from bench.run import size

WORK = Path("bench/work")
TARGET = 0.002  # the clone's bytes sent, as a share of its tree


def _copy_tree(src: Path, dst: Path) -> None:
    """A disk clone as a file copy: new inodes and ctimes, same contents and metadata."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def _row(name: str, out: dict, tree: int) -> dict:
    r = out["result"]
    return {"endpoint": name, "tree_bytes": tree, "files": r["files"],
            "bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"],
            "bytes_uploaded": r["bytes_uploaded"], "chunks_proven": r["chunks_proven"],
            "files_read": r["files_changed"], "bytes_read": r["bytes_read"],
            "share": r["bytes_sent"] / tree, "seconds": r["seconds"]}


def measure(corpus: Path, work: Path) -> dict:
    for d in ("server", "ep1", "state1", "clone", "state-clone"):
        shutil.rmtree(work / d, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "ep1").mkdir()
    _copy_tree(corpus, work / "ep1/src")  # mutate() changes DIR/src
    proc, url = start_server(work / "server")
    try:
        admin = work / "server/admin.token"

        def token() -> str:
            return strata("token", "create", "--uses", "1", "--server", url,
                          "--admin-token-file", str(admin))["token"]

        ep1, state1 = work / "ep1/src", work / "state1"
        strata("agent", "enroll", "--server", url, "--token", token(), "--root", str(ep1),
               "--state", str(state1))
        first = strata("agent", "backup", "--state", str(state1))
        tree = tree_bytes(ep1)
        rows = [_row("endpoint 1 (first)", first, tree)]

        clone, state_c = work / "clone", work / "state-clone"
        _copy_tree(ep1, clone)
        shutil.copytree(state1, state_c)
        strata("agent", "enroll", "--force", "--server", url, "--token", token(),
               "--root", str(clone), "--state", str(state_c))
        rows.append(_row("clone of endpoint 1", strata("agent", "backup", "--state",
                                                      str(state_c)), tree_bytes(clone)))

        changed = mutate(work / "ep1")  # a copy of the corpus: no need to undo it
        rows.append(_row("endpoint 1, 1% changed", strata(
            "agent", "backup", "--state", str(state1)), tree_bytes(ep1)))
        manifest = (state1 / "parent.manifest").stat().st_size
    finally:
        proc.kill()
        proc.wait()
    return {"rows": rows, "manifest_bytes": manifest, "changed_files": changed["files_changed"],
            "target": TARGET, "met": rows[1]["share"] <= TARGET}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clone",
                                description=__doc__.split("\n")[0])
    p.add_argument("--usr-bytes", type=size, default=size("300M"))
    p.add_argument("--docs-bytes", type=size, default=size("100M"))
    p.add_argument("--work", type=Path, default=WORK)
    args = p.parse_args(argv)
    info = prepare(args.work, args.usr_bytes, args.docs_bytes)
    started = time.monotonic()
    out = measure(args.work / "data/src", args.work / "clone")
    out["corpus"] = {k: info[k] for k in ("usr", "docs") if k in info}
    out["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(out, indent=2))
    for r in out["rows"]:
        print(f"{r['endpoint']:<26} tree {r['tree_bytes']:>13,} B  sent {r['bytes_sent']:>11,} B"
              f"  {r['share']:.3%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
