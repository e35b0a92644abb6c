"""A base update's download against `zstd -19 --long --patch-from` on the same pair, and
nothing else: `bench.layers` without rsync, casync and the full archive (which take most
of its time), for checking the one ratio after a change.

`python -m bench.base_update` builds (or reuses) bench.layers' pair of Debian trees,
measures `zstd --patch-from` between the tarballs of their layer views (kept beside the
pair, keyed by the tarballs' SHA-256 and zstd's version, since it depends on nothing
else), then Strata's update exactly as bench.layers does (bench/layer_strata.py), and
prints both with their ratio (target: at most 1.05). It writes no BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.layer_strata import measure_strata
from bench.layers import (
    WORK,
    _digest,
    _version,
    build_pair,
    layer_view,
    make_tar,
    measure_zstd_patch,
    remove_tree,
)

TARGET = 1.05


def zstd_patch(v1: Path, v2: Path, scratch: Path) -> dict:
    views, cache = scratch / "base-update-views", v1.parent
    remove_tree(views)
    views.mkdir(parents=True)
    try:
        for name, tree in (("v1", v1), ("v2", v2)):
            layer_view(tree, views / name)
            make_tar(views / name, views / f"{name}.tar")
        zstd_version = _version(["zstd", "--version"], r"v(\d[\w.]*)", "zstd")
        key = f"{_digest(views / 'v1.tar')}-{_digest(views / 'v2.tar')}-{zstd_version}"
        kept = cache / "zstd-patch.json"
        if kept.exists() and (doc := json.loads(kept.read_text())).get("key") == key:
            return {**doc["result"], "reused": True}
        result = measure_zstd_patch(views / "v1.tar", views / "v2.tar", views)
        kept.write_text(json.dumps({"key": key, "result": result}) + "\n")
        return result
    finally:
        shutil.rmtree(views, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.base_update",
                                description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--scratch", type=Path, default=None,
                   help="where Strata's server and endpoints go (default: --work); two runs "
                        "side by side (two versions of Strata) need one each")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    v1, v2, pair = build_pair(args.work)
    scratch = args.scratch or args.work
    zstd = zstd_patch(v1, v2, scratch)
    strata = measure_strata(v1, v2, scratch, "debian")
    shutil.rmtree(scratch / "strata", ignore_errors=True)
    ratio = strata["bytes"] / zstd["bytes"]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "pair": {k: pair[k] for k in ("v1", "v2") if k in pair},
           "strata": strata, "zstd --patch-from": zstd, "ratio": round(ratio, 4),
           "target": TARGET, "met": ratio <= TARGET,
           "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(out, indent=2))
    print(f"strata {strata['bytes']:,} B, zstd --patch-from {zstd['bytes']:,} B: "
          f"{ratio:.3f}x (target at most {TARGET}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
