"""The OS migration benchmark: what an endpoint on the previous Debian release's minbase
downloads to move to the host release's minbase (a base-layer swap in which almost every
binary changes a little), for Strata and its peers on the same trees, and what the
server spends per migrated endpoint.

    .venv/bin/python -m bench.migration [--keep-work]

The new tree is the base-layer update benchmark's v1 (bench/layers.py: the host's suite,
`debootstrap --variant=minbase`); the old one is the same for the release before,
built once into bench/work/migration/<suite>-<arch>/ and reused. The peers are those of
the update benchmark (rsync -z, casync, zstd -19 --long --patch-from of the old tarball to
the new one); Strata runs the real product path on two endpoints (the second shows the
cost per endpoint once the server's caches hold the first one's deltas and streams).

Saves bench/migration-results.json, which bench/report.py renders as "OS migration".
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import layers, report

RESULTS = layers.ROOT / "bench" / "migration-results.json"
PREVIOUS = {"bookworm": "bullseye", "trixie": "bookworm", "forky": "trixie"}
TARGET = 1.05  # the issue's: Strata at or below 1.05x zstd --patch-from


def build_old(work: Path, suite: str) -> tuple[Path, dict]:
    """The previous release's minbase (built once, then reused) and its description."""
    home = work / "migration" / f"{suite}-{layers._arch()}"
    tree, info_file = home / "v1", home / "info.json"
    if info_file.is_file():
        return tree, {**json.loads(info_file.read_text()), "reused": True}
    mirror = layers.host_mirror(layers.host_suite())  # the host's mirror serves both
    layers.check_mirror(mirror, suite)
    layers.remove_tree(home)
    home.mkdir(parents=True)
    cache = home / "debs"
    cache.mkdir()
    layers.say(f"building {suite} minbase from {mirror}")
    seconds = layers.debootstrap(suite, mirror, tree, (), cache)
    shutil.rmtree(cache)
    info = {"suite": suite, "mirror": mirror, "build_seconds": round(seconds, 1),
            **layers.tree_stats(tree), "packages": len(layers.dpkg_versions(tree))}
    info_file.write_text(json.dumps(info, indent=2) + "\n")  # written last: the tree is whole
    return tree, {**info, "reused": False}


def verdict(results: list[dict]) -> dict:
    by = {r["tool"]: r for r in results if "bytes" in r}
    s, z = by.get("strata"), by.get("zstd --patch-from")
    goal = f"at or below {TARGET}x zstd -19 --patch-from"
    if s is None or z is None:
        return {"goal": goal, "met": None, "measured": "n/a (a tool did not run)"}
    ratio = s["bytes"] / z["bytes"]
    return {"goal": goal, "met": ratio <= TARGET,
            "measured": f"{s['bytes']} B vs {z['bytes']} B ({ratio:.2f}x)"}


def run(work: Path = layers.WORK, keep: bool = False, command: str = "") -> dict:
    t0 = time.monotonic()
    new, _, new_info = layers.build_pair(work)
    suite = new_info["suite"]
    if suite not in PREVIOUS:
        raise SystemExit(f"no previous release known for {suite}")
    old, old_info = build_old(work, PREVIOUS[suite])
    p1, p2 = layers.dpkg_versions(old), layers.dpkg_versions(new)
    pair = {
        "old": {k: v for k, v in old_info.items()}, "new": {
            "suite": suite, **new_info["v1"], "mirror": new_info["mirror"]},
        "arch": layers._arch(),
        "common_packages": len(p1.keys() & p2.keys()),
        "changed_versions": sum(1 for p in p1.keys() & p2.keys() if p1[p] != p2[p]),
        "only_old": sorted(p1.keys() - p2.keys()), "only_new": sorted(p2.keys() - p1.keys()),
    }
    pair_s = time.monotonic() - t0
    view_stats, results, seconds = layers.compare(old, new, work, old.parent, keep=keep,
                                                  name="os")
    summary = {
        "command": command or "python -m bench.migration",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": report.machine(), "pair": pair, "views": view_stats,
        "results": results, "target": verdict(results),
        "seconds": {"pair": round(pair_s, 1), **seconds,
                    "total": round(time.monotonic() - t0, 1)},
    }
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.migration",
                                description=__doc__.split("\n")[0])
    p.add_argument("--keep-work", action="store_true",
                   help="keep the peers' scratch files and Strata's server and endpoints")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m bench.migration" + (" --keep-work" if args.keep_work else "")
    summary = run(layers.WORK, keep=args.keep_work, command=command)
    print(json.dumps(summary, indent=2))
    report.update_sections(layers.ROOT)
    layers.say(f"wrote {RESULTS} and its section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
