"""`make bench`: Strata's store against restic and borg on the same data, in one run,
then centralization over loopback, a fleet's check-ins (bench/openloop.py), the base layer
update (bench/layers.py) and the OS migration (bench/migration.py).

    .venv/bin/python -m bench.run [--usr-bytes 1.5G] [--docs-bytes 200M]
                                  [--tools strata,restic,borg] [--wait-idle 60] [--keep-work]
                                  [--no-fleet] [--no-layers] [--no-mount]

Writes BENCHMARKS.md at the top of the repository and the raw figures to bench/results.json.
Data, repositories and restores live in bench/work/ (gitignored); the data set is kept
and reused by later runs with the same parameters, the rest is removed unless --keep-work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

from . import console, data, fleet, layers, migration, mount, openloop, report, scale
from .tools import ROOT, TOOLS, Step, Tool, busy_cpu_s, ensure_installed, run

WORK = ROOT / "bench" / "work"


def size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200M, 1.5G)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--usr-bytes", type=size, default=size("1.5G"),
                   help="how much of /usr to copy into the data set (default 1.5G)")
    p.add_argument("--docs-bytes", type=size, default=size("200M"),
                   help="how many bytes of user documents to generate (default 200M)")
    p.add_argument("--tools", default="strata,restic,borg",
                   help="comma-separated tools to run (default strata,restic,borg)")
    p.add_argument("--wait-idle", type=float, default=60, metavar="SECONDS",
                   help="wait up to this long for other load on the machine to stop before "
                        "measuring (default 60)")
    p.add_argument("--no-fleet", action="store_true",
                   help="skip centralization over loopback and the fleet check-ins; "
                        "BENCHMARKS.md then shows the check-in figures saved last in "
                        "bench/openloop-results.json")
    p.add_argument("--no-layers", action="store_true",
                   help="skip the base layer update and OS migration benchmarks "
                        "(bench/layers.py, bench/migration.py); BENCHMARKS.md then shows the "
                        "figures they saved last in bench/*-results.json")
    p.add_argument("--no-mount", action="store_true",
                   help="skip the mount benchmark (bench/mount.py); BENCHMARKS.md then shows "
                        "the figures it saved last in bench/mount-results.json")
    p.add_argument("--fleet-endpoints", type=int, default=10_000, metavar="N",
                   help="simulated endpoints checking in (open loop, bench/openloop.py)")
    p.add_argument("--fleet-seconds", type=float, default=60,
                   help="length of the fleet check-in run (default 60)")
    p.add_argument("--fleet-long", action="store_true",
                   help="also a 10-minute fleet check-in run (past the caches' 5 minutes)")
    p.add_argument("--scale", type=int, default=0, metavar="CHUNKS",
                   help="also measure peak memory on a synthetic store of this many chunks "
                        "(10000000 takes about 20 minutes)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep repositories, restores and logs in bench/work afterwards")
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if unknown := set(args.tools) - TOOLS.keys():
        p.error(f"unknown tools: {', '.join(sorted(unknown))} (known: {', '.join(TOOLS)})")
    return args


def say(text: str) -> None:
    print(text, flush=True)


def measured(tool: Tool, scenario: str, cmd: list[str], cwd=None) -> Step:
    say(f"  {tool.name:<7} {scenario:<9} …")
    step = run(tool, scenario, cmd, cwd)
    say(f"  {tool.name:<7} {scenario:<9} {step.wall_s:7.1f} s wall {step.cpu_s:7.1f} s CPU "
        f"{step.peak_kib / 1024:6.0f} MiB mem {step.store_bytes / (1 << 20):8.1f} MiB store"
        f" {step.other_cpu_s:5.1f} s other CPU"
        + ("" if step.returncode == 0 else f"  FAILED ({step.returncode})"))
    return step


def wait_idle(limit: float) -> bool:
    """Wait (up to `limit` s) for a 2 s window in which the machine is nearly idle."""
    deadline = time.monotonic() + limit
    while True:
        busy = busy_cpu_s()
        time.sleep(2)
        if busy_cpu_s() - busy < 0.2:
            return True
        if time.monotonic() > deadline:
            return False
        if deadline - time.monotonic() > limit - 2.5:  # first time round
            say(f"the machine is busy with other work; waiting up to {limit:.0f} s for it to stop")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    python = os.path.relpath(sys.executable, ROOT)
    command = f"{python} -m bench.run {shlex.join(argv)}".strip()
    notes = ensure_installed(args.tools)
    tools = [TOOLS[n](WORK) for n in args.tools if n == "strata" or shutil.which(n)]

    say(f"data set: {args.usr_bytes / (1 << 20):.0f} MiB of /usr + "
        f"{args.docs_bytes / (1 << 20):.0f} MiB of documents in {WORK / 'data'}")
    info = data.prepare(WORK, args.usr_bytes, args.docs_bytes)
    say("  reused from an earlier run" if info["reused"] else
        f"  made in {info['prepare_seconds']} s")
    src = WORK / "data" / "src"
    for d in ("repos", "restore", "cache", "logs"):
        shutil.rmtree(WORK / d, ignore_errors=True)
    (WORK / "repos").mkdir(parents=True)

    if not wait_idle(args.wait_idle):
        notes.append(f"the machine was still busy with other work after waiting "
                     f"{args.wait_idle:.0f} s; see the Other CPU column")
    steps: list[Step] = []
    say("scenario 1: first backup")
    for tool in list(tools):
        init = subprocess.run(tool.init_cmd(), env=tool.env, capture_output=True, text=True)
        if init.returncode != 0:
            notes.append(f"{tool.name}: init failed, skipped: {init.stderr.strip()[-300:]}")
            say(f"!!! {notes[-1]}")
            tools.remove(tool)
            continue
        steps.append(measured(tool, "first", *tool.backup_cmd(src, 1)))
    say("scenario 2: re-backup, nothing changed")
    for tool in tools:
        steps.append(measured(tool, "nochange", *tool.backup_cmd(src, 2)))
    mutation = None
    try:
        mutation = data.mutate(WORK / "data")
        say(f"scenario 3: re-backup after changing {mutation['files_changed']} files")
        for tool in tools:
            steps.append(measured(tool, "changed", *tool.backup_cmd(src, 3)))
        say("scenario 4: full restore (hashing the source for verification first)")
        expected = data.tree_digest(src)
        for tool in tools:
            target = WORK / "restore" / tool.name
            target.mkdir(parents=True)
            cmd, cwd, restored = tool.restore_cmd(src, 3, target)
            step = measured(tool, "restore", cmd, cwd)
            step.verify = (data.compare_trees(expected, data.tree_digest(restored))
                           if restored.is_dir() else [f"nothing restored at {restored}"])
            if step.verify:
                say(f"!!! {tool.name}: RESTORED TREE DIFFERS FROM THE SOURCE "
                    f"({len(step.verify)} differences):")
                for line in step.verify[:10]:
                    say(f"!!!   {line}")
            else:
                say(f"  {tool.name}: restored tree identical to the source")
            steps.append(step)
            if not args.keep_work:
                shutil.rmtree(target, ignore_errors=True)
    finally:
        data.undo_mutation(WORK / "data")
        if not args.keep_work:
            for d in ("repos", "restore", "cache", "logs"):
                shutil.rmtree(WORK / d, ignore_errors=True)

    extra: dict = {}
    if not args.no_fleet and "strata" in args.tools:
        say("centralization: a server on loopback, four endpoints sharing the data set")
        extra["fleet"] = fleet.measure(src, WORK / "fleet")
        shutil.rmtree(WORK / "fleet", ignore_errors=True)
        say(f"check-ins: {args.fleet_endpoints} simulated endpoints at Poisson arrivals "
            "against one server process")
        results = openloop.measure(WORK / "openloop", args.fleet_endpoints,
                                   seconds=args.fleet_seconds, say=say)
        openloop.save(results, f"{python} -m bench.openloop")
        if args.fleet_long:
            say("check-ins: the same fleet for 10 minutes")
            results = openloop.measure(WORK / "openloop", args.fleet_endpoints,
                                       **openloop.LONG, say=say)
            openloop.save(results, f"{python} -m bench.openloop --long", long=True)
    if openloop.RESULTS.exists():
        extra["openloop"] = json.loads(openloop.RESULTS.read_text())
    if not args.no_layers:
        say("base layer update: Debian minbase v1 -> v2 (+ packages), Strata against rsync, "
            "casync and zstd --patch-from")
        try:
            layers.run(WORK, keep=args.keep_work, command=f"{python} -m bench.layers")
        except (Exception, SystemExit) as exc:  # e.g. no mirror or no root: say so, go on
            notes.append(f"the base layer update benchmark did not run ({exc}); its section "
                         "shows the figures saved by its last run")
            say(f"!!! {notes[-1]}")
    if layers.RESULTS.exists():
        extra["layers"] = json.loads(layers.RESULTS.read_text())
    if not args.no_mount and "strata" in args.tools:
        say("mounting a snapshot: cold-read throughput against a restore")
        try:
            mount.run(WORK / "mount", keep=args.keep_work)
        except (Exception, SystemExit) as exc:  # e.g. no /dev/fuse: say so, go on
            notes.append(f"the mount benchmark did not run ({exc}); its section shows the "
                         "figures saved by its last run")
            say(f"!!! {notes[-1]}")
    if mount.RESULTS.exists():
        extra["mount"] = json.loads(mount.RESULTS.read_text())
    if not args.no_layers:
        say("OS migration: Debian minbase of the previous release -> the host's, Strata "
            "against rsync, casync and zstd --patch-from")
        try:
            migration.run(WORK, keep=args.keep_work, command=f"{python} -m bench.migration")
        except (Exception, SystemExit) as exc:
            notes.append(f"the OS migration benchmark did not run ({exc}); its section "
                         "shows the figures saved by its last run")
            say(f"!!! {notes[-1]}")
    if migration.RESULTS.exists():
        extra["migration"] = json.loads(migration.RESULTS.read_text())
    if args.scale:
        say(f"memory on a store of {args.scale} chunks")
        scale.run(args.scale, WORK / "scale")
    scale_file = ROOT / "bench" / "scale-results.json"
    if scale_file.exists():
        extra["scale"] = json.loads(scale_file.read_text())
    if console.RESULTS.exists():  # `python -m bench.console` writes it
        extra["console"] = json.loads(console.RESULTS.read_text())

    dropped = [s.cache_dropped for s in steps]
    if not all(dropped):
        notes.append("dropping the page cache failed for some steps (needs root): those steps "
                     "may have read warm data")
    busy = [f"{s.tool} {s.scenario} ({s.other_cpu_s:.1f} s)" for s in steps
            if s.other_cpu_s > 0.25 * s.wall_s]
    if busy:
        notes.append("other processes used more than a quarter of a CPU during: "
                     + ", ".join(busy) + "; those timings are likely disturbed")
    if "restic" not in [t.name for t in tools]:
        notes.append("restic did not run, so the targets (relative to restic) are not judged")
    usr, docs = info["usr"], info["docs"]
    meta = {
        "command": command,
        "make_args": f" BENCH_ARGS={shlex.quote(shlex.join(argv))}" if argv else "",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": report.machine(),
        "versions": {t.name: t.version() for t in tools},
        "settings": {t.name: t.settings for t in tools},
        "encrypted": {t.name: t.encrypted for t in tools},
        "cache_dropped": "yes" if all(dropped) else
                         ("no (not permitted)" if not any(dropped) else "only for some steps"),
        "data": info,
        "data_bytes": usr["bytes"] + docs["bytes"],
        "data_files": usr["files"] + docs["text_files"] + docs["csv_files"]
        + docs["binary_files"] + docs["duplicate_files"],
        "mutation": mutation,
        "notes": notes,
        "total_seconds": round(time.monotonic() - started, 1),
        **extra,
    }
    doc = report.write(ROOT, meta, steps)
    say("\n" + doc[doc.index("## Results"):])
    say(f"wrote {ROOT / 'BENCHMARKS.md'} and {ROOT / 'bench' / 'results.json'} "
        f"in {meta['total_seconds']:.0f} s")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
