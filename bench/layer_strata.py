"""Strata's side of the base-layer update benchmark: bytes an endpoint on base v1
downloads to move to v2, measured on the wire by the agent itself.

The real product path: a server, base layers v1 and v2 captured from the two trees, an
endpoint whose root is a copy of v1, `assign --base v1` (nothing to switch) then
`assign --base v2`; `agent run --once` downloads and reports ready; `agent apply`
switches. The figure is everything the agent received during the download (the v2
manifest, the chunk streams, the replies to its progress reports).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.checkins import start_server
from bench.fleet import strata


def _copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps owners, modes, xattrs, device nodes and hardlinks like the real tree.
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)


def measure_strata(v1: Path, v2: Path, work: Path) -> dict:
    work = work / "strata"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc, url = start_server(work / "server")
    try:
        admin = ["--server", url, "--admin-token-file", str(work / "server/admin.token")]
        strata("layer", "capture", "--kind", "base", "--name", "debian", "--version", "1",
               "--from-dir", str(v1), *admin)
        strata("layer", "capture", "--kind", "base", "--name", "debian", "--version", "2",
               "--from-dir", str(v2), *admin)
        token = strata("token", "create", *admin)["token"]
        root, state = work / "endpoint", work / "state"
        _copy_tree(v1, root)
        strata("agent", "enroll", "--server", url, "--token", token, "--root", str(root),
               "--state", str(state))
        strata("agent", "run", "--once", "--state", str(state))  # centralize
        strata("assign", "--all", "--base", "debian:1", *admin)
        strata("agent", "run", "--once", "--state", str(state))  # matches v1: applied
        strata("assign", "--all", "--base", "debian:2", *admin)
        t = time.monotonic()
        out = strata("agent", "run", "--once", "--state", str(state))
        download_s = time.monotonic() - t
        update = out["update"]
        t = time.monotonic()
        applied = strata("agent", "apply", "--state", str(state))
        apply_s = time.monotonic() - t
        same = _system_matches(root, v2)
        return {"tool": "strata", "bytes": update["bytes_downloaded"],
                "seconds": round(download_s, 2),
                "detail": f"chunks {update['chunks_downloaded']}, changes "
                          f"{update['changes']}; apply {apply_s:.1f}s "
                          f"({applied['changes']}); endpoint equals v2 outside "
                          f"never/identity paths: {same}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _system_matches(root: Path, v2: Path) -> bool:
    """After apply, every regular file of v2 a layer may carry is on the endpoint with
    the same bytes (spot check over all files; identity and never paths excluded)."""
    from strata.layers.rules import LayerRules

    rules = LayerRules.default("linux")
    for dirpath, _dirs, filenames in os.walk(v2):
        rel_dir = os.path.relpath(dirpath, v2)
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            p = Path(dirpath, name)
            if p.is_symlink() or not p.is_file() or not rules.layer_may_carry(rel.encode()):
                continue
            if rules.do_not_download(rel.encode()) or rules.do_not_override(rel.encode()):
                continue
            q = root / rel
            if not q.is_file() or q.read_bytes() != p.read_bytes():
                return False
    return True
