"""Turn the measured steps into BENCHMARKS.md, bench/results.json and a table on stdout."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from .tools import Step

MiB = 1 << 20
SCENARIOS = {
    "first": "1. First backup into an empty repository",
    "nochange": "2. Re-backup, nothing changed",
    "changed": "3. Re-backup after 1% of the files changed",
    "restore": "4. Full restore of the latest snapshot into an empty directory",
}


def machine() -> dict:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.machine())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu,
            "ram_gib": round(int(mem.split()[1]) / (1 << 20), 1),
            "kernel": platform.release(), "python": platform.python_version()}


def _find(steps: list[Step], tool: str, scenario: str) -> Step | None:
    return next((s for s in steps if s.tool == tool and s.scenario == scenario), None)


def _speed(restic: float, strata: float) -> str:
    r = restic / strata
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower ({r:.2f}x)"


def targets(steps: list[Step]) -> list[dict]:
    """The goals from the issue, each judged on this run's figures."""
    def pair(scenario: str) -> tuple[Step | None, Step | None]:
        return _find(steps, "strata", scenario), _find(steps, "restic", scenario)

    out = []

    def add(goal: str, scenario: str, value, met) -> None:
        s, r = pair(scenario)
        if s is None or r is None or not (s.ok and r.ok):
            out.append({"goal": goal, "measured": "n/a (strata or restic did not run cleanly)",
                        "met": None})
        else:
            measured, ok = value(s, r), met(s, r)
            out.append({"goal": goal, "measured": measured, "met": ok})

    add("First backup at least 2x faster than restic (wall)", "first",
        lambda s, r: f"{r.wall_s / s.wall_s:.2f}x ({s.wall_s:.1f} s vs {r.wall_s:.1f} s)",
        lambda s, r: r.wall_s / s.wall_s >= 2)
    for scenario, what in (("nochange", "No-change re-backup"), ("restore", "Full restore")):
        add(f"{what} no slower than restic (wall)", scenario,
            lambda s, r: f"{s.wall_s:.1f} s vs {r.wall_s:.1f} s",
            lambda s, r: s.wall_s <= r.wall_s)
    add("Store size at most 1.05x restic's (after the last backup)", "changed",
        lambda s, r: f"{s.store_bytes / r.store_bytes:.3f}x "
                     f"({s.store_bytes / MiB:.1f} MiB vs {r.store_bytes / MiB:.1f} MiB)",
        lambda s, r: s.store_bytes <= 1.05 * r.store_bytes)
    rss = [(sc, pair(sc)) for sc in SCENARIOS]
    rss = [(sc, s, r) for sc, (s, r) in rss if s and r and s.ok and r.ok]
    if len(rss) == len(SCENARIOS):
        worse = [sc for sc, s, r in rss if s.peak_kib >= r.peak_kib]
        out.append({"goal": "Peak memory under restic's (in every scenario)",
                    "measured": ", ".join(f"{sc} {s.peak_kib / r.peak_kib:.2f}x"
                                          for sc, s, r in rss),
                    "met": not worse})
    else:
        out.append({"goal": "Peak memory under restic's (in every scenario)",
                    "measured": "n/a (strata or restic did not run cleanly)", "met": None})
    return out


def _row(s: Step, encrypted: bool) -> str:
    notes = []
    if encrypted:
        notes.append("encrypted (always, in restic)")
    if s.procs > 1:
        notes.append(f"{s.procs} processes")
    if s.returncode:
        notes.append(f"**FAILED, exit code {s.returncode}**")
    if s.verify is not None:
        notes.append("restored tree verified identical" if not s.verify else
                     f"**RESTORED TREE DIFFERS: {len(s.verify)} differences**")
    return (f"| {s.tool} | {s.wall_s:.1f} | {s.cpu_s:.1f} | {s.peak_kib / 1024:.0f} "
            f"| {s.store_bytes / MiB:.1f} | {s.other_cpu_s:.1f} | {'; '.join(notes)} |")


