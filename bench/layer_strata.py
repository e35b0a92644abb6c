"""Strata's side of the base-layer update benchmark: bytes an endpoint on base v1
downloads to move to v2, measured on the wire by the agent itself.

The real product path: a server, base layers v1 and v2 captured from the two trees, an
endpoint whose root is a copy of v1, `assign --base v1` (nothing to switch) then
`assign --base v2`; `agent run --once` downloads and reports ready; `agent apply`
switches. The figure is everything the agent received during that download cycle as the
agent counts it (every response body and its headers: the check-in that announced v2, the
v2 manifest, the signed metadata it verifies first, the chunk streams, the replies to its
progress reports, the deltas of changed files), plus whatever the apply still had to
fetch. The endpoint is then compared with v2, path by path. A second endpoint on v1 then
takes the same update: the server's CPU seconds for each (read from /proc) are its cost
for the first endpoint of a fleet and for every later one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import httpx

from bench.checkins import start_server
from bench.fleet import strata
from strata.agent.state import AgentState
from strata.layers.rules import LayerRules


def _copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps owners, modes, xattrs, device nodes and hardlinks like the real tree.
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], check=True)


def _received(state: Path) -> int:
    """Bytes the agent has received on the wire, all runs together (its own counter)."""
    return int(AgentState(state).status().get("bytes_received", 0))


def server_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) the server process has used so far."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metrics(url: str, data: Path) -> dict[str, float]:
    """The server's delta counters from /metrics (with its metrics token; an answer
    without them is an error, never zeros)."""
    token = (data / "metrics.token").read_text().strip()
    resp = httpx.get(url + "/metrics", timeout=10, headers={"Authorization": f"Bearer {token}"})
    resp.raise_for_status()
    text = resp.text
    out = {}
    for key, pattern in (("deltas_sent", r'strata_file_deltas_total\{outcome="sent"\}'),
                         ("deltas_not_paying",
                          r'strata_file_deltas_total\{outcome="does-not-pay"\}'),
                         ("delta_cpu_seconds", r"strata_file_delta_cpu_seconds_total"),
                         ("delta_cache_hits", r'strata_file_delta_cache_total\{cache="hit"\}')):
        m = re.search(rf"^{pattern} (\S+)$", text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def measure_strata(v1: Path, v2: Path, work: Path, name: str = "debian") -> dict:
    """The update on a first endpoint (what it downloads, what the server spends), then on
    a second one on the same v1 (what the server spends once its caches hold the
    streams and deltas the first one made: the cost per endpoint in a fleet)."""
    work = work / "strata"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc, url = start_server(work / "server")
    try:
        admin = ["--server", url, "--admin-token-file", str(work / "server/admin.token")]
        (work / "passphrase").write_text("bench passphrase\n")
        sign = ["--keys", str(work / "keys"), "--passphrase-file", str(work / "passphrase")]
        strata("signing", "init", *sign, *admin)  # agents take only signed layers
        t = time.monotonic()
        for version, tree in (("1", v1), ("2", v2)):
            strata("layer", "capture", "--kind", "base", "--name", name, "--version",
                   version, "--from-dir", str(tree), *admin, *sign)
        capture_s = time.monotonic() - t
        token = strata("token", "create", "--uses", "2", *admin)["token"]
        endpoints = []
        for i in (1, 2):
            root, state = work / f"endpoint-{i}", work / f"state-{i}"
            _copy_tree(v1, root)
            strata("agent", "enroll", "--server", url, "--token", token, "--root", str(root),
                   "--state", str(state))
            t = time.monotonic()
            strata("agent", "run", "--once", "--state", str(state))  # centralize
            endpoints.append((root, state, time.monotonic() - t))
        centralize_s = endpoints[0][2]
        strata("assign", "--all", "--base", f"{name}:1", *admin, *sign)
        firsts = [strata("agent", "run", "--once", "--state", str(state))
                  for _, state, _ in endpoints]  # matches v1: applied
        strata("assign", "--all", "--base", f"{name}:2", *admin, *sign)
        runs = []
        for root, state, _ in endpoints:
            before, cpu0, m0 = _received(state), server_cpu(proc), _metrics(url, work / "server")
            t = time.monotonic()
            out = strata("agent", "run", "--once", "--state", str(state))
            download_s = time.monotonic() - t
            cpu, m1 = server_cpu(proc) - cpu0, _metrics(url, work / "server")
            cycle = _received(state) - before
            update = out["update"]
            if out.get("centralized") or update.get("state") != "ready":
                raise RuntimeError(f"the download cycle did not go as planned: {out}")
            t = time.monotonic()
            applied = strata("agent", "apply", "--state", str(state))
            apply_s = time.monotonic() - t
            diffs = system_diffs(root, v2)
            if diffs:
                raise RuntimeError(f"the endpoint differs from v2 after the update "
                                   f"({len(diffs)} paths): " + "; ".join(diffs[:10]))
            runs.append({"cycle": cycle, "update": update, "late": applied.get(
                "bytes_downloaded", 0), "download_s": download_s, "apply_s": apply_s,
                "server_cpu_s": round(cpu, 1),
                **{k: round(m1[k] - m0[k], 1) for k in m0}})
        first, second = runs
        update, cycle, late = first["update"], first["cycle"], first["late"]
        total = cycle + late
        return {
            "tool": "strata", "version": f"strata {_head()}",
            "bytes": total, "seconds": round(first["download_s"], 1),
            "detail": f"`strata agent run --once` after `assign --base {name}:2`: the agent "
                      f"received {cycle} B in that cycle (check-in, manifest, deltas, chunk "
                      f"streams, progress replies; its update count alone: "
                      f"{update['bytes_downloaded']} B for {update['chunks_downloaded']} "
                      f"chunks and {update.get('files_by_delta', 0)} files rebuilt from "
                      f"deltas), and the apply fetched {late} B more; plan "
                      f"{_changes(update['changes'])}; apply took {first['apply_s']:.1f} s; "
                      f"the server spent {first['server_cpu_s']} CPU seconds on this "
                      f"endpoint ({first['delta_cpu_seconds']} s computing "
                      f"{int(first['deltas_sent'])} deltas sent and "
                      f"{int(first['deltas_not_paying'])} that did not pay) and "
                      f"{second['server_cpu_s']} s on a second endpoint on the same v1 "
                      f"(streams and deltas from its caches: "
                      f"{int(second['delta_cache_hits'])} delta cache hits), which received "
                      f"{second['cycle'] + second['late']} B; both endpoints then equal v2 in "
                      f"every path a layer lays down (type, mode, owner, size, contents, "
                      f"link target)",
            "cycle_bytes": cycle, "update_bytes": update["bytes_downloaded"],
            "apply_bytes": late, "chunks": update["chunks_downloaded"],
            "files_by_delta": update.get("files_by_delta", 0),
            "changes": update["changes"], "conflicts": update.get("conflicts", {}),
            "apply_seconds": round(first["apply_s"], 1),
            "capture_seconds": round(capture_s, 1),
            "centralize_seconds": round(centralize_s, 1),
            "server_cpu_seconds": {"first_endpoint": first["server_cpu_s"],
                                   "second_endpoint": second["server_cpu_s"],
                                   "deltas_first_endpoint": first["delta_cpu_seconds"]},
            "second_endpoint_bytes": second["cycle"] + second["late"],
            "v1_applied_without_download": all(
                f.get("update", {}).get("state") == "applied" for f in firsts),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _changes(c: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in c.items())


def _head() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                         text=True, cwd=Path(__file__).parent)
    return out.stdout.strip() or "unknown commit"


def laid_down(rules: LayerRules, rel: bytes, is_dir: bool) -> bool:
    """Whether a base layer puts this path on an endpoint: not identity, user data or a
    `never` path, not do-not-download, not do-not-override (the endpoint's copy stays)."""
    return (rules.layer_may_carry(rel, is_dir) and not rules.do_not_download(rel, is_dir)
            and not rules.do_not_override(rel, is_dir))


def _digest(root: Path, rules: LayerRules) -> dict[bytes, tuple]:
    """Path -> (type, mode, uid, gid, size, content hash or link target) for every path of
    `root` a layer lays down; excluded directories are not walked."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        keep = []
        for name in sorted(dirnames) + sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(os.path.join(dirpath, name))
            is_dir = stat.S_ISDIR(st.st_mode)
            if rel == b".strata-apply" or not laid_down(rules, rel, is_dir):
                continue
            if is_dir:
                keep.append(name)
                what: object = None
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(os.path.join(dirpath, name))
            elif stat.S_ISREG(st.st_mode):
                with open(os.path.join(dirpath, name), "rb") as f:
                    what = hashlib.file_digest(f, "sha256").hexdigest()
            else:
                what = st.st_rdev
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, st.st_size if stat.S_ISREG(st.st_mode) else 0, what)
        dirnames[:] = [d for d in dirnames if d in keep]
    return out


def system_diffs(root: Path, v2: Path) -> list[str]:
    """How the endpoint differs from v2 in the paths a base layer lays down: missing,
    extra (should have been deleted) and different paths. Empty when they are equal.
    Hardlinks are not compared as links: a layer lays them down as separate copies."""
    rules = LayerRules.default("linux")
    want, got = _digest(v2, rules), _digest(root, rules)
    show = os.fsdecode
    diffs = [f"missing {show(p)}" for p in sorted(want.keys() - got.keys())]
    diffs += [f"extra {show(p)}" for p in sorted(got.keys() - want.keys())]
    diffs += [f"differs {show(p)}: {got[p]} != {want[p]}"
              for p in sorted(want.keys() & got.keys()) if want[p] != got[p]]
    return diffs