def tables(steps: list[Step], encrypted: dict[str, bool]) -> str:
    lines = []
    for scenario, title in SCENARIOS.items():
        rows = [s for s in steps if s.scenario == scenario]
        if not rows:
            continue
        lines += [f"### {title}", "",
                  "| Tool | Wall s | CPU s | Peak memory MiB | Store MiB | Other CPU s | Notes |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
                  *[_row(s, encrypted.get(s.tool, False)) for s in rows], ""]
        s, r = _find(steps, "strata", scenario), _find(steps, "restic", scenario)
        if s and r and s.ok and r.ok:
            lines += [f"Strata vs restic: {_speed(r.wall_s, s.wall_s)} (wall), "
                      f"CPU {s.cpu_s / r.cpu_s:.2f}x restic's, "
                      f"store size {s.store_bytes / r.store_bytes:.3f}x, "
                      f"peak memory {s.peak_kib / r.peak_kib:.2f}x.", ""]
    return "\n".join(lines)


def target_table(goals: list[dict]) -> str:
    mark = {True: "met", False: "**not met**", None: "n/a"}
    return "\n".join(["| Target | Measured | Verdict |", "| --- | --- | --- |",
                      *[f"| {g['goal']} | {g['measured']} | {mark[g['met']]} |"
                        for g in goals]])


def data_description(info: dict, mutation: dict | None) -> list[str]:
    usr, docs, p = info["usr"], info["docs"], info["params"]
    lines = [
        f"- **/usr copy**: {usr['files']} files, {usr['symlinks']} symlinks, {usr['dirs']} "
        f"directories, {usr['bytes'] / MiB:.1f} MiB of this machine's /usr, copied in sorted "
        f"depth-first order until the {p['usr_bytes'] / MiB:.0f} MiB budget was reached (last "
        f"file: `{usr['last']}`); modes, mtimes and symlinks kept; {usr['skipped']} special "
        f"files skipped.",
        f"- **Generated documents** ({docs['bytes'] / MiB:.1f} MiB, seed {p['seed']}): "
        f"{docs['text_files']} text files ({docs['text_bytes'] / MiB:.1f} MiB, "
        f"{docs['vocabulary']}), {docs['csv_files']} CSV files "
        f"({docs['csv_bytes'] / MiB:.1f} MiB), {docs['binary_files']} incompressible random "
        f"binaries ({docs['binary_bytes'] / MiB:.1f} MiB), {docs['duplicate_files']} "
        f"duplicates of those in other folders ({docs['duplicate_bytes'] / MiB:.1f} MiB).",
    ]
    if mutation:
        lines.append(
            f"- **1% change** (before scenario 3): {mutation['files_changed']} of "
            f"{mutation['files_total']} regular files picked with a fixed seed; three in four "
            f"had 4 KiB overwritten in the middle (the whole file if smaller), one in four had "
            f"1 KiB appended ({mutation['bytes_written'] / 1024:.0f} KiB written in all).")
    return lines


def markdown(meta: dict, steps: list[Step], goals: list[dict]) -> str:
    m, v = meta["machine"], meta["versions"]
    encrypted = meta["encrypted"]
    lines = [
        "# Benchmarks: Strata's store vs restic and borg", "",
        "Written by `bench/run.py`; do not edit by hand. Regenerate with:", "",
        "```", meta["command"], "```", "",
        f"(`make bench{meta['make_args']}` runs the same.)", "",
        f"- Date: {meta['date']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}",
        f"- Versions: {'; '.join(v.values())}",
        f"- Page cache dropped before every step: {meta['cache_dropped']}",
        f"- Whole run, data preparation included: {meta['total_seconds']:.0f} s",
        "- One run of each step. Wall time is elapsed time; CPU time is user+sys of the tool's "
        "processes, helpers included; peak memory is the larger of ru_maxrss (the largest "
        "single process) and the peak of the summed PSS of the tool's process tree sampled "
        "every 0.1 s (see bench/launch.py, which starts each tool so that the benchmark's own "
        "memory does not leak into these figures); "
        "store size is the apparent size of all files in the repository after the step "
        "(restic's and borg's client-side caches live outside the repository and are not "
        "counted). Other CPU s is the CPU time the rest of the machine used during the step "
        "(kernel I/O threads included): a large value means the step competed with other "
        "load and its times are suspect.", "",
        "## Data set", "",
        f"{meta['data_bytes'] / MiB:.1f} MiB in {meta['data_files']} files.", "",
        *data_description(meta["data"], meta.get("mutation")), "",
        "## Settings", "",
        *[f"- **{name}**: {s}" for name, s in meta["settings"].items()],
        "- Order: every tool's first backup, then every tool's no-change backup, then the "
        "1% change, every tool's changed backup, then every tool's restore (verified against "
        "the source: paths, types, sizes, permission bits, symlink targets, BLAKE3 of contents).",
        "",
        "## Results", "",
        tables(steps, encrypted), "",
        "## Targets (from the issue)", "",
        target_table(goals), "",
    ]
    lines += extra_sections(meta)
    if meta["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(lines)


def extra_sections(meta: dict) -> list[str]:
    """Centralization over loopback, a fleet's check-ins, the base layer update, and
    memory at scale."""
    out: list[str] = []
    fleet = meta.get("fleet")
    if fleet:
        overhead = fleet["network_overhead"]
        out += [
            "## Centralization over loopback", "",
            f"The data set centralized by `strata agent backup` to a `strata server` on "
            f"127.0.0.1 took {fleet['centralize_seconds']:.1f} s against "
            f"{fleet['local_backup_seconds']:.1f} s for `strata store backup` into a local "
            f"store: network overhead {overhead:+.1%} (target: under 20%: "
            f"{'met' if overhead < 0.2 else 'not met'}). Page cache dropped before each."
            + _rounds(fleet), "",
            "Endpoints 2-4 hold the same data set plus their own files (random, "
            "incompressible); what each put on the wire:", "",
            "| Endpoint | Tree MiB | Own data MiB | On the wire MiB | Wire / tree | "
            "Budget (own + 1% of the rest) |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for e in fleet["endpoints"]:
            budget = e["own_bytes"] + 0.01 * (e["tree_bytes"] - e["own_bytes"])
            ok = e["endpoint"] == 1 or e["bytes_sent"] <= budget
            out.append(f"| {e['endpoint']} | {e['tree_bytes'] / MiB:.1f} | "
                       f"{e['own_bytes'] / MiB:.1f} | {e['bytes_sent'] / MiB:.2f} | "
                       f"{e['bytes_sent'] / e['tree_bytes']:.2%} | "
                       f"{'first endpoint' if e['endpoint'] == 1 else ('met' if ok else 'not met')}"
                       " |")
        out.append("")
    if meta.get("openloop"):
        out += fleet_checkin_section(meta["openloop"])
    con = meta.get("console")
    if con:
        out += [
            "## Console page loads", "",
            f"{con['endpoints']:,} endpoints enrolled through the API (each CVD with "
            f"{con['snapshots_per_endpoint']} snapshot records"
            + (f", {con['packages_per_endpoint']:,} installed packages, and a task over the "
               "whole fleet" if con.get("packages_per_endpoint") else "")
            + f"), an administrator signed in "
            f"like a browser, each page fetched {con['runs']} times over keep-alive HTTP on "
            f"loopback (`python -m bench.console`, {con['date']}; target: under 200 ms). The "
            "dashboard's storage figures and the compliance report are kept for a minute: "
            "the first load pays for them, the others are the loads in between"
            + ("; the software summary and the storage per CVD are computed in the "
               "background (first computation: " + ", ".join(
                   f"{k} {v} s" for k, v in con["background_reports_seconds"].items())
               + "), the pages show the last result" if con.get("background_reports_seconds")
               else "") + ":", "",
            "| Page | First ms | Median ms | p95 ms | Bytes | Target (p95) |",
            "|---|---:|---:|---:|---:|---|",
            *[f"| {name} | {r.get('first_ms', '–')} | {r['median_ms']} | {r['p95_ms']} | "
              f"{r['bytes']:,} | {'met' if r['p95_ms'] < 200 else 'not met'} |"
              for name, r in con["pages"].items()], "",
        ]
        slow = [f"{name} ({r['first_ms']:.0f} ms)" for name, r in con["pages"].items()
                if r.get("first_ms", 0) > 200]
        if slow:
            out += [f"First loads over 200 ms: {', '.join(slow)}; each is then kept for a "
                    "minute.", ""]
    if meta.get("layers"):
        out += layer_section(meta["layers"])
    if meta.get("mount"):
        out += mount_section(meta["mount"])
    if meta.get("migration"):
        out += migration_section(meta["migration"])
    sc = meta.get("scale")
    if sc:
        out += [
            f"## Memory on a store of {sc['chunks']:,} chunks", "",
            f"`{sc.get('command', 'python -m bench.scale')}` synthesizes the chunks (tiny, so "
            "it is quick to build) and one snapshot naming them all, then measures each "
            "command as its own process (target: peak RSS under 1 GiB):", "",
            "| Command | Seconds | Peak RSS MiB |", "|---|---:|---:|",
            *[f"| {name} | {r['seconds']} | {r['peak_rss_mib']} |"
              for name, r in sc["runs"].items()], "",
        ]
    return out


FLEET_TITLE = "Check-ins from a simulated fleet (open loop)"
OLD_CHECKIN_TITLE = "Check-ins from simulated agents"  # the closed-loop bench.checkins


def fleet_checkin_section(ol: dict) -> list[str]:
    """The open-loop check-in benchmark (bench/openloop.py, saved in
    bench/openloop-results.json)."""
    m, target = ol["main"], ol["target_p99_ms"]

    def row(r: dict, run: str) -> str:
        return (f"| {r['endpoints']:,} | {run} | {r['offered_per_s']:.0f} | "
                f"{r['achieved_per_s']:.0f} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                f"{r['max_ms']} | {r['errors']} | {r['server_us_per_checkin']} | "
                f"{r['generator_cpu_share']:.0%} ({r['generator_us_per_checkin']} µs) | "
                f"{r['generator_lag_p99_ms']} | {r['load_average'][0]}-{r['load_average'][1]} "
                f"| {'held' if r['held'] else '**missed**'} |")
    rows = [row(m, f"{m['seconds']:.0f} s, the server's first (caches cold)"),
            *[row(r, f"{r['seconds']:.0f} s, search") for r in ol["search"]]]
    if ol.get("favoured"):
        f = ol["favoured"]
        rows.append(row(f, f"{f['seconds']:.0f} s, server and generator at nice {f['nice']}"))
    if ol.get("long"):
        lg = ol["long"]
        rows.append(row(lg, f"{lg['seconds']:.0f} s, a later server's whole first 10 "
                            f"minutes (`--long`, {lg['date']})"))
    starved = [_when_slow(r, what) for r, what in (
        (m, "the first run"), (ol.get("long") or {}, "the 10-minute run"))
        if r.get("seconds_over_target")]
    enrolled = ol["enrolled"]
    how = (f"{enrolled['endpoints']:,} enrolled through the API in {enrolled['seconds']:.0f} s "
           f"({enrolled.get('per_s', 0)}/s, 32 in flight)" if enrolled["endpoints"] else "")
    if enrolled["reused"]:
        how += (", and " if how else "") + (f"{enrolled['reused']:,} enrolled through the API "
                                            "by an earlier run and kept (bench/work/openloop)")
    largest = ol["largest_held"]
    verdict = "met" if m["held"] else "not met"
    return [
        f"## {FLEET_TITLE}", "",
        f"Simulated endpoints ({how}) check in with their inventory at Poisson arrivals, "
        f"each once per {m['interval_s']:.0f} s on average, against one server process on "
        f"loopback (`{ol.get('command', 'python -m bench.openloop')}`, {ol['date']}, "
        f"{ol['cpus']} CPUs). The arrivals keep their schedule whatever the server does, and "
        "latency runs from the scheduled time, so a check-in that waited (for the generator "
        "or for one of its "
        f"{ol['connections']} keep-alive connections) counts its wait. "
        f"{m['inventory_changes']:.0%} of check-ins report a changed inventory (the disk's "
        "free space moved, as a real agent's statvfs figures do). The first run is the "
        "server's first minute: each endpoint's first check-in reads its credential, head "
        "and desired state from the catalog, which later ones find in the caches (kept 5 "
        "minutes), as do most check-ins of the search runs that follow.", "",
        f"**Target: {10_000:,} endpoints at a 60 s interval, p99 under {target:.0f} ms, no "
        f"errors: {verdict}** ({m['endpoints']:,} endpoints, p99 {m['p99_ms']} ms, "
        f"{m['errors']} errors). Largest fleet that held it: "
        + (f"**{largest:,} endpoints**" if largest else "none of those tried")
        + f" (a search over the endpoint count, {ol['search_seconds']:.0f} s runs)."
        + (f" With the server given its CPU (nice {ol['favoured']['nice']}, below): "
           f"{'held' if ol['favoured']['held'] else 'not held'}, p99 "
           f"{ol['favoured']['p99_ms']} ms, {ol['favoured']['errors']} errors."
           if ol.get("favoured") else ""), "",
        "| Endpoints | Run | Offered/s | Done/s | p50 ms | p95 ms | p99 ms | max ms | "
        "Errors | Server CPU µs per check-in | Generator CPU (per check-in) | "
        "Generator lag p99 ms | Load average (1 min, start-end) | p99 target |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
        *rows, "",
        "Generator CPU is the load generator's own (one asyncio process speaking HTTP/1.1 "
        "over its pool; share of one CPU); generator lag is how late it sent a request "
        "against its schedule (its own delays, and waits for a free connection). The load "
        "average is the whole machine's: other work shared the 2 CPUs "
        f"({m['other_cpu_s']:.0f} CPU seconds of it during the main run), so the server "
        "process got only part of a CPU and the figures vary from run to run."
        + (" The nice row is the first run's size again with the server and the generator "
           "at a higher priority than the rest of the machine, which then gets what they "
           "leave: the server given the CPU it would have on a machine of its own "
           "(`--priority 10`)." if ol.get("favoured") else ""), "",
        *([" ".join(starved), ""] if starved else []),
    ]


def _when_slow(r: dict, what: str) -> str:
    """Whether the slow seconds of a run were the server's or the machine's."""
    return (f"In {what}, {r['seconds_over_target']} of {r['seconds_run']} seconds had a "
            f"check-in over the target; in those the server process ran on "
            f"{r['server_cpus_when_slow']} CPUs and the whole machine was busy on "
            f"{r['machine_busy_when_slow']} of its 2, against {r['server_cpus_otherwise']} "
            f"and {r['machine_busy_otherwise']} in the other seconds.")


def mount_section(m: dict) -> list[str]:
    """Mounting a snapshot (bench/mount.py, saved in bench/mount-results.json)."""
    mib = m["file_bytes"] / MiB
    srv = m.get("server") or {}
    rows = [f"| local store | {m['restore_mib_s']:.0f} ({m['restore_seconds']:.2f} s) | "
            f"{m['mount_mib_s']:.0f} ({m['mount_seconds']:.2f} s) | "
            f"{m['mount_chunks_fetched']} in {m['mount_requests']} |"]
    if srv:
        rows.append(f"| server on loopback | {srv['export_mib_s']:.0f} "
                    f"({srv['export_seconds']:.2f} s) | {srv['mount_mib_s']:.0f} "
                    f"({srv['mount_seconds']:.2f} s) | {srv['mount_chunks_fetched']} in "
                    f"{srv['mount_requests']} |")
    return [
        "## Mounting a snapshot: cold-read throughput", "",
        f"One {mib:.0f} MiB file of random bytes in a snapshot of "
        f"{m['snapshot_bytes'] / MiB:.0f} MiB ({m['snapshot_chunks']} chunks, "
        f"{m['file_chunks']} of them the file's), read cold (the store's packs evicted from "
        "the page cache, a fresh mount) through the FUSE mount in 1 MiB reads, against a "
        "restore of the same file (`--include`, written to disk, the command's start-up "
        "included). Best of five, the two taking turns; "
        f"`python -m bench.mount`, {m['when']}, {m['cpus']} CPUs.",
        "",
        "| Read from | Restore MiB/s | Mount MiB/s | Chunks the mount fetched |",
        "|---|---:|---:|---:|", *rows, "",
        *([f"The machine's load average over the last 5 minutes of the run was "
           f"{m['load_average']} (other work shared the CPUs): the figures vary from run to "
           "run; compare the two columns of one row.", ""] if "load_average" in m else []),
        "The mount fetched exactly the file's chunks and nothing else of the snapshot. "
        "Through the server, the restore is `strata endpoint export --path` and the mount "
        "`strata endpoint mount`, both over the admin API's manifest and chunks routes.", "",
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell (the `tar | zstd` row)


def _tree(st: dict) -> str:
    return (f"{st['files']} files, {st['symlinks']} symlinks, {st['dirs']} directories, "
            f"{st['bytes'] / MiB:.1f} MiB")


def layer_section(lay: dict) -> list[str]:
    """The base layer update benchmark (bench/layers.py, saved in bench/layers-results.json)."""
    pair, views, sec = lay["pair"], lay["views"], lay["seconds"]
    rows = [r for r in lay["results"] if "bytes" in r]
    strata = next((r for r in rows if r["tool"] == "strata"), None)
    build = pair.get("build_seconds", {})
    added = pair["added_packages"]
    m = lay["machine"]
    out = [
        "## Base layer update", "",
        f"What an endpoint on base image v1 downloads to move to v2, for Strata and its peers "
        f"on the same pair (`{lay['command']}`, {lay['date']}, {m['nproc']} CPUs, "
        f"{sec['total']:.0f} s with the pair {'reused' if pair['reused'] else 'built'}).", "",
        f"- **v1**: Debian {pair['suite']} {pair['arch']} `debootstrap --variant=minbase` from "
        f"{pair['mirror']}: {pair['v1']['packages']} packages, {_tree(pair['v1'])}.",
        f"- **v2**: the same plus `--include={','.join(pair['include'])}`: "
        f"{pair['v2']['packages']} packages ({len(added)} added: {', '.join(added)}), "
        f"{_tree(pair['v2'])}. "
        + ("The packages both have are at the same versions (one --cache-dir of .debs)."
           if not pair.get("version_mismatches") else
           f"**Packages at other versions in v2: {', '.join(pair['version_mismatches'])}.**"),
        f"- **Built once** and kept in bench/work/layers/: the first build took "
        f"{build.get('v1', 0) + build.get('v2', 0):.0f} s (debootstrap: v1 "
        f"{build.get('v1', 0):.0f} s, v2 {build.get('v2', 0):.0f} s, downloading the .debs "
        f"from the mirror); later runs reuse it.",
        f"- **Layer view**: the peers run on what a base layer lays down on an endpoint under "
        f"the default Linux rules (no `never` paths such as /var/cache, which holds "
        f"debootstrap's .debs, /var/log, /proc, /dev, /tmp; no identity files, home "
        f"directories or do-not-download paths): v1 {_tree(views['v1'])} "
        f"({views['v1']['left_out']['bytes'] / MiB:.1f} MiB left out), v2 "
        f"{_tree(views['v2'])} ({views['v2']['left_out']['bytes'] / MiB:.1f} MiB left out). "
        f"Strata takes the whole trees: the server captures v1 and v2 as base layers, the "
        f"endpoint is a full copy of v1, and after the update it must equal v2 in every "
        f"path a layer lays down (checked: type, mode, owner, size, contents, link target).",
        "",
        *_tool_rows(lay["results"]),
    ]
    goal = lay["target"]
    out += ["", target_table([{**goal, "goal": "Base layer update: " + goal["goal"]}]), "",
            *_server_cpu(strata),
            "The last two rows are for scale: v2's layer view as it is, and all of it "
            "compressed (a full download). "
            "Seconds: Strata's is the agent's download cycle (`agent run --once`: check-in, "
            "plan, download, the server compressing at zstd level 19); rsync's the whole "
            "transfer; casync's `casync make` of v2; zstd's making the patch or the archive. "
            "The bytes are what each tool would move between two machines; here both ends "
            "run on this one.", ""]
    out += [f"- **{_cell(r['tool'])}**: {r['detail']}" for r in rows if r.get("detail")]
    out.append("")
    return out


def _tool_rows(results: list[dict]) -> list[str]:
    rows = [r for r in results if "bytes" in r]
    strata = next((r for r in rows if r["tool"] == "strata"), None)
    out = ["| Tool | Version | Bytes on the wire | MiB | vs Strata | Seconds |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['bytes'] / strata['bytes']:.2f}x" if strata else "n/a"
        out.append(f"| {_cell(r['tool'])} | {r.get('version', '')} | {r['bytes']:,} | "
                   f"{r['bytes'] / MiB:.1f} | {ratio} | {r['seconds']:.1f} |")
    out += [f"| {r['tool']} | | **failed: {r['error']}** | | | |" for r in results
            if "error" in r]
    return out


def _server_cpu(strata: dict | None) -> list[str]:
    cpu = (strata or {}).get("server_cpu_seconds")
    if not cpu:
        return []
    return [f"Server CPU per endpoint (from /proc, the whole server process): "
            f"**{cpu['first_endpoint']} s** for the first endpoint of a fleet "
            f"({cpu['deltas_first_endpoint']} s of it computing file deltas; "
            f"{(strata or {}).get('files_by_delta', 0)} files came as deltas), "
            f"**{cpu['second_endpoint']} s** for each later one on the same old image (deltas "
            f"and chunk streams come from the server's caches).", ""]


def migration_section(mig: dict) -> list[str]:
    """The OS migration benchmark (bench/migration.py, saved in bench/migration-results.json)."""
    pair, views, sec, m = mig["pair"], mig["views"], mig["seconds"], mig["machine"]
    old, new = pair["old"], pair["new"]
    strata = next((r for r in mig["results"] if r["tool"] == "strata"), {})
    out = [
        "## OS migration", "",
        f"What an endpoint on Debian {old['suite']} downloads to move to {new['suite']} (a "
        f"base-layer swap: almost every binary changes a little), for Strata and its peers "
        f"on the same trees (`{mig['command']}`, {mig['date']}, {m['nproc']} CPUs, "
        f"{sec['total']:.0f} s).", "",
        f"- **Old**: {old['suite']} {pair['arch']} `debootstrap --variant=minbase`: "
        f"{old['packages']} packages, {_tree(old)}.",
        f"- **New**: {new['suite']} minbase (the base layer update's v1): {new['packages']} "
        f"packages, {_tree(new)}; {pair['common_packages']} packages in both, "
        f"{pair['changed_versions']} of them at another version.",
        f"- **Layer view** as in the base layer update: old {_tree(views['v1'])}, new "
        f"{_tree(views['v2'])}; Strata takes the whole trees and both of its endpoints must "
        f"end equal to the new one in every path a layer lays down.",
        "",
        *_tool_rows(mig["results"]),
        "", target_table([{**mig["target"], "goal": "OS migration: " + mig["target"]["goal"]}]),
        "",
    ]
    out += _server_cpu(strata)
    out += [f"- **{_cell(r['tool'])}**: {r['detail']}" for r in mig["results"]
            if r.get("detail")]
    out.append("")
    return out


def update_sections(root: Path) -> None:
    """Re-render the base layer update, OS migration and fleet check-in sections of
    BENCHMARKS.md in place from their saved results (what `python -m bench.layers`,
    `bench.migration` or `bench.openloop` run alone measured), leaving the rest as
    `make bench` wrote it."""
    doc_file = root / "BENCHMARKS.md"
    if not doc_file.exists():
        return
    parts = re.split(r"(?m)^(?=## )", doc_file.read_text())
    rendered = {}
    for title, name, render in (("Base layer update", "layers-results.json", layer_section),
                                ("OS migration", "migration-results.json", migration_section),
                                (FLEET_TITLE, "openloop-results.json",
                                 fleet_checkin_section)):
        f = root / "bench" / name
        if f.exists():
            rendered[title] = "\n".join(render(json.loads(f.read_text()))) + "\n"
    fleet = rendered.pop(FLEET_TITLE, None)
    out: list[str] = []
    for part in parts:
        title = part[3:].split("\n", 1)[0].strip() if part.startswith("## ") else ""
        if title == "OS migration":
            continue  # placed after the base layer update below
        if fleet is not None and title in (FLEET_TITLE, OLD_CHECKIN_TITLE, "Console page loads",
                                           "Notes"):
            out.append(fleet)  # where it (or the closed-loop section it replaces) was
            fleet = None
            if title != "Console page loads" and title != "Notes":
                continue
        elif title in (FLEET_TITLE, OLD_CHECKIN_TITLE) and FLEET_TITLE in "".join(out):
            continue  # a second copy
        out.append(rendered.get(title, part))
        if title == "Base layer update" and "OS migration" in rendered:
            out.append(rendered["OS migration"])
    if fleet is not None:
        out.append(fleet)
    doc_file.write_text("".join(out))


def write(root: Path, meta: dict, steps: list[Step]) -> str:
    goals = targets(steps)
    doc = markdown(meta, steps, goals)
    (root / "BENCHMARKS.md").write_text(doc)
    results = {**meta, "steps": [s.to_dict() for s in steps], "targets": goals}
    (root / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return doc


def _rounds(fleet: dict) -> str:
    """The pairs behind the overhead figure (median of them), where there were several."""
    rounds = fleet.get("rounds") or []
    if len(rounds) < 2:
        return ""
    each = ", ".join(f"{r['network_overhead']:+.1%} ({r['centralize_seconds']:.1f} s vs "
                     f"{r['local_backup_seconds']:.1f} s)" for r in rounds)
    return (f" That is the median of {len(rounds)} pairs run alternately: {each}; the "
            f"target holds in {sum(r['network_overhead'] < 0.2 for r in rounds)} of them.")
